"""Command line entry: `python -m scan_dist.launch [--local | --nodes N] [--dry-run] [--run-dir DIR] [--seeds 0,1,2]
PRESET [k=v ...]`.

Builds the config (preset or YAML file, then dotted overrides), writes it to the run folder and runs the pipeline
here (`--local`, the default; torchrun-compatible), or prints the plan (`--dry-run`). `--seeds` makes one run
folder per seed (`<run dir>/seed<S>`), runs them one after the other (or submits one job each with --nodes) and
ends with the mean ± std table of `python -m scan_dist.report` over them. User errors print one line and exit with
status 2.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

from . import reproducibility, run_fork
from .config import Config, available_presets, load_config, to_yaml
from .context import RunContext
from .distributed import env as dist_env
from .errors import ConfigError, ScanDistError
from .io_utils import write_json
from .logs import setup_logging
from .job import exit_process, run_local, write_config
from .memory_plan import format_memory_plan, plan_memory
from .pipeline import plan
from .preemption import Preempted


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m scan_dist.launch",
        description="SCAN: learning to classify images without labels. Runs pretext -> embed -> mine -> scan -> "
                    "selflabel -> evaluate into a run folder; finished stages are skipped, killed ones resume. "
                    "Also: `status RUN_DIR` and `cancel RUN_DIR` for runs submitted with --nodes.",
        epilog=f"presets: {', '.join(available_presets())}. Examples: python -m scan_dist.launch --local demo "
               "scan.epochs=5 data.path=/data/fmnist; python -m scan_dist.launch --nodes 8 imagenet1k "
               "slurm.partition=gpu; python -m scan_dist.launch --resume runs/imagenet1k",
    )
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--local", action="store_true", help="run on this machine (the default)")
    where.add_argument("--nodes", type=int, metavar="N", help="submit to SLURM on N nodes (submitit; one task per GPU)")
    parser.add_argument("--gpus-per-node", type=int, metavar="G", help="GPUs (= tasks) per node (default: profile, 8)")
    parser.add_argument("--dry-run", action="store_true",
                        help="print the plan (config, stages, for --nodes the resources, sbatch script and a GPU-hour "
                             "estimate) and write plan.json in the run folder; runs and submits nothing")
    parser.add_argument("--run-dir", type=Path, help="run folder (default: runs/<preset name>)")
    parser.add_argument("--resume", type=Path, metavar="RUN_DIR",
                        help="continue a run from its folder (its config.yaml; resubmitted if it was a --nodes run)")
    parser.add_argument("--from", dest="start_from", type=Path, metavar="RUN_DIR",
                        help="copy RUN_DIR's finished stages whose settings match (RUN_DIR/seed<S> with --seeds) into "
                             "the run folder first, so only what the overrides change runs (run.start_from)")
    parser.add_argument("--wait", action="store_true", help="with --nodes: block until the job ends")
    parser.add_argument("--seeds", type=_seed_list, metavar="S,S,...",
                        help="one run per seed (run.seed=S) in <run dir>/seed<S>, then a mean ± std report of them "
                             "in <run dir>/report.md; rerunning the command resumes them")
    parser.add_argument("preset", metavar="PRESET_OR_YAML", nargs="?", help="a preset name or a .yaml config file")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. scan.epochs=20")
    args = parser.parse_args(argv)
    if args.start_from is not None:
        args.overrides.append(f"run.start_from={args.start_from}")
    if args.resume is None and args.preset is None:
        parser.error("give a preset (or a YAML file), or --resume RUN_DIR")
    if args.seeds is not None and args.resume is not None:
        parser.error("--seeds makes its own run folders; to resume them, rerun the same --seeds command")
    if args.resume is not None and args.preset is not None:
        # `--resume RUN_DIR key=value`: argparse puts the first override in `preset`.
        args.overrides = [args.preset, *args.overrides]
        args.preset = None
    return args


def _seed_list(text: str) -> list[int]:
    try:
        seeds = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--seeds wants comma-separated integers such as 0,1,2; got {text!r}") from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise argparse.ArgumentTypeError(f"--seeds wants distinct integers such as 0,1,2; got {text!r}")
    return seeds


def main(argv: list[str] | None = None) -> int:
    from_command_line = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv and argv[0] in ("status", "cancel"):
            return _job_command(argv)
        args = parse_args(argv)
        if from_command_line:
            _restart_for_cpu_kernels(args)
        return _main(args)
    except Preempted as exc:  # a signal stopped the run after a checkpoint: not an error of the user's
        print(f"stopped: {exc}", file=sys.stderr)
        return 143
    except ScanDistError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; rerun the same command to resume", file=sys.stderr)
        return 130


def _config_of(args: argparse.Namespace) -> Config:
    """The config a command line asks for, as _main builds it (for --seeds, every seed's but for run.seed)."""
    if args.resume is not None:
        config_path = args.resume / "config.yaml"
        if not config_path.is_file():
            raise ConfigError(f"--resume {args.resume}: no config.yaml there (not a run folder)")
        return load_config(str(config_path), args.overrides)
    return load_config(args.preset, args.overrides)


def _restart_for_cpu_kernels(args: argparse.Namespace) -> None:
    """Restart this command (same process, same arguments) with the variables `run.cpu_kernels` needs.

    torch, oneDNN and MKL read them once, at their first CPU operation, and importing this package has already run
    some, so setting them now would come too late; the restarted process has them from its start. os.execv keeps
    the process id, so torchrun and SLURM follow it as the same process."""
    missing = reproducibility.cpu_kernel_env(_config_of(args).run.cpu_kernels)
    if not missing:
        return
    os.environ.update(missing)
    print(f"run.cpu_kernels: restarting with {' '.join(f'{k}={v}' for k, v in missing.items())}", file=sys.stderr)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, list(sys.orig_argv))


def _job_command(argv: list[str]) -> int:
    """`status RUN_DIR` / `cancel RUN_DIR`: the SLURM jobs of a run."""
    if len(argv) != 2:
        raise ConfigError(f"usage: python -m scan_dist.launch {argv[0]} RUN_DIR")
    run_dir = Path(argv[1])
    if not run_dir.is_dir():
        raise ConfigError(f"run folder {run_dir} does not exist")
    from . import cluster
    from .history import format_status

    if argv[0] == "status":
        if not (run_dir / "jobs.json").is_file():  # a local run: its history says where it is
            if not (run_dir / "config.yaml").is_file():
                raise ConfigError(f"status: {run_dir} is not a run folder (no config.yaml and no SLURM jobs)")
            print(format_status(run_dir))
            return 0
        print(cluster.status_text(run_dir))
        print(format_status(run_dir).split("\n", 1)[1])
        return 0
    cancelled = cluster.cancel(run_dir)
    print(f"cancelled {', '.join(cancelled)}" if cancelled else "no running or queued job to cancel")
    return 0


def _main(args: argparse.Namespace) -> int:
    if args.seeds is not None:
        return _main_seeds(args)
    launch_info: dict = {}
    cfg = _config_of(args)
    if args.resume is not None:
        run_dir = args.resume
        launch_info = _read_launch_info(run_dir)
        if args.nodes is None and not args.local and launch_info.get("mode") == "slurm":
            args.nodes = launch_info["nodes"]
            args.gpus_per_node = args.gpus_per_node if args.gpus_per_node is not None else launch_info.get(
                "gpus_per_node")
    else:
        run_dir = args.run_dir or Path("runs") / cfg.name
    copies = run_fork.stages_to_copy(cfg, run_dir)  # also checks run.start_from before anything starts
    if args.nodes is not None:
        return _slurm(cfg, run_dir, args)
    if args.dry_run:
        print(to_yaml(cfg))
        print(f"run folder: {run_dir}")
        print(f"CPU kernels: {reproducibility.cpu_capability()} (run.cpu_kernels={cfg.run.cpu_kernels})")
        source = run_fork.source_folder(cfg) if copies else None
        stages = [(name, f"copy from {source}" if name in copies else action) for name, action in plan(cfg, run_dir)]
        for stage, action in stages:
            print(f"  {stage:<10} {action}")
        gpu = cfg.run.device == "cuda" or (cfg.run.device == "auto" and torch.cuda.is_available())
        memory = plan_memory(cfg, world=1, tasks_per_node=1, gpu=gpu)
        print(format_memory_plan(memory))
        _write_plan(run_dir, {"nodes": 0, "gpus_per_node": 0, "tasks": 1, "mode": "local", "preset": cfg.name,
                              "stages": [{"name": n, "action": a} for n, a in stages], "memory": memory})
        return 0
    return run_local(cfg, run_dir)


def _main_seeds(args: argparse.Namespace) -> int:
    """One run folder per seed under the run folder; the runs go one after another here (a failed seed stops the
    command: its folder resumes on the next call), or are submitted as one job each."""
    from . import report

    base = args.run_dir or Path("runs") / load_config(args.preset, args.overrides).name
    for seed in args.seeds:  # every seed's source, checked before the first seed runs for hours
        run_fork.source_folder(load_config(args.preset, [*args.overrides, f"run.seed={seed}"]))
    folders = []
    for seed in args.seeds:
        sub = argparse.Namespace(**{**vars(args), "seeds": None, "run_dir": base / f"seed{seed}",
                                    "overrides": [*args.overrides, f"run.seed={seed}"]})
        print(f"seed {seed}: run folder {sub.run_dir}", flush=True)
        status = _main(sub)
        if status != 0:
            return status
        folders.append(sub.run_dir)
    if args.dry_run or args.nodes is not None:
        if args.nodes is not None:
            print(f"when the jobs have finished: python -m scan_dist.report {' '.join(map(str, folders))}")
        return 0
    if not dist_env.detect("cpu").is_main:  # under torchrun every rank ran the seeds; one writes the report
        return 0
    return report.main([*map(str, folders), "--out", str(base / "report.md"), "--plots", str(base / "report_plots")])


def _read_launch_info(run_dir: Path) -> dict:
    path = run_dir / "launch.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def _write_plan(run_dir: Path, payload: dict) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    write_json(run_dir / "plan.json", payload)
    print(f"plan written to {run_dir / 'plan.json'}")


def _slurm(cfg: Config, run_dir: Path, args: argparse.Namespace) -> int:
    from . import cluster

    resources = cluster.resolve_resources(cfg, args.nodes, args.gpus_per_node)
    backend = cluster.job_backend(cfg, resources)
    if backend != cfg.dist.backend:
        print(f"note: {resources.tasks} tasks need a distributed engine; using dist.backend={backend}")
        cfg.dist.backend = backend
    if args.dry_run:
        the_plan = cluster.plan(cfg, run_dir, resources, plan(cfg, run_dir))
        print(_format_slurm_plan(the_plan))
        _write_plan(run_dir, the_plan)
        return 0
    cluster.require_slurm()
    RunContext(cfg, run_dir, setup_logging(None)).check_data_path()
    run_dir.mkdir(parents=True, exist_ok=True)
    write_config(run_dir, cfg)
    write_json(run_dir / "launch.json", {"mode": "slurm", "nodes": resources.nodes,
                                         "gpus_per_node": resources.gpus_per_node})
    job_id = cluster.submit(cfg, run_dir, resources)
    print(f"submitted job {job_id}: {resources.nodes} node(s) x {resources.tasks_per_node} task(s), "
          f"dist.backend={cfg.dist.backend}")
    print(f"  progress: tail -f {run_dir / 'log.txt'}")
    print(f"  task logs: {run_dir / 'slurm' / job_id}/")
    print(f"  python -m scan_dist.launch status {run_dir}   |   python -m scan_dist.launch cancel {run_dir}")
    if not args.wait:
        return 0
    state = cluster.wait(job_id, run_dir)
    print(f"job {job_id}: {state}")
    return 0 if state == "COMPLETED" else 1


def _format_slurm_plan(p: dict) -> str:
    r = p["resources"]
    lines = [f"SLURM plan for preset {p['preset']} -> run folder {p['run_dir']}",
             f"  {p['nodes']} node(s) x {p['tasks_per_node']} task(s) = {p['tasks']} processes, "
             f"{p['gpus_per_node']} GPU(s) per node, dist.backend={p['dist_backend']}",
             f"  per task: {r['cpus_per_task'] or 'default'} CPUs; per node: {r['mem_gb'] or 'default'} GB; "
             f"time limit {r['time_min']} min per job, USR2 {r['signal_delay_s']} s before it, "
             f"up to {r['max_requeues']} requeues on time limit",
             f"  partition={r['partition']} account={r['account']} qos={r['qos']} constraint={r['constraint']} "
             f"exclusive={r['exclusive']}",
             "  stages (one job runs them all; a requeued job skips finished ones and resumes the current one):"]
    for stage in p["stages"]:
        lines.append(f"    {stage['name']:<10} {stage['action']:<12} -> {', '.join(stage['artifacts'])}")
    est = p["estimate"]
    if est.get("gpu_hours") is not None:
        lines.append(f"  estimate: {est['gpu_hours']} GPU-hours ({est['wall_hours_at_perfect_scaling']} h wall at "
                     f"perfect scaling) for {est['train_images']} training images at {est['throughput_img_s_per_gpu']:.0f} "
                     f"img/s per GPU ({est['throughput_source']}); per stage: {est['per_stage_gpu_hours']}")
    else:
        lines.append(f"  estimate: not available ({est.get('why')})")
    lines.append(format_memory_plan(p["memory"]))
    lines += ["  sbatch script submitit will write:", *("    " + line for line in p["sbatch"].splitlines())]
    return "\n".join(lines)


if __name__ == "__main__":
    exit_process(main())
