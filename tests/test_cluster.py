"""SLURM submission without a cluster: profiles, resources, the --dry-run plan and its sbatch script, job commands."""
import json

import pytest

from scan_dist import cluster, reproducibility
from scan_dist.config import load_config, to_yaml
from scan_dist.errors import ConfigError
from scan_dist.launch import main


def test_dry_run_for_eight_nodes_writes_plan(tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert main(["--nodes", "8", "--dry-run", "--run-dir", str(run_dir), "imagenet1k"]) == 0
    out = capsys.readouterr().out
    assert "8 node(s) x 8 task(s) = 64 processes" in out and "dist.backend=ddp" in out
    plan = json.loads((run_dir / "plan.json").read_text())
    assert plan["nodes"] == 8 and plan["gpus_per_node"] == 8 and plan["tasks"] == 64
    assert [s["name"] for s in plan["stages"]] == ["pretext", "embed", "mine", "scan", "selflabel", "evaluate"]
    for flag in ("--nodes=8", "--ntasks-per-node=8", "--gpus-per-node=8", "--signal=USR2@120", "--exclusive"):
        assert f"#SBATCH {flag}" in plan["sbatch"], flag
    assert "srun" in plan["sbatch"] and "submitit.core._submit" in plan["sbatch"]
    assert plan["estimate"]["gpu_hours"] > 0 and "measured" in plan["estimate"]["throughput_source"]
    assert not (run_dir / "config.yaml").exists()  # a dry run submits and runs nothing


def test_gpus_per_node_and_overrides_reach_the_script(tmp_path):
    cfg = load_config("imagenet50", ["slurm.partition=gpu", "slurm.account=proj", "slurm.time_min=90",
                                     "slurm.extra_sbatch=[--mail-type=END,--reservation=big]"])
    res = cluster.resolve_resources(cfg, nodes=2, gpus_per_node=4)
    assert (res.tasks_per_node, res.tasks) == (4, 8)
    script = cluster.sbatch_script(res, tmp_path, "x")
    for flag in ("--partition=gpu", "--account=proj", "--time=90", "--gpus-per-node=4", "--mail-type=END",
                 "--reservation=big", "--nodes=2"):
        assert f"#SBATCH {flag}" in script, flag


def test_local_profile_has_no_gpus():
    res = cluster.resolve_resources(load_config("smoke", ["slurm.profile=local"]), nodes=1)
    assert (res.gpus_per_node, res.tasks_per_node, res.partition) == (0, 2, "debug")
    assert cluster.job_backend(load_config("smoke", ["slurm.profile=local"]), res) == "ddp"


def test_profile_errors_name_the_problem(tmp_path):
    with pytest.raises(ConfigError, match="available: .*default.*local"):
        cluster.resolve_resources(load_config("smoke", ["slurm.profile=nope"]), nodes=1)
    bad = tmp_path / "bad.yaml"
    bad.write_text("partiton: gpu\n")
    with pytest.raises(ConfigError, match="partiton"):
        cluster.resolve_resources(load_config("smoke", [f"slurm.profile={bad}"]), nodes=1)
    with pytest.raises(ConfigError, match="one task per GPU"):
        cluster.resolve_resources(load_config("smoke", ["slurm.tasks_per_node=3"]), nodes=1, gpus_per_node=8)
    res = cluster.resolve_resources(load_config("smoke", ["slurm.extra_sbatch=[mail]"]), nodes=1)
    with pytest.raises(ConfigError, match="--key=value"):
        cluster.executor_parameters(res, "x")


def test_status_needs_a_run_folder_and_cancel_a_slurm_run(tmp_path, capsys):
    assert main(["status", str(tmp_path)]) == 2
    assert "not a run folder (no config.yaml and no SLURM jobs)" in capsys.readouterr().err
    (tmp_path / "config.yaml").write_text("run: {}\n")  # a local run: status reads its history
    assert main(["status", str(tmp_path)]) == 0
    assert "no training point logged yet" in capsys.readouterr().out
    assert main(["cancel", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_resume_needs_a_run_folder(tmp_path, capsys):
    assert main(["--resume", str(tmp_path)]) == 2
    assert "no config.yaml" in capsys.readouterr().err


def test_finished_job_ignores_a_late_time_limit_signal(tmp_path, monkeypatch):
    """After the pipeline returns, USR2 (time limit) must not kill the task while submitit saves its result."""
    import signal

    from scan_dist import job

    (tmp_path / "config.yaml").write_text(to_yaml(load_config("smoke")))
    seen = {}

    def fake_run_local(cfg, run_dir):
        seen["handler_during_run"] = signal.getsignal(signal.SIGUSR2)
        return 0

    monkeypatch.setattr(job, "run_local", fake_run_local)
    previous = signal.signal(signal.SIGUSR2, signal.default_int_handler)  # stands in for submitit's handler
    try:
        assert cluster.PipelineJob(str(tmp_path))() == 0
        assert seen["handler_during_run"] is signal.default_int_handler  # checkpointing stays armed while it runs
        assert signal.getsignal(signal.SIGUSR2) == signal.SIG_IGN
    finally:
        signal.signal(signal.SIGUSR2, previous)


def test_cpu_kernels_cap_is_exported_by_the_sbatch_script(tmp_path):
    capped = cluster.resolve_resources(load_config("smoke", ["run.cpu_kernels=avx2"]), nodes=1)
    script = cluster.sbatch_script(capped, tmp_path, "x")
    for key, value in reproducibility.CPU_KERNEL_ENV["avx2"].items():
        assert f"export {key}={value}" in script, key
    native = cluster.sbatch_script(cluster.resolve_resources(load_config("smoke"), nodes=1), tmp_path, "x")
    assert "ATEN_CPU_CAPABILITY" not in native
