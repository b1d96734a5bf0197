"""The body of one process of a run, shared by the command line (`launch.py`) and the SLURM job (`cluster.py`):
join the process group, take the run folder's lock, set up logging and signals, run the pipeline, print the summary.

Keeping it apart breaks the launch <-> cluster import circle: both import this module, it imports neither.
"""
from __future__ import annotations

import gc
import logging
import os
import subprocess
import sys
from pathlib import Path

import torch

from . import preemption, reproducibility, run_fork, run_report
from .config import Config, to_yaml
from .context import RunContext
from .distributed import comm
from .distributed import env as dist_env
from .errors import ConfigError
from .host_memory import tune_malloc
from .io_utils import write_text
from .logs import setup_logging
from .pipeline import run_pipeline, upgrade_legacy_markers
from .run_lock import RunLock


def write_config(run_dir: Path, cfg: Config) -> None:
    """The resolved config, headed by the git commit, as the run folder's config.yaml (read back by --resume).

    The config it replaces is what vouches for DONE markers an older version wrote (pipeline.accepted_hashes), so
    those markers are first brought to today's hashes."""
    upgrade_legacy_markers(run_dir)
    commit = git_commit()
    write_text(run_dir / "config.yaml", (f"# git commit: {commit}\n" if commit else "") + to_yaml(cfg))


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                             text=True, timeout=5)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def run_local(cfg: Config, run_dir: Path) -> int:
    """Run the pipeline in this process; under torchrun/SLURM this is one rank of the job."""
    RunContext(cfg, run_dir, setup_logging(None)).check_data_path()
    env = dist_env.detect(cfg.run.device)
    if env.distributed and cfg.dist.backend == "none":
        raise ConfigError(f"this is process {env.rank} of {env.world_size} ({env.source}) but dist.backend=none; "
                          "set dist.backend=ddp or dist.backend=deepspeed")
    dist_env.init_process_group(env, cfg.dist.timeout_s)
    try:
        return _run_rank(cfg, run_dir, env)
    finally:
        # Free the stage objects (DDP wrappers, autograd graphs) that still hold the group before closing it: a group
        # left to interpreter teardown can abort the finished process while gloo's threads are destroyed.
        gc.collect()
        dist_env.destroy_process_group()


def _run_rank(cfg: Config, run_dir: Path, env) -> int:
    run_dir.mkdir(parents=True, exist_ok=True)
    log = setup_logging(run_dir, env.rank)
    lock = RunLock(run_dir, log)
    _on_main_rank(env, lock.acquire)  # every rank stops together when the folder is taken
    try:
        return _run_locked(cfg, run_dir, env, log)
    finally:
        lock.release()


def _on_main_rank(env, action) -> None:
    """Run `action` on rank 0 alone; a ConfigError it raises is raised on every rank (the others wait for it)."""
    refusal = None
    if env.is_main:
        try:
            action()
        except ConfigError as exc:
            refusal = str(exc)
    refusal = comm.broadcast_object(refusal)
    if refusal:
        raise ConfigError(refusal)


def _run_locked(cfg: Config, run_dir: Path, env, log) -> int:
    if cfg.run.threads:
        torch.set_num_threads(cfg.run.threads)
    if env.is_main:
        write_config(run_dir, cfg)
    ctx = RunContext(cfg, run_dir, log, env)
    log.info("run folder %s, preset %s, device %s, %d process(es), dist.backend=%s", run_dir, cfg.name, ctx.device,
             env.world_size, cfg.dist.backend)
    _on_main_rank(env, lambda: run_fork.copy_stages(cfg, run_dir, log))  # every rank plans after the copy
    if cfg.run.tune_malloc and ctx.device.type == "cpu":
        log.info(tune_malloc())
    kernels_note = reproducibility.cpu_kernels_note(cfg.run.cpu_kernels)
    if kernels_note:
        log.log(*kernels_note)
    switched = reproducibility.apply(cfg.run.deterministic)
    if switched:
        log.info(switched)
    preemption.install()  # USR2 / SIGTERM: the running stage checkpoints at its next read, then stops
    if not cfg.run.kernel_self_check:  # left unset, the environment decides (SCAN_DIST_KERNEL_SELF_CHECK)
        from . import kernels

        kernels.configure(self_check=False)
    summary = run_pipeline(ctx)
    if not env.is_main:
        return 0
    print()
    print("Time per stage")
    print(run_report.format_time_table({k: v for k, v in summary["seconds"].items() if k != "total"},
                                   {k: v.get("images_per_s") for k, v in summary["stages"].items()}))
    print()
    print(run_report.format_metrics_table(summary["final"], summary.get("baseline_kmeans_pixels")))
    print(f"\nartifacts in {run_dir}: metrics.json report.md assignments.csv confusion.png prototypes.png log.txt")
    return 0


def exit_process(code: int) -> None:
    """End this process with `code`. A torchrun rank skips interpreter teardown once its logs are flushed.

    Why: a finished gloo/DeepSpeed rank was seen to abort while the interpreter destroyed the communication threads
    ("terminate called without an active exception", SIGABRT, in this project's tests), which makes torchrun, and
    SLURM after it, report a failed job whose results are complete. Everything a run writes is atomic and already on
    disk here; single processes and submitit jobs (which must hand their result back) exit normally.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and "TORCHELASTIC_RUN_ID" in os.environ:
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)
