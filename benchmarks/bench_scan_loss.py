"""Benchmark of the SCAN loss, forward + backward: torch eager vs torch.compile vs the Triton kernels.

Each timed call computes ``scan_loss(anchor, neighbor, 5.0)`` on ``[H, B, C]`` logits that require grad and
backpropagates ``total.sum()``, i.e. one training step's worth of loss work.  Implementations:

* ``torch``   -- the pure-torch reference (``backend="torch"``), eager;
* ``compile`` -- ``torch.compile`` of that reference (skipped with a note if compilation fails);
* ``triton``  -- ``backend="triton"``: on CUDA, or with ``--small`` on CPU under ``TRITON_INTERPRET=1`` (rows are
  flagged ``interpreter``; those timings measure numpy, not a GPU).

Default shapes are the H100 targets (H=10, B=4096, C=1000 and H=1, B=65536, C=1000, bf16).  Every row also carries
``floor_ms``: the fewest bytes a fused forward + backward can move -- read ``a`` and ``n`` in the forward, read
them again and write both gradients in the backward, ``6 * H * B * C`` elements -- divided by ``--bandwidth-gbs``
(default 3350 GB/s, H100 SXM HBM3), and ``floor_frac`` = floor_ms / median_ms (1.0 = at the bandwidth floor).

Usage::

    python benchmarks/bench_scan_loss.py                  # GPU, default shapes
    python benchmarks/bench_scan_loss.py --small          # CPU-sized smoke run (interpreter for Triton)
    python benchmarks/bench_scan_loss.py --shape 2x1024x20000 --dtype fp32
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

if __package__ in (None, ""):  # run as a script: make the repo root importable (benchmarks.common, kernels)
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import Budget, add_budget_argument, environment, print_table, time_ms, write_results

DEFAULT_SHAPES = [(10, 4096, 1000), (1, 65536, 1000)]
SMALL_SHAPES = [(2, 256, 100), (1, 64, 2500)]  # the second takes the chunked (C > MAX_FUSED_C) kernels
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
ENTROPY_WEIGHT = 5.0


def _parse_shape(text: str) -> tuple[int, int, int]:
    try:
        heads, batch, classes = (int(v) for v in text.lower().split("x"))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"shape must look like HxBxC (e.g. 10x4096x1000), got {text!r}") from exc
    return heads, batch, classes


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--small", action="store_true",
                        help=f"CPU-sized shapes {SMALL_SHAPES}; Triton runs in the interpreter when there is no GPU")
    parser.add_argument("--shape", type=_parse_shape, action="append", default=None,
                        help="HxBxC, repeatable (overrides the default shapes)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--bandwidth-gbs", type=float, default=3350.0,
                        help="memory bandwidth for the bytes floor column (default: H100 SXM, 3350 GB/s)")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile baseline")
    parser.add_argument("--out", type=Path, default=None, help="results folder (default benchmarks/results)")
    add_budget_argument(parser)
    return parser.parse_args(argv)


def _inputs(shape, dtype, device):
    gen = torch.Generator().manual_seed(0)
    a = (3 * torch.randn(shape, generator=gen)).to(device=device, dtype=dtype)
    n = (a.float() + 2 * torch.randn(shape, generator=gen).to(device)).to(dtype)
    return a.requires_grad_(True), n.requires_grad_(True)


def _step_fn(loss_fn, a, n):
    def step():
        a.grad = None
        n.grad = None
        total, _, _ = loss_fn(a, n)
        total.sum().backward()
    return step


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    interpreter = device.type == "cpu"
    if interpreter and args.small:
        # Triton reads this when the kernels are decorated, i.e. at the first (lazy) import of
        # scan_loss_triton, which happens below -- after this line.
        os.environ.setdefault("TRITON_INTERPRET", "1")

    from scan_dist.kernels import _dispatch, scan_loss

    shapes = args.shape or (SMALL_SHAPES if args.small else DEFAULT_SHAPES)
    dtype = DTYPES[args.dtype]
    elem = torch.empty((), dtype=dtype).element_size()
    notes = []
    if device.type == "cpu":
        notes.append("CPU run: timings say nothing about GPU speed")

    triton_ok, triton_why = True, None
    if not _dispatch.triton_importable():
        triton_ok, triton_why = False, "triton not installed"
    elif interpreter and not args.small:
        triton_ok, triton_why = False, "no GPU: the Triton interpreter only runs with --small"
    elif interpreter and not _dispatch.interpreting():
        triton_ok, triton_why = False, "no GPU and TRITON_INTERPRET disabled"
    if triton_why:
        notes.append(f"triton skipped: {triton_why}")

    def reference(x, y):
        return scan_loss(x, y, ENTROPY_WEIGHT, backend="torch")

    rows = []
    budget = Budget(args.budget_s)
    per_shape = 1 + (not args.no_compile) + triton_ok
    items_left = len(shapes) * per_shape
    for shape in shapes:
        heads, batch, classes = shape
        impls = {"torch": reference}
        if not args.no_compile:
            # A fresh static-shape compile per shape: the baseline is the best torch.compile can do for exactly
            # this shape (no dynamic-shape graph, no recompile inside the timed loop).
            torch._dynamo.reset()
            impls["compile"] = torch.compile(reference, dynamic=False)
        if triton_ok:
            impls["triton"] = lambda x, y: scan_loss(x, y, ENTROPY_WEIGHT, backend="triton")
        floor_ms = 6 * heads * batch * classes * elem / (args.bandwidth_gbs * 1e9) * 1e3
        a, n = _inputs(shape, dtype, device)
        shape_rows = []
        for name, fn in impls.items():
            row = {"shape": f"{heads}x{batch}x{classes}", "H": heads, "B": batch, "C": classes,
                   "dtype": args.dtype, "impl": name, "device": device.type,
                   "interpreter": name == "triton" and interpreter, "floor_ms": floor_ms}
            seconds = budget.share(items_left)
            items_left -= 1
            if seconds is not None and seconds < 0.5:
                row["note"] = "skipped: --budget-s spent"
                notes.append(f"{row['shape']} {name}: skipped, --budget-s spent")
                shape_rows.append(row)
                continue
            try:
                stats = time_ms(_step_fn(fn, a, n), device, warmup=args.warmup, repeats=args.repeats,
                                seconds=seconds)
            except Exception as exc:  # a failed baseline (e.g. no C++ compiler) is reported, not fatal
                if name != "compile":
                    raise
                row["note"] = f"torch.compile failed: {type(exc).__name__}: {str(exc).splitlines()[0][:120]}"
                notes.append(f"{row['shape']}: {row['note']}")
                shape_rows.append(row)
                continue
            row.update(stats)
            row["floor_frac"] = floor_ms / stats["median_ms"]
            shape_rows.append(row)
        base = {r["impl"]: r.get("median_ms") for r in shape_rows}
        for row in shape_rows:
            if row.get("median_ms") is None:
                continue
            # Speedups: > 1 means this implementation is faster than the baseline.
            if base.get("compile"):
                row["speedup_vs_compile"] = base["compile"] / row["median_ms"]
            if base.get("torch"):
                row["speedup_vs_eager"] = base["torch"] / row["median_ms"]
        rows.extend(shape_rows)
        del a, n

    print_table(rows, ["shape", "dtype", "impl", "interpreter", "median_ms", "speedup_vs_compile",
                       "speedup_vs_eager", "floor_ms", "floor_frac"])
    for note in notes:
        print("note:", note)
    payload = {
        "environment": environment(device),
        "shapes": [list(s) for s in shapes],
        "results": rows,
        "config": {"dtype": args.dtype, "repeats": args.repeats, "warmup": args.warmup,
                   "bandwidth_gbs": args.bandwidth_gbs, "small": args.small, "entropy_weight": ENTROPY_WEIGHT,
                   "budget_s": args.budget_s,
                   "floor_bytes": "6*H*B*C*element_size (fwd reads a,n; bwd reads a,n and writes da,dn)"},
        "notes": notes,
    }
    path = write_results("scan_loss", payload, args.out)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
