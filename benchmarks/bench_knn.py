"""Benchmark of exact k-NN mining (self-search of a bank, cosine): naive baselines vs the torch tiling vs Triton.

Every implementation gets the raw fp32 bank and returns the top-k of each query (normalisation is inside the timed
region).  Implementations, timed in the same run:

* ``naive_fp32``  -- chunked ``torch.mm`` (TF32 off) + ``torch.topk`` on fp32 scores (a baseline);
* ``naive_bf16``  -- the same on bf16 copies with bf16 scores (a baseline: fast, *not* exact; see its recall);
* ``torch``       -- ``knn(..., backend="torch")``, the exact tiled torch path;
* ``triton_fp32`` -- ``knn(..., backend="triton", precision="fp32")``: the fused kernel, IEEE fp32 scores;
* ``triton_fp16`` -- ``precision="fp16"``: fp16 candidate pass + fp32 re-rank + proof (exact);
* ``triton_bf16`` / ``triton_tf32`` -- the same with bf16 / tf32 candidates (not run unless asked with ``--impl``);
* ``faiss``       -- faiss ``IndexFlatIP`` on CPU (exact; skipped above ``--faiss-max-flop``).

Columns: median ms, ``recall`` = recall@k against the exact answer (the first exact implementation that ran,
``triton_fp32`` on GPU), ``rows_equal`` = fraction of rows whose index list equals it, ``speedup_vs_naive_bf16`` =
naive_bf16 ms / ms (same shape only).  Triton runs on CUDA; with ``--small`` on a machine without CUDA it runs in
the interpreter on a tiny subset (``--interp-q`` x ``--interp-n``), flagged ``interpreter`` -- those timings measure
numpy, not a GPU, and get no speedup.

Defaults are the ImageNet-1k targets: N = Q = 1,281,167, D = 128 and D = 2048, k = 21 (on an H100 the baselines
alone take minutes: naive bf16 ~18.8 s and naive fp32 ~30.9 s per call at D = 128).  ``--n`` scales the bank down;
nothing is extrapolated.

Usage::

    python benchmarks/bench_knn.py                      # GPU, N = Q = 1.28M, D = 128 and 2048
    python benchmarks/bench_knn.py --n 200000 --d 128   # smaller bank
    python benchmarks/bench_knn.py --small              # CPU smoke run (N = Q = 4096, D = 64)
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

if __package__ in (None, ""):  # run as a script: make the repo root importable (benchmarks.common, kernels)
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import (Budget, add_budget_argument, environment, print_table, synchronize, time_ms,
                               write_results)

IMAGENET_1K = 1_281_167
DEFAULT_IMPLS = ["naive_fp32", "naive_bf16", "torch", "triton_fp32", "triton_fp16", "faiss"]
ALL_IMPLS = DEFAULT_IMPLS + ["triton_bf16", "triton_tf32"]
EXACT_ORDER = ["triton_fp32", "torch", "naive_fp32", "faiss"]  # reference for recall: the first of these that ran


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--small", action="store_true",
                        help="CPU-sized run: N = Q = 4096, D = 64 (Triton in the interpreter on a tiny subset)")
    parser.add_argument("--n", type=int, default=None, help=f"bank size N (default {IMAGENET_1K}; 4096 with --small)")
    parser.add_argument("--q", type=int, default=None, help="queries: the first Q rows of the bank (default N)")
    parser.add_argument("--d", type=int, nargs="+", default=None, help="dimensions (default 128 2048; 64 with --small)")
    parser.add_argument("--k", type=int, default=21)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--data", choices=["clustered", "gaussian"], default="clustered",
                        help="clustered: 1 centre per 100 rows plus noise (embedding-like); gaussian: iid N(0, 1)")
    parser.add_argument("--impl", nargs="+", choices=ALL_IMPLS, default=None, help=f"default {DEFAULT_IMPLS}")
    parser.add_argument("--faiss-max-flop", type=float, default=5e12,
                        help="skip faiss (CPU) when 2 Q N D exceeds this (default 5e12)")
    parser.add_argument("--interp-q", type=int, default=64, help="queries of the interpreter subset (CPU)")
    parser.add_argument("--interp-n", type=int, default=512, help="bank rows of the interpreter subset (CPU)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="results folder (default benchmarks/results)")
    add_budget_argument(parser)
    args = parser.parse_args(argv)
    args.n = args.n or (4096 if args.small else IMAGENET_1K)
    args.q = min(args.q or args.n, args.n)
    args.d = args.d or ([64] if args.small else [128, 2048])
    args.impl = args.impl or list(DEFAULT_IMPLS)
    return args


# --------------------------------------------------------------------------- #
# Data and baselines
# --------------------------------------------------------------------------- #
def make_bank(n: int, d: int, kind: str, seed: int, device: torch.device) -> torch.Tensor:
    gen = torch.Generator(device=device).manual_seed(seed)
    if kind == "gaussian":
        return torch.randn(n, d, generator=gen, device=device)
    centres = torch.randn(max(1, n // 100), d, generator=gen, device=device)
    pick = torch.randint(0, centres.shape[0], (n,), generator=gen, device=device)
    return centres[pick] + 0.7 * torch.randn(n, d, generator=gen, device=device)


def naive(queries: torch.Tensor, keys: torch.Tensor, k: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Chunked mm + topk: the score matrix exists one chunk of queries at a time (<= 2**30 scores on GPU, 2**24 on
    CPU)."""
    q = torch.nn.functional.normalize(queries.float(), dim=1).to(dtype)
    x = torch.nn.functional.normalize(keys.float(), dim=1).to(dtype)
    budget = (1 << 30) if keys.is_cuda else (1 << 24)
    rows = max(1, budget // keys.shape[0])
    scores, index = [], []
    for r0 in range(0, q.shape[0], rows):
        s, i = torch.topk(q[r0:r0 + rows] @ x.T, k, dim=1)
        scores.append(s.float())
        index.append(i)
    return torch.cat(scores), torch.cat(index)


def recall(index: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    """(recall@k, fraction of rows with the identical index list), a slice of rows at a time."""
    hits, equal = 0, 0
    for r0 in range(0, ref.shape[0], 4096):
        a, b = index[r0:r0 + 4096].to(ref.device), ref[r0:r0 + 4096]
        hits += int((a.unsqueeze(2) == b.unsqueeze(1)).any(dim=2).sum())
        equal += int((a == b).all(dim=1).sum())
    return hits / ref.numel(), equal / ref.shape[0]


def _fit_queries(queries, bank, impls: dict, budget: Budget, args, device, notes: list) -> torch.Tensor:
    """The first Q' queries such that every implementation's warm-up + repeats on them fit ``budget``.

    Each implementation runs once on a probe of <= 256 queries (also compiling it), then once more, timed; the
    per-query cost, which includes any fixed setup, so it overestimates, gives Q' (never above Q, never below the
    probe).  Rows on a subset report the time for all Q extrapolated linearly in Q."""
    probe = queries[:min(256, queries.shape[0])]
    per_query = 0.0
    for name, fn in impls.items():
        try:
            fn(probe, bank)
            synchronize(device)
            start = time.perf_counter()
            fn(probe, bank)
            synchronize(device)
        except Exception as exc:  # noqa: BLE001 - the real run reports it
            notes.append(f"probe of {name} failed: {type(exc).__name__}")
            continue
        per_query += (time.perf_counter() - start) / probe.shape[0]
    calls = args.warmup + args.repeats + 1  # the untimed first call in run() too
    affordable = int(0.8 * max(0.0, budget.left()) / max(per_query * calls, 1e-12))
    rows = max(probe.shape[0], min(queries.shape[0], affordable))
    if rows < queries.shape[0]:
        notes.append(f"D={bank.shape[1]}: {rows} of {queries.shape[0]} queries fit --budget-s "
                     f"({budget.left():.0f} s left, ~{per_query * 1e3:.3f} ms per query over all impls)")
    return queries[:rows]


# --------------------------------------------------------------------------- #
# Main
# --------------------------------------------------------------------------- #
def main(argv=None) -> Path:
    args = parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    notes = []
    if device.type == "cpu":
        notes.append("CPU run: timings say nothing about GPU speed")
        if args.small:
            # Triton reads this when the kernel is decorated, i.e. at the first (lazy) import of knn_triton.
            os.environ.setdefault("TRITON_INTERPRET", "1")
    torch.backends.cuda.matmul.allow_tf32 = False  # naive_fp32 / torch must be true fp32

    from scan_dist.kernels import _dispatch, knn, knn_faiss

    triton_ok = _dispatch.triton_importable() and (device.type == "cuda" or _dispatch.interpreting())
    if not triton_ok:
        notes.append("Triton skipped: needs CUDA, or --small on CPU (interpreter), and the triton package")
    rows = []
    budget = Budget(args.budget_s)
    for d_index, dim in enumerate(args.d):
        if budget.limited and budget.left() < 1.0:
            notes.append(f"D={dim} skipped: --budget-s spent")
            continue
        bank = make_bank(args.n, dim, args.data, args.seed, device)
        queries = bank[:args.q]
        shape = f"Q{args.q}xN{args.n}xD{dim}"
        results = {}
        d_budget = Budget(budget.share(len(args.d) - d_index))  # this dimension's share of what is left
        items_left = [0]

        def run(name, fn, q, x, interpreter=False):
            out = fn(q, x)
            timing = time_ms(lambda: fn(q, x), device, warmup=args.warmup, repeats=args.repeats,
                             seconds=d_budget.share(items_left[0]))
            items_left[0] -= 1
            row = {"impl": name, "shape": f"Q{q.shape[0]}xN{x.shape[0]}xD{dim}", "k": args.k, "data": args.data,
                   "device": device.type, "interpreter": interpreter, **timing}
            if q.shape[0] < args.q and not interpreter:
                # Only a subset of the queries fitted the budget: the time for all of them, linear in Q.
                row["all_queries_ms_extrapolated"] = timing["median_ms"] * args.q / q.shape[0]
                row["extrapolation"] = f"linear in Q: median_ms x {args.q}/{q.shape[0]}"
            results[name] = (row, out, q.shape[0], x.shape[0])
            print(f"  {name:12s} {row['shape']}: {timing['median_ms']:.1f} ms", flush=True)

        print(f"{shape} k={args.k} ({args.data}) on {device}", flush=True)
        k = args.k
        impls = {
            "naive_fp32": lambda q, x: naive(q, x, k, torch.float32),
            "naive_bf16": lambda q, x: naive(q, x, k, torch.bfloat16),
            "torch": lambda q, x: knn(q, x, k, backend="torch"),
        }
        for prec in ("fp32", "fp16", "bf16", "tf32"):
            impls[f"triton_{prec}"] = (lambda p: lambda q, x: knn(q, x, k, backend="triton", precision=p))(prec)
        impls["faiss"] = lambda q, x: knn_faiss(q, x, k, metric="cosine")

        chosen = [name for name in args.impl if not (name.startswith("triton") and not triton_ok)]
        items_left[0] = len(chosen)
        if d_budget.limited and (device.type == "cuda" or not args.small):
            # (On CPU with --small, Triton runs on its own tiny interpreter subset and the rest is quick.)
            probed = {name: impls[name] for name in chosen
                      if name != "faiss" or 2.0 * args.q * args.n * dim <= args.faiss_max_flop}
            queries = _fit_queries(queries, bank, probed, d_budget, args, device, notes)
        for name in args.impl:
            fn = impls[name]
            if name.startswith("triton"):
                if not triton_ok:
                    continue
                if device.type == "cpu":
                    n_sub = min(args.interp_n, args.n)
                    run(name, fn, bank[:min(args.interp_q, args.q)], bank[:n_sub], interpreter=True)
                    continue
            if name == "faiss":
                flop = 2.0 * args.q * args.n * dim
                try:
                    import faiss  # noqa: F401
                except ImportError:
                    notes.append("faiss skipped: not installed (pip install faiss-cpu)")
                    continue
                if flop > args.faiss_max_flop:
                    notes.append(f"faiss skipped at {shape}: {flop:.2g} flop > --faiss-max-flop")
                    continue
            if d_budget.limited and d_budget.left() < 0.5:
                notes.append(f"{name} at {shape}: skipped, --budget-s spent")
                continue
            run(name, fn, queries, bank)

        # Recall against the exact answer of the same (sub)shape.
        for name, (row, out, n_q, n_k) in results.items():
            ref_name = next((r for r in EXACT_ORDER if r in results and results[r][2:] == (n_q, n_k)), None)
            if ref_name is not None:
                ref_index = results[ref_name][1][1]
            else:  # interpreter subset: the exact torch answer of the same subset
                ref_name, ref_index = "torch (subset)", knn(bank[:n_q], bank[:n_k], k, backend="torch")[1]
            row["recall"], row["rows_equal"] = recall(out[1], ref_index)
            row["recall_reference"] = ref_name
            base = results.get("naive_bf16")
            if base is not None and base[2:] == (n_q, n_k) and not row["interpreter"]:
                row["speedup_vs_naive_bf16"] = base[0]["median_ms"] / row["median_ms"]
            rows.append(row)
        if device.type == "cuda" and triton_ok and "triton_fp16" in args.impl:
            from scan_dist.kernels.knn_triton import knn_triton_stats

            stats = knn_triton_stats(queries, bank, k, precision="fp16")[2]
            notes.append(f"triton_fp16 at {shape}: {stats}")
        del bank, queries, results
        if device.type == "cuda":
            torch.cuda.empty_cache()

    print()
    print_table(rows, ["impl", "shape", "median_ms", "recall", "rows_equal", "speedup_vs_naive_bf16", "interpreter"])
    for note in notes:
        print("note:", note)
    payload = {"environment": environment(device), "config": {k: (str(v) if isinstance(v, Path) else v)
                                                               for k, v in vars(args).items()},
               "targets_h100_s": {"naive_bf16_d128": 18.8, "naive_fp32_d128": 30.9, "exact_d128": 1.0,
                                  "exact_d2048": 12.0},
               "notes": notes, "results": rows}
    path = write_results("knn", payload, args.out)
    print(f"wrote {path}")
    return path


if __name__ == "__main__":
    main()
