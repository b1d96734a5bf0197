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
"""
from __future__ import annotations

import os
import platform

import torch

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
