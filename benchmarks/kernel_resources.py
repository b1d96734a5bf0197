"""Registers, spills and shared memory of the Triton kernels as compiled for a GPU -- without needing that GPU.

Two sources:

* ``offline`` (any machine, no GPU): the host code of each kernel is run on ``meta`` tensors with the kernel
  replaced by a recorder, so the launch arguments, constexprs and launch options are exactly those the real call
  would use for the shape; each recorded launch is then compiled with ``triton.compile`` for
  ``GPUTarget("cuda", ARCH, 32)`` (sm_90a for ``--arch 90``) and the PTX is assembled by the ``ptxas`` that ships
  with Triton with ``-v``: registers, spill stores/loads, stack frame, and shared memory (Triton's allocation,
  ``metadata.shared``).  Integer arguments get Triton's usual specialisations (divisible by 16, equal to 1) from
  their values, so the binary matches what the JIT builds up to those heuristics.
* ``jit`` (on a GPU, after kernels ran): every compiled kernel in the JIT caches, as loaded: ``n_regs``,
  ``n_spills``, ``metadata.shared`` (``jit_kernels()``; used by ``benchmarks/gpu_check.py``).

Usage::

    python -m benchmarks.kernel_resources [--arch 90] [--cases scan knn] [--json PATH]

Run it without ``TRITON_INTERPRET`` (the interpreter replaces the kernels; the script refuses).  The default cases
are the benchmark shapes: SCAN loss bf16 H10 B4096 C1000 (forward, backward) and C20000 (chunked kernels); k-NN
D=128 k=21 in fp16 and fp32, D=100 (not a multiple of 16) and D=2048 in fp16.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

_PTR_TYPES = {torch.float32: "*fp32", torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.int32: "*i32",
              torch.int64: "*i64", torch.float64: "*fp64", torch.uint8: "*u8"}
_LAUNCH_OPTIONS = ("num_warps", "num_stages", "num_ctas", "maxnreg")


def _kernels_modules():
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise SystemExit("kernel_resources: unset TRITON_INTERPRET (the interpreter replaces compiled kernels)")
    from scan_dist.kernels import knn_triton, scan_loss_triton
    return scan_loss_triton, knn_triton


class _Recorder:
    """Stands in for a ``@triton.jit`` function: ``kernel[grid](*args, **kwargs)`` records instead of launching."""

    def __init__(self, fn, sink: list, label: str):
        self.fn, self.sink, self.label = fn, sink, label

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.sink.append({"fn": self.fn, "grid": grid, "args": args, "kwargs": kwargs, "case": self.label})
        return launch


def _record(module, names: list[str], run, label: str) -> list[dict]:
    sink: list[dict] = []
    saved = {n: getattr(module, n) for n in names}
    try:
        for n in names:
            setattr(module, n, _Recorder(saved[n], sink, label))
        run()
    finally:
        for n, fn in saved.items():
            setattr(module, n, fn)
    return sink


def scan_launches(shape=(10, 4096, 1000), dtype=torch.bfloat16) -> list[dict]:
    """The launches of one SCAN-loss forward and backward (both gradients, both upstream gradients)."""
    st, _ = _kernels_modules()
    heads, batch, classes = shape
    meta = {"device": "meta", "dtype": dtype}
    a, n = torch.empty(shape, **meta), torch.empty(shape, **meta)
    label = f"scan {dtype_name(dtype)} H{heads} B{batch} C{classes}"
    names = ["_fwd_fused_kernel", "_fwd_stats_chunked_kernel", "_prob_sum_chunked_kernel", "_bwd_kernel"]

    def run():
        _, _, stats = st._forward(a, n, st.MAX_FUSED_C)
        g_cs = torch.empty(heads, device="meta")
        g_ps = torch.empty(heads, classes, device="meta")
        st._backward(a, n, stats, g_cs, g_ps, True, True, st.MAX_FUSED_C)
    return _record(st, names, run, label)


def knn_launches(dim=128, k=21, precision="fp16", n_q=1 << 20, n_k=1_281_167) -> list[dict]:
    """The first-pass launch of a k-NN search (K' candidates for fp16/bf16/tf32, k slots for fp32)."""
    _, kt = _kernels_modules()
    try:
        slots = k if precision == "fp32" else kt.default_candidates(k, precision, dim)
    except TypeError:  # before D-dependent K'
        slots = kt.default_candidates(k, precision)
    elem = torch.float16 if precision == "fp16" else torch.bfloat16 if precision == "bf16" else torch.float32
    padded = dim + (-dim % getattr(kt, "D_ALIGN", 1))  # the prepared copies the real call passes (_cast)
    q = torch.empty(n_q, padded, device="meta", dtype=elem)
    x = torch.empty(n_k, padded, device="meta", dtype=elem)
    label = f"knn {precision} D{dim} k{k} K'{slots}"
    return _record(kt, ["_knn_kernel"], lambda: kt._launch(q, x, slots, precision, None, on_cuda=True), label)


def dtype_name(dtype: torch.dtype) -> str:
    return {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}.get(dtype, str(dtype))


def _signature(fn, args: tuple, kwargs: dict) -> tuple[dict, dict, dict, dict]:
    """(signature, constexprs, attrs, options) for ``triton.compile`` from the recorded call."""
    values = dict(zip(fn.arg_names, args))
    options = {}
    for key, value in kwargs.items():
        if key in _LAUNCH_OPTIONS:
            options[key] = value
        else:
            values[key] = value
    signature, constexprs, attrs = {}, {}, {}
    for index, param in enumerate(fn.params):
        value = values.get(param.name, param.default if hasattr(param, "default") else None)
        if param.is_constexpr:
            signature[param.name] = "constexpr"
            constexprs[param.name] = value
        elif isinstance(value, torch.Tensor):
            signature[param.name] = _PTR_TYPES[value.dtype]
            attrs[(index,)] = [["tt.divisibility", 16]]  # torch allocations are 256-byte aligned
        elif isinstance(value, bool):
            signature[param.name] = "i1"
        elif isinstance(value, int):
            if value == 1:  # Triton specialises integer arguments equal to 1 into constants
                signature[param.name] = "constexpr"
                constexprs[param.name] = 1
                continue
            signature[param.name] = "i32" if -2 ** 31 <= value < 2 ** 31 else "i64"
            if value % 16 == 0:
                attrs[(index,)] = [["tt.divisibility", 16]]
        elif isinstance(value, float):
            signature[param.name] = "fp32"
        elif value is None:
            signature[param.name] = "constexpr"
            constexprs[param.name] = None
        else:
            raise TypeError(f"{fn.__name__}: cannot type argument {param.name}={value!r}")
    return signature, constexprs, attrs, options


def _ptxas() -> str | None:
    try:
        import triton.backends.nvidia as nvidia
        path = Path(nvidia.__file__).parent / "bin" / "ptxas"
        if path.is_file():
            return str(path)
    except ImportError:
        pass
    return shutil.which("ptxas")


_PTXAS_PATTERNS = {
    "regs": r"Used (\d+) registers",
    "spill_stores": r"(\d+) bytes spill stores",
    "spill_loads": r"(\d+) bytes spill loads",
    "stack": r"(\d+) bytes stack frame",
}


def compile_offline(launch: dict, arch: int = 90) -> dict:
    """Compile one recorded launch for ``sm_<arch>`` and read ptxas' resource report."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = launch["fn"]
    signature, constexprs, attrs, options = _signature(fn, launch["args"], launch["kwargs"])
    row: dict[str, Any] = {"kernel": fn.__name__, "case": launch["case"], "arch": f"sm_{arch}",
                           "num_warps": options.get("num_warps", 4), "num_stages": options.get("num_stages", 3),
                           "constexprs": {k: v for k, v in constexprs.items() if v is not None and k.isupper()}}
    start = time.perf_counter()
    compiled = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=GPUTarget("cuda", arch, 32),
                              options=options)
    row["compile_s"] = round(time.perf_counter() - start, 2)
    row["smem_bytes"] = int(compiled.metadata.shared)
    # Block-wide barriers in the PTX (static count): each cross-warp reduction costs at least one.
    row["barriers_ptx"] = len(re.findall(r"\b(?:bar|barrier)\.sync\b", compiled.asm["ptx"]))
    ptxas = _ptxas()
    if ptxas is None:
        row["ptxas"] = "not found"
        return row
    gpu = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"
    with tempfile.TemporaryDirectory() as tmp:
        ptx = Path(tmp) / "k.ptx"
        ptx.write_text(compiled.asm["ptx"])
        proc = subprocess.run([ptxas, "-v", f"--gpu-name={gpu}", str(ptx), "-o", str(Path(tmp) / "k.cubin")],
                              capture_output=True, text=True, timeout=300)
    report = proc.stdout + proc.stderr
    for key, pattern in _PTXAS_PATTERNS.items():
        found = re.findall(pattern, report)
        row[key] = int(found[-1]) if found else None
    if proc.returncode != 0:
        row["ptxas_error"] = report.strip()[-500:]
    return row


def default_launches(cases=("scan", "knn")) -> list[dict]:
    launches: list[dict] = []
    if "scan" in cases:
        launches += scan_launches((10, 4096, 1000))
        launches += scan_launches((2, 1024, 20000))
    if "knn" in cases:
        launches += knn_launches(128, 21, "fp16")
        launches += knn_launches(128, 21, "fp32")
        launches += knn_launches(100, 21, "fp16")
        launches += knn_launches(2048, 21, "fp16")
    return launches


def jit_kernels() -> list[dict]:
    """Every kernel of this package compiled (and loaded) in this process: registers, spills, shared memory."""
    st, kt = _kernels_modules()
    rows = []
    for fn in (st._fwd_fused_kernel, st._fwd_stats_chunked_kernel, st._prob_sum_chunked_kernel, st._bwd_kernel,
               kt._knn_kernel):
        for device, kernel in _compiled(fn):
            meta = getattr(kernel, "metadata", None)
            row = {"kernel": fn.__name__, "device": str(device), "regs": getattr(kernel, "n_regs", None),
                   "spills": getattr(kernel, "n_spills", None),
                   "smem_bytes": getattr(meta, "shared", None),
                   "num_warps": getattr(meta, "num_warps", None), "num_stages": getattr(meta, "num_stages", None)}
            constants = getattr(getattr(kernel, "src", None), "constants", None)
            if isinstance(constants, dict):  # which specialisation this is (the layout differs across versions)
                row["constexprs"] = {str(k[-1] if isinstance(k, tuple) else k): v for k, v in constants.items()
                                     if isinstance(v, (int, bool, str))}
            rows.append(row)
    return rows


def _compiled(fn):
    """(device, compiled kernel) pairs from a JITFunction's caches (the layout differs across Triton 3.x)."""
    caches = getattr(fn, "device_caches", None)
    if isinstance(caches, dict):
        for device, entry in caches.items():
            cache = entry[0] if isinstance(entry, (tuple, list)) else entry
            if isinstance(cache, dict):
                for kernel in cache.values():
                    yield device, kernel
        return
    cache = getattr(fn, "cache", None)
    if isinstance(cache, dict):
        for device, kernels in cache.items():
            for kernel in (kernels.values() if isinstance(kernels, dict) else []):
                yield device, kernel


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability x 10 (default 90: H100/H200)")
    parser.add_argument("--cases", nargs="+", choices=["scan", "knn"], default=["scan", "knn"])
    parser.add_argument("--json", type=Path, default=None, help="also write the rows as JSON here")
    args = parser.parse_args(argv)
    import triton

    rows = []
    for launch in default_launches(tuple(args.cases)):
        try:
            rows.append(compile_offline(launch, args.arch))
        except Exception as exc:  # noqa: BLE001 - one kernel failing to compile is a result, not a crash
            rows.append({"kernel": launch["fn"].__name__, "case": launch["case"],
                         "error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"})
        row = rows[-1]
        print(f"{row['case']:<32} {row['kernel']:<26} warps={row.get('num_warps')} stages={row.get('num_stages')} "
              f"regs={row.get('regs')} spill_st={row.get('spill_stores')} spill_ld={row.get('spill_loads')} "
              f"smem={row.get('smem_bytes')} barriers={row.get('barriers_ptx')} {row.get('error', '')}", flush=True)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"triton": triton.__version__, "arch": args.arch, "rows": rows}, indent=2,
                                        default=str) + "\n")
    return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
    raise SystemExit(main())
