"""Command line entry: `python -m scan_dist.launch [--local | --nodes N] [--dry-run] [--run-dir DIR] PRESET [k=v ...]`.

Builds the config (preset or YAML file, then dotted overrides), writes it to the run folder and runs the pipeline
here (`--local`, the default; torchrun-compatible), or prints the plan (`--dry-run`). User errors print one line
and exit with status 2.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import torch

from . import report
from .config import Config, available_presets, load_config, to_yaml
from .context import RunContext
from .dist import env as dist_env
from .errors import ConfigError, ScanDistError
from .io_utils import write_text
from .logs import setup_logging
from .pipeline import plan, run_pipeline


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m scan_dist.launch",
        description="SCAN: learning to classify images without labels. Runs pretext -> embed -> mine -> scan -> "
                    "selflabel -> evaluate into a run folder; finished stages are skipped, killed ones resume.",
        epilog=f"presets: {', '.join(available_presets())}. Example: python -m scan_dist.launch --local demo "
               "scan.epochs=5 data.path=/data/fmnist",
    )
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--local", action="store_true", help="run on this machine (the default)")
    where.add_argument("--nodes", type=int, metavar="N", help="submit to SLURM on N nodes (not implemented yet)")
    parser.add_argument("--dry-run", action="store_true", help="print the resolved config and the stage plan only")
    parser.add_argument("--run-dir", type=Path, help="run folder (default: runs/<preset name>)")
    parser.add_argument("preset", metavar="PRESET_OR_YAML", help="a preset name or a .yaml config file")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. scan.epochs=20")
    return parser.parse_args(argv)


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                             text=True, timeout=5)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return _main(args)
    except ScanDistError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; rerun the same command to resume", file=sys.stderr)
        return 130


def _main(args: argparse.Namespace) -> int:
    if args.nodes is not None:
        raise ScanDistError("--nodes (SLURM submission) is not implemented yet; use --local to run here "
                            "or --dry-run to print the plan")
    cfg = load_config(args.preset, args.overrides)
    run_dir = args.run_dir or Path("runs") / cfg.name
    if args.dry_run:
        print(to_yaml(cfg))
        print(f"run folder: {run_dir}")
        for stage, action in plan(cfg, run_dir):
            print(f"  {stage:<10} {action}")
        return 0
    return run_local(cfg, run_dir)


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
        dist_env.destroy_process_group()


def _run_rank(cfg: Config, run_dir: Path, env) -> int:
    run_dir.mkdir(parents=True, exist_ok=True)
    log = setup_logging(run_dir, env.rank)
    if cfg.run.threads:
        torch.set_num_threads(cfg.run.threads)
    if env.is_main:
        commit = git_commit()
        write_text(run_dir / "config.yaml", (f"# git commit: {commit}\n" if commit else "") + to_yaml(cfg))
    ctx = RunContext(cfg, run_dir, log, env)
    log.info("run folder %s, preset %s, device %s, %d process(es), dist.backend=%s", run_dir, cfg.name, ctx.device,
             env.world_size, cfg.dist.backend)
    summary = run_pipeline(ctx)
    if not env.is_main:
        return 0
    print()
    print("Time per stage")
    print(report.format_time_table({k: v for k, v in summary["seconds"].items() if k != "total"}))
    print()
    print(report.format_metrics_table(summary["final"], summary.get("baseline_kmeans_pixels")))
    print(f"\nartifacts in {run_dir}: metrics.json report.md assignments.csv confusion.png prototypes.png log.txt")
    return 0


if __name__ == "__main__":
    sys.exit(main())
