"""Who am I in the job: a frozen description of this process (rank, world, device) and the process-group setup.

`detect()` reads the launcher's environment, in this order of precedence:

1. torchrun (and anything torchrun-compatible): RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR,
   MASTER_PORT.
2. SLURM (one task per GPU, started by srun or by submitit on SLURM): SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID,
   the tasks of this node from SLURM_NTASKS_PER_NODE or SLURM_TASKS_PER_NODE ("2(x3),1" form, indexed by
   SLURM_NODEID); the master is the first host of SLURM_JOB_NODELIST (expanded by `scontrol show hostnames`, or by
   a small pure-python expander when scontrol is absent or fails) unless MASTER_ADDR is set; the port is MASTER_PORT
   or 20000 + SLURM_JOB_ID % 20000, so every task of a job derives the same port without talking to the others.
3. submitit outside SLURM (its local executor): `submitit.JobEnvironment` when submitit is importable and
   SUBMITIT_EXECUTOR is set.
4. Otherwise a single process.

`init_process_group()` then exports the env:// variables (DeepSpeed reads them too) and creates the default group
with a timeout, so a dead or stuck rank makes collectives raise instead of hanging forever.
"""
from __future__ import annotations

import contextlib
import datetime
import os
import re
import shutil
import subprocess
import zlib
from dataclasses import dataclass
from typing import Mapping
from unittest import mock

import torch
import torch.distributed as dist

from ..errors import ConfigError

DEFAULT_MASTER_ADDR = "127.0.0.1"
DEFAULT_MASTER_PORT = 29500
SLURM_PORT_BASE = 20000
SLURM_PORT_RANGE = 20000


@dataclass(frozen=True)
class DistEnv:
    rank: int
    local_rank: int
    world_size: int
    local_world_size: int
    master_addr: str
    master_port: int
    source: str  # "single" | "torchrun" | "slurm" | "submitit"
    device: torch.device  # cuda:local_rank when CUDA is available and device_pref allows, else cpu
    backend: str  # "nccl" on CUDA, "gloo" on CPU

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


# --------------------------------------------------------------------------- #
# Parsing helpers
# --------------------------------------------------------------------------- #
def _int(environ: Mapping[str, str], name: str, default: int | None = None) -> int:
    raw = environ.get(name)
    if raw is None or raw.strip() == "":
        if default is None:
            raise ConfigError(f"environment variable {name} is not set")
        return default
    try:
        return int(raw.strip())
    except ValueError:
        raise ConfigError(f"environment variable {name}={raw!r} is not an integer") from None


def parse_tasks_per_node(value: str, variable: str = "SLURM_TASKS_PER_NODE") -> list[int]:
    """SLURM's compressed per-node task counts: "2(x3),1" -> [2, 2, 2, 1]."""
    counts: list[int] = []
    for part in value.split(","):
        match = re.fullmatch(r"\s*(\d+)\s*(?:\(x(\d+)\))?\s*", part)
        if not match:
            raise ConfigError(f"environment variable {variable}={value!r} is not of the form '2(x3),1'")
        counts.extend([int(match.group(1))] * int(match.group(2) or 1))
    return counts


def _split_top_level(text: str) -> list[str]:
    """Split on commas that are not inside brackets: "a[1,2],b" -> ["a[1,2]", "b"]."""
    parts, depth, start = [], 0, 0
    for i, char in enumerate(text):
        if char == "[":
            depth += 1
        elif char == "]":
            depth -= 1
            if depth < 0:
                raise ValueError("unbalanced ']'")
        elif char == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    if depth != 0:
        raise ValueError("unbalanced '['")
    parts.append(text[start:])
    return [p.strip() for p in parts if p.strip()]


def _expand_host(expr: str) -> list[str]:
    """One host expression, possibly with several bracket groups: "r[1-2]n[01,03]" -> r1n01 r1n03 r2n01 r2n03."""
    open_at = expr.find("[")
    if open_at < 0:
        return [expr]
    close_at = expr.index("]", open_at)
    prefix, body, rest = expr[:open_at], expr[open_at + 1:close_at], expr[close_at + 1:]
    values: list[str] = []
    for item in body.split(","):
        item = item.strip()
        if "-" in item:
            low, high = item.split("-", 1)
            if not (low.isdigit() and high.isdigit()) or int(high) < int(low):
                raise ValueError(f"bad range {item!r}")
            width = len(low)  # "01-03" keeps its zero padding
            values.extend(str(n).zfill(width) for n in range(int(low), int(high) + 1))
        elif item.isdigit():
            values.append(item)
        else:
            raise ValueError(f"bad item {item!r}")
    tails = _expand_host(rest)
    return [f"{prefix}{value}{tail}" for value in values for tail in tails]


def expand_nodelist_python(nodelist: str) -> list[str]:
    """Pure-python expansion of a SLURM node list: "node[01-03,07],gpu5" -> node01 node02 node03 node07 gpu5."""
    try:
        hosts = [host for expr in _split_top_level(nodelist) for host in _expand_host(expr)]
    except ValueError as exc:
        raise ConfigError(f"environment variable SLURM_JOB_NODELIST={nodelist!r} cannot be parsed ({exc})") from None
    if not hosts:
        raise ConfigError(f"environment variable SLURM_JOB_NODELIST={nodelist!r} names no host")
    return hosts


def expand_nodelist(nodelist: str) -> list[str]:
    """`scontrol show hostnames` when available (it knows every SLURM syntax), else the python expander."""
    scontrol = shutil.which("scontrol")
    if scontrol:
        try:
            result = subprocess.run([scontrol, "show", "hostnames", nodelist], capture_output=True, text=True,
                                    timeout=20, check=False)
            hosts = result.stdout.split()
            if result.returncode == 0 and hosts:
                return hosts
        except (OSError, subprocess.SubprocessError):
            pass
    return expand_nodelist_python(nodelist)


def _port(environ: Mapping[str, str], name: str = "MASTER_PORT", default: int = DEFAULT_MASTER_PORT) -> int:
    port = _int(environ, name, default)
    if not 1 <= port <= 65535:
        raise ConfigError(f"environment variable {name}={port} is not a TCP port (1-65535)")
    return port


def slurm_port(job_id: str) -> int:
    """A port every task of one job derives alike: 20000 + job id % 20000 (a hash for non-numeric ids)."""
    number = int(job_id) if job_id.isdigit() else zlib.crc32(job_id.encode())
    return SLURM_PORT_BASE + number % SLURM_PORT_RANGE


# --------------------------------------------------------------------------- #
# Sources
# --------------------------------------------------------------------------- #
def _from_torchrun(environ: Mapping[str, str]) -> dict:
    world = _int(environ, "WORLD_SIZE")
    rank = _int(environ, "RANK")
    # torchrun always sets LOCAL_RANK; a hand-made single-process env may omit it.
    local_rank = _int(environ, "LOCAL_RANK", 0 if world == 1 else None)
    local_world = _int(environ, "LOCAL_WORLD_SIZE", world)
    if world > 1 and not environ.get("MASTER_ADDR"):
        raise ConfigError("environment variable MASTER_ADDR is not set (needed when WORLD_SIZE > 1)")
    if world > 1 and not environ.get("MASTER_PORT"):
        raise ConfigError("environment variable MASTER_PORT is not set (needed when WORLD_SIZE > 1)")
    return dict(rank=rank, world_size=world, local_rank=local_rank, local_world_size=local_world,
                master_addr=environ.get("MASTER_ADDR") or DEFAULT_MASTER_ADDR, master_port=_port(environ),
                source="torchrun", names=("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"))


def _from_slurm(environ: Mapping[str, str]) -> dict:
    ntasks_var = "SLURM_NTASKS" if "SLURM_NTASKS" in environ else "SLURM_NPROCS"
    world = _int(environ, ntasks_var)
    rank = _int(environ, "SLURM_PROCID")
    local_rank = _int(environ, "SLURM_LOCALID", 0 if world == 1 else None)
    local_var = "SLURM_NTASKS_PER_NODE"
    if environ.get("SLURM_NTASKS_PER_NODE"):
        local_world = parse_tasks_per_node(environ["SLURM_NTASKS_PER_NODE"], "SLURM_NTASKS_PER_NODE")[0]
    elif environ.get("SLURM_TASKS_PER_NODE"):
        local_var = "SLURM_TASKS_PER_NODE"
        per_node = parse_tasks_per_node(environ["SLURM_TASKS_PER_NODE"])
        node = _int(environ, "SLURM_NODEID", 0)
        if not 0 <= node < len(per_node):
            raise ConfigError(f"environment variable SLURM_NODEID={node} is outside SLURM_TASKS_PER_NODE="
                              f"{environ['SLURM_TASKS_PER_NODE']!r} ({len(per_node)} nodes)")
        local_world = per_node[node]
    else:
        local_world = world
    if environ.get("MASTER_ADDR"):
        master = environ["MASTER_ADDR"]
    elif environ.get("SLURM_JOB_NODELIST") or environ.get("SLURM_NODELIST"):
        master = expand_nodelist(environ.get("SLURM_JOB_NODELIST") or environ["SLURM_NODELIST"])[0]
    elif world == 1:
        master = DEFAULT_MASTER_ADDR
    else:
        raise ConfigError("environment variable SLURM_JOB_NODELIST is not set (needed to find the master host)")
    if environ.get("MASTER_PORT"):
        port = _port(environ)
    elif environ.get("SLURM_JOB_ID"):
        port = slurm_port(environ["SLURM_JOB_ID"].strip())
    else:
        port = DEFAULT_MASTER_PORT
    return dict(rank=rank, world_size=world, local_rank=local_rank, local_world_size=local_world,
                master_addr=master, master_port=port, source="slurm",
                names=("SLURM_PROCID", ntasks_var, "SLURM_LOCALID", local_var))


@contextlib.contextmanager
def _os_environ(environ: Mapping[str, str]):
    """submitit reads os.environ itself: show it `environ` when a test passes its own mapping."""
    if environ is os.environ:
        yield
    else:
        with mock.patch.dict(os.environ, dict(environ), clear=True):
            yield


def _from_submitit(environ: Mapping[str, str]) -> dict | None:
    if not environ.get("SUBMITIT_EXECUTOR"):
        return None
    try:
        import submitit
    except ImportError:
        return None
    with _os_environ(environ):
        try:
            job = submitit.JobEnvironment()
            rank, world, local_rank = job.global_rank, job.num_tasks, job.local_rank
            nodes = max(job.num_nodes, 1)
            hosts = list(job.hostnames)
            job_id = str(job.job_id)
        except (RuntimeError, KeyError, ValueError) as exc:
            raise ConfigError(f"SUBMITIT_EXECUTOR is set but submitit's job environment is unreadable: {exc}") from None
    local_world = max(world // nodes, 1)
    master = environ.get("MASTER_ADDR") or (hosts[0] if hosts else DEFAULT_MASTER_ADDR)
    port = _port(environ) if environ.get("MASTER_PORT") else slurm_port(job_id)
    return dict(rank=rank, world_size=world, local_rank=local_rank, local_world_size=local_world,
                master_addr=master, master_port=port, source="submitit",
                names=("submitit global_rank", "submitit num_tasks", "submitit local_rank", "submitit tasks per node"))


def _device(device_pref: str, local_rank: int) -> torch.device:
    if device_pref not in ("auto", "cpu", "cuda"):
        raise ConfigError(f"run.device must be auto, cpu or cuda; got {device_pref!r}")
    if device_pref == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        if device_pref == "cuda":
            raise ConfigError("run.device=cuda but CUDA is not available on this machine (use run.device=cpu or auto)")
        return torch.device("cpu")
    count = torch.cuda.device_count()
    if local_rank >= count:
        raise ConfigError(f"local rank {local_rank} has no GPU: this node has {count} CUDA device(s); "
                          "start one task per GPU")
    return torch.device("cuda", local_rank)


def detect(device_pref: str = "auto", environ: Mapping[str, str] | None = None) -> DistEnv:
    """Describe this process from the launcher's environment (see the module docstring for the precedence)."""
    environ = os.environ if environ is None else environ
    if "RANK" in environ or "WORLD_SIZE" in environ:
        info = _from_torchrun(environ)
    elif "SLURM_PROCID" in environ and ("SLURM_NTASKS" in environ or "SLURM_NPROCS" in environ):
        info = _from_slurm(environ)
    else:
        info = _from_submitit(environ) or dict(
            rank=0, world_size=1, local_rank=0, local_world_size=1,
            master_addr=environ.get("MASTER_ADDR") or DEFAULT_MASTER_ADDR,
            master_port=_port(environ), source="single", names=("rank", "world size", "local rank", "local world"))
    rank_name, world_name, local_name, local_world_name = info.pop("names")
    if info["world_size"] < 1:
        raise ConfigError(f"{world_name}={info['world_size']} must be at least 1")
    if not 0 <= info["rank"] < info["world_size"]:
        raise ConfigError(f"{rank_name}={info['rank']} must be in [0, {world_name}={info['world_size']})")
    if not 1 <= info["local_world_size"] <= info["world_size"]:
        raise ConfigError(f"{local_world_name}={info['local_world_size']} must be in [1, "
                          f"{world_name}={info['world_size']}]")
    if not 0 <= info["local_rank"] < info["local_world_size"]:
        raise ConfigError(f"{local_name}={info['local_rank']} must be in [0, "
                          f"{local_world_name}={info['local_world_size']})")
    device = _device(device_pref, info["local_rank"])
    return DistEnv(device=device, backend="nccl" if device.type == "cuda" else "gloo", **info)


# --------------------------------------------------------------------------- #
# Process group
# --------------------------------------------------------------------------- #
def export_environ(env: DistEnv) -> None:
    """The env:// variables torch.distributed and DeepSpeed read."""
    os.environ.update(MASTER_ADDR=env.master_addr, MASTER_PORT=str(env.master_port), RANK=str(env.rank),
                      WORLD_SIZE=str(env.world_size), LOCAL_RANK=str(env.local_rank),
                      LOCAL_WORLD_SIZE=str(env.local_world_size))


def init_process_group(env: DistEnv, timeout_s: float = 600) -> None:
    """Create the default process group (idempotent; a no-op for a single process).

    The timeout bounds every collective: with gloo a collective whose peer is gone or stuck raises after it; with
    nccl the watchdog aborts the communicator (and the process) after it.
    """
    if env.device.type == "cuda":
        torch.cuda.set_device(env.device)
    if env.world_size == 1:
        return
    if dist.is_initialized():
        if dist.get_world_size() != env.world_size or dist.get_rank() != env.rank:
            raise RuntimeError(f"a process group already exists with rank {dist.get_rank()} of "
                               f"{dist.get_world_size()}, not rank {env.rank} of {env.world_size}")
        return
    export_environ(env)
    kwargs = {}
    if env.backend == "nccl":
        kwargs["device_id"] = env.device  # binds the communicator to this GPU (eager init, correct barrier)
    dist.init_process_group(backend=env.backend, init_method="env://", rank=env.rank, world_size=env.world_size,
                            timeout=datetime.timedelta(seconds=float(timeout_s)), **kwargs)


def destroy_process_group() -> None:
    """Tear down the default group if there is one (idempotent)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
