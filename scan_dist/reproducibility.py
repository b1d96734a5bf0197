"""`run.deterministic`: make a CUDA run repeat itself to the last bit, at some cost in speed.

A CPU run of this project is already bit-reproducible (same seed, same thread count: the demo gives the same
digits every time), and the data's randomness never depends on the GPU or on worker and rank counts
(data/sampling.py). On a GPU the default convolution and reduction algorithms are not: the `fashion_mnist` preset
run twice with seed 0 on one H200 ended 71.17 and 71.58 (benchmarks/results/accuracy_history.md, sixth pass).
With this switch torch picks deterministic algorithms (cuDNN convolutions, index_add, scatter) and cuBLAS a fixed
workspace; an operation that has no deterministic CUDA implementation warns once, naming itself, instead of
stopping the run (warn_only), so a user sees what still varies. The project's own Triton kernels reduce in a
fixed order either way.

It is not part of any stage's config hash: it changes how reproducible a stage is, not what it computes.

`machine()` names what a stage's float results depend on beyond its settings (processor, the instruction set torch
dispatches its CPU kernels to, threads, torch build, GPU); every stage's `DONE` marker and `metrics.json`
(`machines`) keep it, and `python -m scan_dist.report` marks comparisons across kinds (`same_kind`). The same seed
gives the same digits only on the same kind of machine: the demo's seed 0 ended 74.14 on one 2-core VM and 71.38 on
an AMD EPYC one (benchmarks/results/accuracy_history.md, seventh pass), with identical code.

`run.cpu_kernels=avx2` removes the largest part of that: on x86 the kind that matters is the width of the kernels
(AVX2 or AVX-512), and capped at AVX2 a processor with AVX-512 gives an AVX2 processor's digits (the demo's seed 0
on an AVX-512 AMD EPYC, capped: 76.85 / SCAN stage 76.04, the digits of the AVX2-only AMD EPYC; uncapped 74.42 /
72.78, twenty-sixth pass). That holds between AMD processors only: on an Intel Xeon with AVX-512 and AMX, capped
the same way, seed 0 ended 72.24 / SCAN stage 72.34 (twenty-ninth pass), its own draw. Which library differs is not
measured (oneDNN sizes some blocking by the caches; MKL may take vendor-specific paths, and its reproducibility mode,
MKL_CBWR, fixes branches on Intel processors only), so count the cap as one kind of digits per vendor.
"""
from __future__ import annotations

import logging
import os
import platform
from typing import Mapping

import torch

from .errors import ConfigError

# cuBLAS picks its reduction split by workspace; a fixed workspace makes it deterministic (CUDA >= 10.2 docs).
CUBLAS_WORKSPACE = ":4096:8"


def apply(deterministic: bool) -> str | None:
    """Set the process-wide switches; returns a line for the log when anything was switched on."""
    if not deterministic:
        return None
    # Read when the first cuBLAS handle is made: set it before any matmul on the GPU (the launcher calls this
    # before the pipeline), and never override a user's own setting.
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_WORKSPACE)
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
    return (f"run.deterministic: deterministic algorithms on (cuDNN deterministic, cuBLAS workspace "
            f"{os.environ['CUBLAS_WORKSPACE_CONFIG']}); an operation without one warns by name")


# run.cpu_kernels: the widest instruction set the CPU kernels may use. torch's vectorised kernels (ATen), oneDNN's
# convolutions and MKL's matrix products each pick theirs from the processor, once, at their first use, unless these
# variables cap it; a kernel of another width adds floats in another order, and SCAN grows that last-bit difference
# into another clustering (the demo's seed 3: 76.6 with AVX-512 kernels, 68.7 with AVX2 ones). AVX2 is the common
# level of x86-64 processors since 2013 (Haswell, Zen), so capped there a seed gives one set of digits on all of them.
CPU_KERNEL_ENV: dict[str, dict[str, str]] = {
    "native": {},
    "avx2": {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"},
}


def _on_x86() -> bool:
    return platform.machine().lower() in ("x86_64", "amd64")


def cpu_kernel_env(choice: str, environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The variables `run.cpu_kernels=choice` needs that `environ` (this process's environment) lacks or sets
    otherwise; empty when the limit is in place, for `native`, and off x86 (the caps name x86 instruction sets)."""
    if choice not in CPU_KERNEL_ENV:
        raise ConfigError(f"run.cpu_kernels={choice!r} is unknown; choose {' or '.join(CPU_KERNEL_ENV)}")
    if not _on_x86():
        return {}
    environ = os.environ if environ is None else environ
    return {key: value for key, value in CPU_KERNEL_ENV[choice].items() if environ.get(key) != value}


def cpu_kernels_note(choice: str) -> tuple[int, str] | None:
    """(log level, line) saying whether `run.cpu_kernels` holds in this process; None for `native`.

    The limit only holds when the variables were in place before torch ran its first CPU operation: the command
    line restarts itself to make sure (launch.py), a SLURM job exports them in its sbatch script (cluster.py). A run
    started from Python (the API, the tests) after torch has run anything keeps the processor's kernels, says so
    here, and its machine record (`cpu_capability`) shows which ran."""
    if choice == "native":
        return None
    if not _on_x86():
        return logging.INFO, f"run.cpu_kernels={choice}: not an x86 processor ({platform.machine()}); nothing to cap"
    missing = cpu_kernel_env(choice)
    capability = cpu_capability()
    if missing:
        variables = " ".join(f"{key}={value}" for key, value in missing.items())
        return logging.WARNING, (f"run.cpu_kernels={choice} is not in force in this process (torch's CPU kernels: "
                                 f"{capability}): set {variables} before Python starts, or start the run with "
                                 "python -m scan_dist.launch, which does; this run's digits are the processor's own")
    if capability is not None and capability.upper() not in ("AVX2", "AVX", "DEFAULT"):
        return logging.WARNING, (f"run.cpu_kernels={choice}: the variables are set, but torch had picked its "
                                 f"{capability} kernels before they were; start a fresh process")
    return logging.INFO, (f"run.cpu_kernels={choice}: CPU kernels capped at {choice.upper()} (torch: {capability}; "
                          "oneDNN and MKL too): the digits of a processor of this vendor without wider ones")


def cpu_model() -> str:
    """The processor's model name (/proc/cpuinfo on Linux), else what the platform module knows."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as info:
            for line in info:
                if line.startswith("model name") and ":" in line:
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def cpu_capability() -> str | None:
    """The instruction set torch picked for its CPU kernels ('AVX2', 'AVX512', 'DEFAULT', ...), None if unknown.

    Two processors with one model name can differ here (the twenty-third pass's 'AMD EPYC' had AVX2 and no
    AVX-512), and this, not the name, picks the kernels whose float sums a SCAN run amplifies."""
    query = getattr(getattr(torch.backends, "cpu", None), "get_cpu_capability", None)
    try:
        return str(query()) if query is not None else None
    except Exception:  # noqa: BLE001 - a record of the machine must never stop a run
        return None


def machine(device: torch.device | str | None = None) -> dict:
    """What a stage's float results depend on beyond its settings, for its DONE marker and metrics.json."""
    info = {"cpu": cpu_model(), "cpu_capability": cpu_capability(), "cpus": os.cpu_count(),
            "threads": torch.get_num_threads(), "torch": torch.__version__, "python": platform.python_version()}
    device = torch.device(device) if device is not None else None
    if device is not None and device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    return info


# The entries of machine() that pick the kernels, and so the float results: not the core count (threads is what
# torch uses) nor the Python version.
KIND_KEYS = ("cpu", "cpu_capability", "threads", "torch", "gpu", "cuda")


def same_kind(a: dict | None, b: dict | None) -> bool | None:
    """Whether two machine() records are one kind of machine: every KIND_KEYS entry both name is equal.

    None (unknown) when either record is missing, as for a stage finished by a version that kept none; an entry
    only one side names (an older record without `cpu_capability`) is not held against them, but a stage on a GPU
    and one on the processor alone are two kinds."""
    if not isinstance(a, dict) or not isinstance(b, dict):
        return None
    if bool(a.get("gpu")) != bool(b.get("gpu")):
        return False
    return all(a[key] == b[key] for key in KIND_KEYS if a.get(key) is not None and b.get(key) is not None)


def kind_label(info: dict | None) -> str:
    """'AMD EPYC (AVX2), 2 threads, torch 2.14.1': a machine() record in a few words, '?' for none."""
    if not isinstance(info, dict):
        return "?"
    if info.get("gpu"):
        parts = [str(info["gpu"])] + ([f"CUDA {info['cuda']}"] if info.get("cuda") else [])
    else:
        cpu = str(info.get("cpu", "?"))
        parts = [f"{cpu} ({info['cpu_capability']})" if info.get("cpu_capability") else cpu]
        if info.get("threads") is not None:
            parts.append(f"{info['threads']} threads")
    if info.get("torch"):
        parts.append(f"torch {info['torch']}")
    return ", ".join(parts)
