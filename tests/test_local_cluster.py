"""The local one-node SLURM cluster (slurm/local-cluster.sh) runs batch jobs, multi-task steps and submitit jobs,
and its sacct stand-in gives submitit real job states.  ~5 s on the 2-core CI machine, plus ~7 s for apt-get the
first time on a machine; longer only while another session's jobs hold the node."""
import os
import re
import subprocess
import time
from pathlib import Path

import pytest
from slurm_cluster import slurm_cluster  # noqa: F401  (the session fixture)

pytestmark = pytest.mark.slurm

JOB_TIMEOUT_S = 180  # generous: jobs of another session on the same cluster may hold the node


def run(*cmd: str, timeout: float = 60) -> str:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    assert proc.returncode == 0, f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def sbatch(cluster, *args: str) -> str:
    return run("sbatch", "--parsable", "-p", cluster.partition, "--time=5", *args).strip().split(";")[0]


def job_state(job_id: str) -> str:
    out = subprocess.run(["scontrol", "-o", "show", "job", job_id], capture_output=True, text=True, timeout=30,
                         check=False).stdout
    m = re.search(r"(?:^|\s)JobState=(\S+)", out)
    return m.group(1) if m else "UNKNOWN"


def wait_for(cluster, job_id: str, states: set, timeout: float = JOB_TIMEOUT_S) -> str:
    deadline = time.monotonic() + timeout
    while (state := job_state(job_id)) not in states:
        if time.monotonic() > deadline:
            raise AssertionError(f"job {job_id} still {state} after {timeout} s, expected one of {sorted(states)}\n"
                                 f"{run('squeue')}\n{cluster.log_tail()}")
        time.sleep(0.3)
    return state


def sacct(*job_ids: str, path=None) -> dict:
    """The stand-in called the way submitit calls it; {JobID: (State, NodeList)}."""
    cmd = ["sacct", "-o", "JobID,State,NodeList", "--parsable2"]
    for job_id in job_ids:
        cmd += ["-j", job_id]
    env = None if path is None else dict(os.environ, PATH=path)
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=30, env=env, check=False)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines and lines[0] == "JobID|State|NodeList", proc.stdout
    return {job: (state, nodes) for job, state, nodes in (line.split("|") for line in lines[1:])}


def test_sbatch_wrap_runs_to_completion(slurm_cluster, tmp_path):  # noqa: F811
    out = tmp_path / "job.out"
    job_id = sbatch(slurm_cluster, f"--output={out}", "--wrap", "echo hello from $SLURM_JOB_ID")
    try:
        assert wait_for(slurm_cluster, job_id, {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"}) == "COMPLETED"
    finally:
        slurm_cluster.cancel(job_id)
    assert out.read_text().strip() == f"hello from {job_id}"


def test_srun_two_tasks(slurm_cluster):  # noqa: F811
    out = run("srun", "-p", slurm_cluster.partition, "--time=2", "-N1", "-n2", "-c1",
              "bash", "-c", 'echo "$SLURM_PROCID $SLURM_NTASKS"', timeout=JOB_TIMEOUT_S)
    assert sorted(out.split("\n")[:-1]) == ["0 2", "1 2"], out


def test_sacct_stand_in(slurm_cluster, tmp_path):  # noqa: F811
    SlurmInfoWatcher = pytest.importorskip("submitit.slurm.slurm").SlurmInfoWatcher

    assert Path(run("bash", "-c", "command -v sacct").strip()) == slurm_cluster.bin_dir / "sacct"
    done = sbatch(slurm_cluster, f"--output={tmp_path / 'done.out'}", "--wrap", "true")
    live = None
    try:
        wait_for(slurm_cluster, done, {"COMPLETED"})
        live = sbatch(slurm_cluster, f"--output={tmp_path / 'live.out'}", "--wrap", "sleep 120")
        states = sacct(done, live)
        assert states[done][0] == "COMPLETED", states
        assert states[done][1] == os.uname().nodename.split(".")[0], states
        assert states[live][0] in {"RUNNING", "PENDING"}, states
        # submitit parses it (this is what SlurmInfoWatcher.update() feeds read_info)
        output = run("sacct", "-o", "JobID,State,NodeList", "--parsable2", "-j", done, "-j", live)
        info = SlurmInfoWatcher().read_info(output)
        assert info[done]["State"] == "COMPLETED" and info[live]["State"] in {"RUNNING", "PENDING"}, info
        slurm_cluster.cancel(live)
        wait_for(slurm_cluster, live, {"CANCELLED"})
        assert sacct(live)[live][0] == "CANCELLED"
    finally:
        slurm_cluster.cancel(live)

    # once slurmctld has purged a job (MinJobAge) its state comes from the job-completion log: fake an empty queue
    fake = tmp_path / "fakebin"
    fake.mkdir()
    (fake / "scontrol").write_text("#!/bin/sh\necho 'No jobs in the system'\n")
    (fake / "scontrol").chmod(0o755)
    purged = sacct(done, live, path=f"{slurm_cluster.bin_dir}{os.pathsep}{fake}{os.pathsep}{os.environ['PATH']}")
    assert purged[done][0] == "COMPLETED" and purged[live][0] == "CANCELLED", purged
    assert sacct("999999999") == {}  # unknown id: header only, like sacct


def test_submitit_two_tasks(slurm_cluster, tmp_path):  # noqa: F811
    submitit = pytest.importorskip("submitit")

    # A local function: cloudpickle sends it by value (this test module is not importable inside the job).
    def global_rank():
        return submitit.JobEnvironment().global_rank

    executor = submitit.AutoExecutor(folder=tmp_path / "submitit")
    assert executor.cluster == "slurm"
    executor.update_parameters(slurm_partition=slurm_cluster.partition, nodes=1, tasks_per_node=2, cpus_per_task=1,
                               timeout_min=5)
    job = executor.submit(global_rank)
    try:
        deadline = time.monotonic() + JOB_TIMEOUT_S
        while not job.done():
            if time.monotonic() > deadline:
                logs = "\n".join(f"---- {p}\n{p.read_text(errors='replace')[-2000:]}"
                                 for p in sorted((tmp_path / "submitit").glob("*.out")))
                raise AssertionError(f"submitit job {job.job_id} not done after {JOB_TIMEOUT_S} s "
                                     f"({job.state})\n{logs}\n{slurm_cluster.log_tail()}")
            time.sleep(0.5)
        assert job.results() == [0, 1]
        # submitit reads the final state through the sacct stand-in (not UNKNOWN)
        deadline = time.monotonic() + 30
        while (state := job.watcher.get_state(job.job_id, mode="force")) != "COMPLETED":
            assert time.monotonic() < deadline, f"submitit sees job {job.job_id} as {state}"
            time.sleep(0.5)
    finally:
        slurm_cluster.cancel(job.job_id)
