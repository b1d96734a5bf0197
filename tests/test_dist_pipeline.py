"""The whole pipeline under torchrun (gloo, CPU): N processes equal one, DeepSpeed equals DDP, two 'nodes' on
localhost, and a rank killed mid-stage fails the job fast and resumes on relaunch.

All runs use contiguous tensors (model.channels_last=false): torch's CPU BatchNorm in channels_last computes its
variance with ~3e-4 error (measured on torch 2.14), and Adam turns such noise into different trajectories, so a
comparison across memory formats would test numerics, not the distributed engine.
"""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gloo import free_port

pytestmark = [pytest.mark.slow, pytest.mark.dist]

# Few steps per stage (pretext 4, scan 8, selflabel 4) with every training path active.
SMALL = ("run.progress=false", "run.threads=1", "data.max_images=1024", "data.max_eval_images=512",
         "pretext.batch_size=256", "scan.mode=full", "scan.features=backbone", "scan.batch_size=128",
         "selflabel.batch_size=256", "selflabel.threshold=0.15", "model.channels_last=false",
         "run.checkpoint_every_steps=2", "dist.timeout_s=60")


# Self-labelling's loss after 2 vs 1 processes: a step-function mask amplifies reduction-order noise (see
# test_two_ddp_processes_equal_one); measured up to 1.4 % apart.
SELFLABEL_REL = 3e-2

def launch_cmd(run_dir: Path, *overrides: str, nproc: int = 1, nnodes: int = 1, node_rank: int = 0,
               port: int | None = None) -> list[str]:
    if nproc == 1 and nnodes == 1:
        prefix = [sys.executable, "-m"]
    else:
        prefix = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--nnodes={nnodes}",
                  f"--node_rank={node_rank}", "--master_addr=127.0.0.1", f"--master_port={port or free_port()}",
                  "-m"]
    return [*prefix, "scan_dist.launch", "--run-dir", str(run_dir), "smoke", *SMALL, *overrides]


def run(cmd: list[str]) -> subprocess.CompletedProcess:
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    return result


def metrics(run_dir: Path) -> dict:
    return json.loads((run_dir / "metrics.json").read_text())


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, fashion_mnist):
    run_dir = tmp_path_factory.mktemp("one") / "run"
    run(launch_cmd(run_dir))
    return metrics(run_dir)


@pytest.fixture(scope="module")
def two_ddp(tmp_path_factory, fashion_mnist):
    run_dir = tmp_path_factory.mktemp("ddp") / "run"
    run(launch_cmd(run_dir, "dist.backend=ddp", nproc=2))
    return run_dir


def stage_losses(m: dict) -> dict:
    s = m["stages"]
    return {"pretext": s["pretext"]["final_loss"], "scan": s["scan"]["final_loss"],
            "scan_consistency": s["scan"]["final_consistency"], "selflabel": s["selflabel"].get("final_loss")}


def test_two_ddp_processes_equal_one(one_process, two_ddp):
    two = metrics(two_ddp)
    assert one_process["stages"]["selflabel"]["final_confident"] > 0, "self-labelling never stepped"
    assert two["world_size"] == 2 and one_process["world_size"] == 1
    # The views are bitwise those of one process (tests/test_loaders.py); what differs is float reduction order
    # (gradient all-reduce, SyncBatchNorm), which the training amplifies (weights after 4 pretext steps differ by
    # ~1e-2 before and after the data-layer redesign). Measured (counter-based views): pretext 5.73442 vs 5.73423,
    # SCAN -9.21923 vs -9.21923, self-label 1.9703 vs 1.9557 in one run and 2.0088 vs 2.0377 (1.4 %) in a later one:
    # its confidence mask (threshold 0.15 on 10 clusters) is a step function, and 17.5 % vs 19.0 % of the samples
    # passed it -- hence its wider tolerance (SELFLABEL_REL).
    for key, value in stage_losses(one_process).items():
        assert stage_losses(two)[key] == pytest.approx(value, rel=SELFLABEL_REL if key == "selflabel" else 2e-3), key
    for a, b in zip(one_process["stages"]["scan"]["selection_losses"], two["stages"]["scan"]["selection_losses"]):
        assert a == pytest.approx(b, abs=0.02)
    for key in ("acc", "nmi", "ari"):
        assert two[key] == pytest.approx(one_process[key], abs=0.02), key
    # Only rank 0 writes the run folder's files; other ranks log to logs/rank<r>.txt.
    assert (two_ddp / "logs" / "rank1.txt").is_file()
    assert "2 process(es), dist.backend=ddp" in (two_ddp / "log.txt").read_text()


def test_deepspeed_zero2_equals_ddp(two_ddp, tmp_path):
    run_dir = tmp_path / "ds"
    run(launch_cmd(run_dir, "dist.backend=deepspeed", "dist.zero_stage=2", nproc=2))
    ds, ddp = metrics(run_dir), metrics(two_ddp)
    # fp32 ZeRO-2 runs the same torch optimizer on flat shards: the same numbers as DDP (measured: identical).
    for key, value in stage_losses(ddp).items():
        assert stage_losses(ds)[key] == pytest.approx(value, rel=1e-5), key
    assert ds["acc"] == pytest.approx(ddp["acc"], abs=1e-6)


def test_two_nodes_on_localhost_equal_two_processes(two_ddp, tmp_path):
    run_dir, port = tmp_path / "nodes", free_port()
    procs = [subprocess.Popen(launch_cmd(run_dir, "dist.backend=ddp", nproc=1, nnodes=2, node_rank=rank, port=port),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for rank in (0, 1)]
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n".join(o[-3000:] for o in outputs)
    nodes, ddp = metrics(run_dir), metrics(two_ddp)
    assert stage_losses(nodes) == pytest.approx(stage_losses(ddp), rel=1e-6)
    assert nodes["acc"] == pytest.approx(ddp["acc"], abs=1e-6)


def _pids(run_dir: Path) -> list[int]:
    """Every process (torchrun's agent and its workers) whose command line names run_dir."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if str(run_dir).encode() in (entry / "cmdline").read_bytes().split(b"\0"):
                    pids.append(int(entry.name))
            except OSError:
                continue
    return pids


def _rank_pid(run_dir: Path, rank: int) -> int | None:
    """The pid of the worker with RANK=rank running on run_dir (torchrun's children)."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().split(b"\0")
            environ = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if str(run_dir).encode() in cmdline and b"torch.distributed.run" not in cmdline \
                and f"RANK={rank}".encode() in environ:
            return int(entry.name)
    return None


def test_killed_rank_fails_fast_and_relaunch_resumes(two_ddp, tmp_path):
    run_dir = tmp_path / "killed"
    cmd = launch_cmd(run_dir, "dist.backend=ddp", "dist.timeout_s=30", nproc=2)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    checkpoint = run_dir / "pretext" / "checkpoint.pt"
    deadline = time.time() + 300
    while not checkpoint.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    victim = _rank_pid(run_dir, 1)
    assert proc.poll() is None and victim is not None, "the run ended before the pretext stage wrote a checkpoint"
    killed_at = time.time()
    os.kill(victim, signal.SIGKILL)
    proc.communicate(timeout=120)
    assert proc.returncode != 0
    assert time.time() - killed_at < 60, "the surviving rank did not fail fast"
    assert not (run_dir / "pretext" / "DONE").exists(), "the kill landed after the stage finished"
    run(cmd)
    assert "pretext: resuming at epoch 1" in (run_dir / "log.txt").read_text()
    resumed, reference = metrics(run_dir), metrics(two_ddp)
    # Resume is exact: the same numbers as the uninterrupted 2-process run.
    assert stage_losses(resumed) == pytest.approx(stage_losses(reference), rel=1e-9)
    assert resumed["acc"] == pytest.approx(reference["acc"], abs=1e-9)


def test_ddp_run_resumes_on_another_number_of_processes(one_process, tmp_path):
    """Killed as 2 DDP processes mid-pretext, resumed as 1: the checkpoint holds no per-rank state."""
    run_dir = tmp_path / "regrid"
    proc = subprocess.Popen(launch_cmd(run_dir, "dist.backend=ddp", nproc=2), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    checkpoint = run_dir / "pretext" / "checkpoint.pt"
    deadline = time.time() + 300
    while not checkpoint.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before the pretext stage wrote a checkpoint"
    for pid in _pids(run_dir):  # torchrun's agent and both workers (they run in their own sessions)
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.communicate(timeout=60)
    assert not (run_dir / "pretext" / "DONE").exists(), "the kill landed after the stage finished"
    run(launch_cmd(run_dir, "dist.backend=ddp"))
    assert "pretext: resuming at epoch 1" in (run_dir / "log.txt").read_text()
    resumed = metrics(run_dir)
    assert resumed["world_size"] == 1
    for key, value in stage_losses(one_process).items():  # tolerances as in test_two_ddp_processes_equal_one
        assert stage_losses(resumed)[key] == pytest.approx(value, rel=SELFLABEL_REL if key == "selflabel" else 2e-3), key
