"""SLURM through submitit: `python -m scan_dist.launch --nodes N PRESET` submits the whole pipeline as one job.

One job for all stages, not a chain of dependent jobs: every stage uses all the job's GPUs (pretext, SCAN and
self-labelling train data-parallel; embedding and evaluation shard their inference; mining shards the k-NN bank), and
the stage boundaries last seconds, so one allocation avoids a queue wait between stages and one requeue rule covers
everything. (A chain pays off only when stages want very different resources, e.g. head-only SCAN on cached
features; the profile's per-job resources are the knob for that later.)

Resources come from a cluster profile (`slurm/profiles/<name>.yaml`, `slurm.profile=NAME` or a path) with the
`slurm.*` config keys on top. The job runs `PipelineJob` in every task (one task per GPU); each task finds its rank
from SLURM's variables (`distributed/env.py`). On SIGUSR2 — sent `slurm.signal_delay_s` before the time limit, or by a
preemption — submitit calls `PipelineJob.checkpoint` in rank 0 and requeues the same job id; the requeued tasks
skip finished stages and resume the running one from its last checkpoint (`run.checkpoint_every_steps`), exactly.
The run folder must be on a filesystem every node sees. Job ids are recorded in `<run>/jobs.json` for
`status RUN_DIR` and `cancel RUN_DIR`; per-task logs are in `<run>/slurm/<jobid>/`, rank 0's progress in
`<run>/log.txt`.
"""
from __future__ import annotations

import datetime
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import submitit
import yaml

from . import reproducibility
from .memory_plan import plan_memory
from .config import Config, SlurmConfig, load_config
from .errors import ConfigError
from .io_utils import write_json
from .trainer import scaled_epochs

def _profile_dir() -> Path:
    """slurm/profiles of the source tree, or the copy installed as the scan_dist.slurm_profiles package."""
    in_tree = Path(__file__).resolve().parent.parent / "slurm" / "profiles"
    if in_tree.is_dir():
        return in_tree
    import importlib.resources

    return Path(str(importlib.resources.files("scan_dist.slurm_profiles")))


PROFILE_DIR = _profile_dir()
TERMINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
                   "DEADLINE", "PREEMPTED"}
NO_SLURM = ("--nodes needs SLURM, but sbatch is not on PATH; use --local to run here, or --dry-run to print the "
            "plan without submitting")

# Training throughput per GPU used for the GPU-hour estimate of --dry-run (images/s, forward + backward).
# None of these was measured in this repository: resnet50's figure (one H100, bf16, synthetic data) was reported
# from outside it and benchmarks/gpu_check.sh measures it on the first GPU; the others are assumptions. The plan
# prints each figure's source.
THROUGHPUT = {
    "resnet50": (3981.0, "reported from outside this repository for one H100, bf16 eager, batch 256, synthetic "
                         "data; not yet measured here (benchmarks/gpu_check.sh measures it)"),
    "resnet18_stl": (8000.0, "assumed"),
    "resnet18_cifar": (25000.0, "assumed"),
    "cnn_small": (50000.0, "assumed"),
}
# Training images per preset (published dataset sizes) for the estimate; data.max_images caps them.
TRAIN_IMAGES = {"imagenet1k": 1281167, "imagenet200": 260000, "imagenet100": 130000, "imagenet50": 65000,
                "cifar10": 50000, "cifar20": 50000, "stl10": 105000, "fashion_mnist": 60000, "demo": 60000,
                "smoke": 60000}


@dataclass
class Resources:
    """What one job asks SLURM for."""

    nodes: int
    gpus_per_node: int
    tasks_per_node: int
    cpus_per_task: int | None
    mem_gb: float | None
    time_min: int
    signal_delay_s: int
    max_requeues: int
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None
    exclusive: bool | None = None
    extra_sbatch: list | None = None
    setup: list | None = None

    @property
    def tasks(self) -> int:
        return self.nodes * self.tasks_per_node


def available_profiles() -> list[str]:
    return sorted(p.stem for p in PROFILE_DIR.glob("*.yaml"))


def load_profile(name: str) -> dict:
    path = Path(name) if name.endswith((".yaml", ".yml")) or os.sep in name else PROFILE_DIR / f"{name}.yaml"
    if not path.is_file():
        raise ConfigError(f"slurm.profile={name}: no profile at {path}; available: {', '.join(available_profiles())} "
                          "(or give a path to a profile YAML)")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"slurm profile {path} is not valid YAML: {exc}") from None
    valid = {f.name for f in fields(SlurmConfig)} - {"profile"}
    unknown = sorted(set(data) - valid)
    if unknown:
        raise ConfigError(f"slurm profile {path}: unknown key(s) {', '.join(unknown)}; valid: {', '.join(sorted(valid))}")
    return data


def resolve_resources(cfg: Config, nodes: int, gpus_per_node: int | None = None) -> Resources:
    """Profile values, then the config's slurm.* keys that are set, then --gpus-per-node."""
    if nodes < 1:
        raise ConfigError(f"--nodes must be at least 1; got {nodes}")
    merged = load_profile(cfg.slurm.profile)
    merged.update({k: v for k, v in asdict(cfg.slurm).items() if v is not None and k != "profile"})
    if gpus_per_node is not None:
        merged["gpus_per_node"] = gpus_per_node
    gpus = int(merged.get("gpus_per_node") or 0)
    tasks = int(merged.get("tasks_per_node") or (gpus if gpus > 0 else 1))
    if gpus > 0 and tasks != gpus:
        raise ConfigError(f"slurm.tasks_per_node={tasks} but {gpus} GPUs per node: one task per GPU is required")
    return Resources(nodes=nodes, gpus_per_node=gpus, tasks_per_node=tasks,
                     cpus_per_task=merged.get("cpus_per_task"), mem_gb=merged.get("mem_gb"),
                     time_min=int(merged.get("time_min") or 60), signal_delay_s=int(merged.get("signal_delay_s") or 120),
                     max_requeues=int(merged.get("max_requeues") if merged.get("max_requeues") is not None else 3),
                     partition=merged.get("partition"), account=merged.get("account"), qos=merged.get("qos"),
                     constraint=merged.get("constraint"), exclusive=merged.get("exclusive"),
                     extra_sbatch=list(merged.get("extra_sbatch") or []), setup=[
                         *(merged.get("setup") or []),
                         # run.cpu_kernels: in place before the job's Python starts (reproducibility.py)
                         *(f"export {key}={value}" for key, value in reproducibility.CPU_KERNEL_ENV[
                             cfg.run.cpu_kernels].items())])


def _extra_flags(lines: list[str]) -> dict:
    """["--mail-type=END", "--reservation x", "--requeue"] -> {"mail-type": "END", "reservation": "x", "requeue": True}"""
    flags = {}
    for line in lines:
        text = line.strip()
        if text.startswith("#SBATCH"):
            text = text[len("#SBATCH"):].strip()
        match = re.fullmatch(r"--([A-Za-z0-9-]+)(?:[= ](.+))?", text)
        if not match:
            raise ConfigError(f"slurm.extra_sbatch entry {line!r} is not of the form --key=value or --flag")
        flags[match.group(1)] = match.group(2).strip() if match.group(2) else True
    return flags


def executor_parameters(res: Resources, job_name: str) -> dict:
    """The parameters of submitit's SlurmExecutor (sbatch's names) for these resources."""
    params: dict = {"job_name": job_name, "nodes": res.nodes, "ntasks_per_node": res.tasks_per_node,
                    "time": res.time_min, "signal_delay_s": res.signal_delay_s}
    if res.gpus_per_node:
        params["gpus_per_node"] = res.gpus_per_node
    if res.cpus_per_task:
        params["cpus_per_task"] = res.cpus_per_task
    if res.mem_gb:
        params["mem"] = f"{int(res.mem_gb)}GB" if float(res.mem_gb).is_integer() else f"{int(res.mem_gb * 1024)}MB"
    for key in ("partition", "account", "qos", "constraint"):
        if getattr(res, key):
            params[key] = getattr(res, key)
    if res.exclusive:
        params["exclusive"] = True
    if res.extra_sbatch:
        params["additional_parameters"] = _extra_flags(res.extra_sbatch)
    if res.setup:
        params["setup"] = list(res.setup)
    return params


def sbatch_script(res: Resources, run_dir: Path, job_name: str) -> str:
    """The sbatch file submitit writes for this job (its own generator, so the plan shows what will be submitted)."""
    from submitit.slurm.slurm import _make_sbatch_string  # submitit's generator; stable across 1.x

    folder = Path(run_dir).resolve() / "slurm" / "%j"
    command = " ".join([shlex.quote(sys.executable), "-u -m submitit.core._submit", shlex.quote(str(folder))])
    return _make_sbatch_string(command=command, folder=folder, **executor_parameters(res, job_name))


def estimate_gpu_hours(cfg: Config, res: Resources) -> dict:
    """Paper estimate from dataset size, epochs and an assumed per-GPU throughput (stated in the result)."""
    images = TRAIN_IMAGES.get(cfg.name)
    if cfg.data.max_images:
        images = min(images or cfg.data.max_images, cfg.data.max_images)
    speed, source = THROUGHPUT.get(cfg.model.backbone, (None, "unknown backbone"))
    if images is None or speed is None:
        return {"gpu_hours": None, "why": "unknown dataset size or backbone throughput"}
    def epochs(section) -> int:  # the epochs the stage will run: raised by <stage>.min_steps on small datasets
        return scaled_epochs(section.epochs, section.min_steps, max(1, images // section.batch_size))

    # Views that go forward and backward through the backbone; inference passes count a third of a training one.
    work = {
        "pretext": 0 if cfg.model.pretrained else 2 * epochs(cfg.pretext) * images,
        "embed": images / 3,
        "scan": (2 * epochs(cfg.scan) * images if cfg.scan.mode == "full"
                 else (cfg.scan.cached_views + 1) * images / 3 if cfg.scan.mode == "cached" else images / 3),
        "selflabel": 2 * epochs(cfg.selflabel) * images if cfg.selflabel.enabled else 0,
        "evaluate": images / 3 / 10,
    }
    hours = {stage: views / speed / 3600 for stage, views in work.items()}
    gpus = max(1, res.nodes * res.gpus_per_node)
    total = sum(hours.values())
    return {"gpu_hours": round(total, 2), "wall_hours_at_perfect_scaling": round(total / gpus, 2),
            "per_stage_gpu_hours": {k: round(v, 3) for k, v in hours.items()}, "train_images": images,
            "throughput_img_s_per_gpu": speed, "throughput_source": source}


def plan(cfg: Config, run_dir: Path, res: Resources, stage_plan: list[tuple[str, str]]) -> dict:
    from .pipeline import STAGE_ARTIFACTS

    return {
        "nodes": res.nodes, "gpus_per_node": res.gpus_per_node, "tasks_per_node": res.tasks_per_node,
        "tasks": res.tasks, "preset": cfg.name, "run_dir": str(run_dir), "dist_backend": job_backend(cfg, res),
        "resources": asdict(res),
        "stages": [{"name": name, "action": action, "artifacts": STAGE_ARTIFACTS.get(name, [])}
                   for name, action in stage_plan],
        "sbatch": sbatch_script(res, run_dir, job_name(cfg)),
        "estimate": estimate_gpu_hours(cfg, res),
        "memory": plan_memory(cfg, world=res.tasks, tasks_per_node=res.tasks_per_node, gpu=res.gpus_per_node > 0),
    }


def job_name(cfg: Config) -> str:
    return f"scan_{cfg.name}"


def job_backend(cfg: Config, res: Resources) -> str:
    """A multi-task job needs a distributed engine; `none` becomes `ddp` (said in the log and the plan)."""
    return "ddp" if res.tasks > 1 and cfg.dist.backend == "none" else cfg.dist.backend


class PipelineJob(submitit.helpers.Checkpointable):
    """What every task of the job runs: the pipeline as this task's rank (rank and world from SLURM's variables).

    `checkpoint` (called by submitit in rank 0 on SIGUSR2: time limit or preemption) requeues the same callable;
    the state that survives is what the stages saved: DONE markers and stage checkpoints.
    """

    def __init__(self, run_dir: str):
        self.run_dir = run_dir

    def __call__(self) -> int:
        import torch

        from .job import run_local  # noqa: PLC0415  (keeps torch out of the CLI's import time)

        cfg = load_config(str(Path(self.run_dir) / "config.yaml"))
        if cfg.run.threads is None and os.environ.get("SLURM_CPUS_PER_TASK"):
            torch.set_num_threads(int(os.environ["SLURM_CPUS_PER_TASK"]))
        code = run_local(cfg, Path(self.run_dir))
        # Everything is on disk now. A time-limit USR2 arriving while submitit saves the result or the interpreter
        # shuts down (Python then restores the default action: terminate) killed a finished task in the tests, and
        # SLURM marked the completed job FAILED. There is nothing left to checkpoint: ignore it.
        signal.signal(signal.SIGUSR2, signal.SIG_IGN)
        return code

    def checkpoint(self, *args, **kwargs):
        _append_event(Path(self.run_dir), {"event": "requeue", "job_id": os.environ.get("SLURM_JOB_ID")})
        return super().checkpoint(*args, **kwargs)


def _append_event(run_dir: Path, event: dict) -> None:
    jobs = read_jobs(run_dir)
    jobs.setdefault("events", []).append({**event, "time": _now()})
    write_json(run_dir / "jobs.json", jobs)


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def read_jobs(run_dir: Path) -> dict:
    path = Path(run_dir) / "jobs.json"
    if not path.is_file():
        return {"jobs": []}
    return json.loads(path.read_text())


def require_slurm() -> None:
    if shutil.which("sbatch") is None:
        raise ConfigError(NO_SLURM)


def submit(cfg: Config, run_dir: Path, res: Resources) -> str:
    """Submit the pipeline (config already written to run_dir/config.yaml); returns the job id."""
    require_slurm()
    folder = Path(run_dir).resolve() / "slurm" / "%j"
    executor = submitit.SlurmExecutor(folder=folder, max_num_timeout=res.max_requeues)
    executor.update_parameters(**executor_parameters(res, job_name(cfg)))
    try:
        job = executor.submit(PipelineJob(str(Path(run_dir).resolve())))
    except subprocess.CalledProcessError as exc:
        output = (exc.output or b"").decode(errors="replace") if isinstance(exc.output, bytes) else str(exc.output)
        raise ConfigError(f"sbatch refused the job: {output.strip() or exc}") from None
    jobs = read_jobs(run_dir)
    jobs["jobs"].append({"job_id": str(job.job_id), "submitted": _now(), "nodes": res.nodes,
                         "tasks_per_node": res.tasks_per_node, "gpus_per_node": res.gpus_per_node,
                         "logs": str(Path(run_dir).resolve() / "slurm" / str(job.job_id))})
    write_json(run_dir / "jobs.json", jobs)
    return str(job.job_id)


def job_state(job_id: str) -> dict:
    """`scontrol show job` fields of one job ({} when SLURM no longer knows it)."""
    try:
        out = subprocess.run(["scontrol", "show", "job", "-o", str(job_id)], capture_output=True, text=True,
                             timeout=30)
    except (OSError, subprocess.SubprocessError):
        return {}
    if out.returncode != 0 or not out.stdout.strip():
        return {}
    fields_ = dict(item.split("=", 1) for item in out.stdout.split() if "=" in item)
    return {"state": fields_.get("JobState"), "run_time": fields_.get("RunTime"), "nodes": fields_.get("NodeList"),
            "restarts": fields_.get("Restarts"), "reason": fields_.get("Reason"), "time_limit": fields_.get("TimeLimit")}


def wait(job_id: str, run_dir: Path, poll_s: float = 3.0, timeout_s: float | None = None) -> str:
    """Block until the job reaches a terminal state; returns it (COMPLETED when SLURM forgot a job whose run
    finished, i.e. metrics.json is newer than the submission)."""
    start = time.time()
    while True:
        state = job_state(job_id).get("state")
        if state in TERMINAL_STATES:
            return state
        if state is None:
            metrics = Path(run_dir) / "metrics.json"
            return "COMPLETED" if metrics.is_file() and metrics.stat().st_mtime >= start - 5 else "UNKNOWN"
        if timeout_s is not None and time.time() - start > timeout_s:
            return f"STILL {state}"
        time.sleep(poll_s)


def status_text(run_dir: Path) -> str:
    from .pipeline import plan as stage_plan

    run_dir = Path(run_dir)
    jobs = read_jobs(run_dir)
    if not jobs["jobs"]:
        raise ConfigError(f"{run_dir} has no SLURM jobs (no jobs.json); was it launched with --nodes?")
    lines = [f"run {run_dir}"]
    for job in jobs["jobs"]:
        info = job_state(job["job_id"])
        state = info.get("state") or "gone from SLURM (finished a while ago)"
        lines.append(f"  job {job['job_id']}: {state}" + (f", run time {info['run_time']}, restarts "
                                                           f"{info['restarts']}, nodes {info['nodes']}" if info else ""))
    requeues = [e for e in jobs.get("events", []) if e.get("event") == "requeue"]
    if requeues:
        lines.append(f"  requeued {len(requeues)} time(s), last at {requeues[-1]['time']}")
    config = run_dir / "config.yaml"
    if config.is_file():
        cfg = load_config(str(config))
        lines.append("  stages: " + ", ".join(f"{name} {'done' if action.startswith('skip') else 'pending'}"
                                              for name, action in stage_plan(cfg, run_dir)))
    lines.append(f"  follow: tail -f {run_dir / 'log.txt'}")
    return "\n".join(lines)


def cancel(run_dir: Path) -> list[str]:
    """scancel every job of the run that SLURM still runs or queues; returns their ids."""
    cancelled = []
    for job in read_jobs(run_dir)["jobs"]:
        state = job_state(job["job_id"]).get("state")
        if state and state not in TERMINAL_STATES:
            subprocess.run(["scancel", job["job_id"]], check=False, timeout=30)
            cancelled.append(job["job_id"])
    _append_event(Path(run_dir), {"event": "cancel", "job_ids": cancelled})
    return cancelled
