"""The launcher against a real one-node SLURM cluster (slurm/local-cluster.sh): submit, requeue mid-stage, time
limit with checkpoint-and-requeue, status and cancel. Each job is 1 node x 2 tasks on CPU (gloo)."""
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from scan_dist import cluster
from slurm_cluster import slurm_cluster  # noqa: F401  (the session fixture)

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

# Short stages; contiguous tensors (see test_dist_pipeline.py); checkpoints every 2 steps.
# Pretext (12 steps, ~20 s on the 2 tasks) outlasts a requeue's SIGTERM-to-SIGKILL (KillWait=5 s locally).
SMALL = ("run.progress=false", "slurm.profile=local", "data.max_images=1024", "data.max_eval_images=512",
         "pretext.batch_size=256", "pretext.epochs=3", "scan.mode=full", "scan.features=backbone",
         "scan.batch_size=128", "selflabel.batch_size=256", "selflabel.threshold=0.15", "model.channels_last=false",
         "run.checkpoint_every_steps=2", "dist.timeout_s=60")


def launch(*args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "scan_dist.launch", *args], capture_output=True, text=True,
                          timeout=timeout)


def submit(run_dir: Path, *overrides: str, wait: bool = False) -> str:
    result = launch("--nodes", "1", *(["--wait"] if wait else []), "--run-dir", str(run_dir), "smoke", *SMALL,
                    *overrides)
    assert result.returncode == 0, result.stdout + result.stderr + _task_logs(run_dir)
    return json.loads((run_dir / "jobs.json").read_text())["jobs"][-1]["job_id"]


def _task_logs(run_dir: Path) -> str:
    logs = sorted((run_dir / "slurm").glob("*/*_log.*")) if (run_dir / "slurm").is_dir() else []
    return "\n".join(f"--- {p}\n{p.read_text()[-2000:]}" for p in logs)


def job_field(job_id: str, key: str) -> str | None:
    out = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True).stdout
    fields = dict(item.split("=", 1) for item in out.split() if "=" in item)
    return fields.get(key)


def wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.time() + timeout
    while not predicate():
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def metrics(run_dir: Path) -> dict:
    return json.loads((run_dir / "metrics.json").read_text())


def losses(m: dict) -> list:
    s = m["stages"]
    return [s["pretext"]["final_loss"], s["scan"]["final_loss"], s["selflabel"].get("final_loss"), m["acc"]]


@pytest.fixture(scope="module")
def uninterrupted(slurm_cluster, fashion_mnist, tmp_path_factory):  # noqa: F811
    run_dir = tmp_path_factory.mktemp("slurm") / "run"
    submit(run_dir, wait=True)
    return run_dir


def test_submitted_smoke_runs_on_two_tasks(uninterrupted):
    m = metrics(uninterrupted)
    assert m["world_size"] == 2 and m["acc"] is not None
    assert (uninterrupted / "logs" / "rank1.txt").is_file()
    assert "2 process(es), dist.backend=ddp" in (uninterrupted / "log.txt").read_text()
    job_dir = next(p for p in (uninterrupted / "slurm").iterdir() if p.is_dir() and not p.is_symlink())
    assert sorted(p.name.split("_")[1] for p in job_dir.glob("*_log.out")) == ["0", "1"]  # one log per task


def test_scontrol_requeue_mid_stage_resumes_to_same_metrics(uninterrupted, tmp_path):
    run_dir = tmp_path / "requeued"
    job_id = submit(run_dir)
    checkpoint = run_dir / "pretext" / "checkpoint.pt"
    wait_for(lambda: checkpoint.exists(), 300, "the pretext checkpoint")
    assert not (run_dir / "pretext" / "DONE").exists()
    subprocess.run(["scontrol", "requeue", job_id], check=True)
    result = launch("status", str(run_dir))
    assert job_id in result.stdout
    state = cluster.wait(job_id, run_dir, timeout_s=900)
    assert state == "COMPLETED", state + _task_logs(run_dir)
    assert int(job_field(job_id, "Restarts") or 1) >= 1
    assert "pretext: resuming at epoch 1" in (run_dir / "log.txt").read_text()
    assert losses(metrics(uninterrupted))[2] is not None, "self-labelling never stepped"
    assert losses(metrics(run_dir)) == pytest.approx(losses(metrics(uninterrupted)), rel=1e-9)


def test_time_limit_checkpoints_requeues_and_finishes(slurm_cluster, fashion_mnist, tmp_path):  # noqa: F811
    """A 2-minute limit with USR2 60 s before it, on a run longer than that: submitit calls checkpoint() in rank 0,
    the job is requeued under the same id and the pipeline resumes."""
    run_dir = tmp_path / "timelimit"
    # max_requeues=10: on a slow or shared machine each 1-minute window makes less progress (CI once needed 4).
    job_id = submit(run_dir, "slurm.time_min=2", "slurm.signal_delay_s=60", "slurm.max_requeues=10",
                    "data.max_images=3000", "pretext.epochs=12")
    state = cluster.wait(job_id, run_dir, timeout_s=1200)
    assert state == "COMPLETED", state + _task_logs(run_dir)
    events = json.loads((run_dir / "jobs.json").read_text()).get("events", [])
    assert any(e["event"] == "requeue" and e["job_id"] == job_id for e in events), events
    assert "resuming" in (run_dir / "log.txt").read_text() or "skipped" in (run_dir / "log.txt").read_text()
    assert metrics(run_dir)["world_size"] == 2


def test_status_and_cancel_a_live_job(slurm_cluster, fashion_mnist, tmp_path):  # noqa: F811
    run_dir = tmp_path / "cancelled"
    job_id = submit(run_dir, "pretext.epochs=50")
    wait_for(lambda: job_field(job_id, "JobState") in ("RUNNING", "PENDING"), 60, "the job to be queued")
    status = launch("status", str(run_dir))
    assert status.returncode == 0 and job_id in status.stdout
    assert "RUNNING" in status.stdout or "PENDING" in status.stdout
    cancelled = launch("cancel", str(run_dir))
    assert cancelled.returncode == 0 and job_id in cancelled.stdout
    wait_for(lambda: job_field(job_id, "JobState") in (None, "CANCELLED"), 60, "the cancellation")


def test_usr2_checkpoints_at_the_next_read_so_no_step_is_redone(slurm_cluster, fashion_mnist, tmp_path):  # noqa: F811
    """A preemption warning (USR2 to every task, as SLURM sends before the time limit) mid-epoch, with no periodic
    checkpoint in sight: the stage checkpoints at its next read (every 20 steps), rank 0 requeues the job, and the
    requeued job resumes at exactly that step -- nothing after the last periodic checkpoint is redone. The job is
    cancelled once it has resumed (the rest of the pipeline is what the other tests run)."""
    run_dir = tmp_path / "usr2"
    job_id = submit(run_dir, "run.checkpoint_every_steps=1000", "data.max_images=2048", "pretext.batch_size=32",
                    "pretext.epochs=2", "slurm.max_requeues=3")
    wait_for(lambda: "pretext: running" in ((run_dir / "log.txt").read_text() if (run_dir / "log.txt").exists()
                                             else ""), 300, "the pretext stage")
    time.sleep(8)  # some steps into the epoch (64 steps of 32 images each)
    subprocess.run(["scancel", "--signal=USR2", job_id], check=True)
    # The requeued job resuming is the whole point; the rest of the pipeline (tested elsewhere) is cut short.
    wait_for(lambda: "pretext: resuming at" in (run_dir / "log.txt").read_text()
             or job_field(job_id, "JobState") in ("FAILED", "CANCELLED", "COMPLETED"), 900, "the requeued job")
    log = (run_dir / "log.txt").read_text()
    assert launch("cancel", str(run_dir)).returncode == 0
    wait_for(lambda: job_field(job_id, "JobState") in (None, "CANCELLED", "COMPLETED"), 120, "the cancellation")
    assert "pretext: resuming at" in log, log[-3000:] + _task_logs(run_dir)
    import re

    mid = re.search(r"USR2: checkpointed pretext at epoch (\d+), step (\d+)", log)
    end = re.search(r"USR2: checkpointed pretext at the end of epoch (\d+)", log)
    assert mid or end, log[-3000:]
    if mid:  # the usual case: mid-epoch, at a multiple of the read interval
        assert f"pretext: resuming at epoch {mid.group(1)}, step {mid.group(2)}" in log
        from scan_dist.trainer import read_interval

        assert int(mid.group(2)) % read_interval(2048 // 32) == 0 and int(mid.group(2)) > 0
    else:  # the signal came during the last steps of an epoch: its end checkpoint served
        assert f"pretext: resuming at epoch {int(end.group(1)) + 1}, step 0" in log
