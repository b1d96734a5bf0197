"""One SCAN epoch of head training from a feature cache (`scan.mode=cached`): epoch time and the loss's share.

Synthetic features stand in for a frozen backbone's: an ``[N, V + 1, D]`` fp16 table, `FeatureCache`'s layout
(default ImageNet-1k: N = 1,281,167 images, D = 2048 ResNet-50 features, V = 4 augmented views, about 26 GB on
the GPU), random mined neighbours ``[N, K]`` int64 on the host as the mine stage leaves them (a numpy array; the
stage memory-maps its .npy), and the imagenet1k preset's head setup: H = 10 linear heads, C = 1000 clusters,
global batch 4096, SGD lr 5 with momentum 0.9, entropy weight 5. Every step is the real training step of
`scan_dist.stages.scan` (`_scan_step` over `feature_logits`): a neighbour per anchor and a view per row (the
counter-based draws of (seed, "scan", epoch, anchor)), the rows gathered from `FeatureCache`, heads,
`scan_objective`, backward, optimiser step, through `Engine` at ``dist.precision``; steps walk the seeded
permutation `sampling.epoch_order` as `run_epochs` does (batches ``{"epoch", "index"}`` as `IndexSource` gives
them), without checkpoints.

Two epochs per (loss backend, precision):

* ``epoch_s``: the plain step, wall clock over one full epoch (N // B steps) after ``--warmup-steps`` steps;
* an instrumented epoch with the same work, whose backward is split at the logits (``autograd.grad`` of the loss
  w.r.t. the logits, then ``logits.backward``) so each phase is timed with CUDA events (``perf_counter`` on CPU):
  gather (neighbour/view draws + row gather), heads forward, loss forward, loss backward, heads backward,
  optimiser. ``loss_share`` = (loss forward + loss backward) / instrumented epoch time;
* ``loss_share_isolated`` cross-checks it: ``scan_loss`` forward + backward alone on the ``[H, B, C]`` logits the
  trained heads give one batch (`benchmarks.common.time_ms`, synchronised, contiguous leaf tensors: no slicing of
  the ``[H, 2B, C]`` logits as in the step) times the steps, over ``epoch_s``.

Triton rows run only on CUDA. Usage::

    python benchmarks/bench_scan_epoch.py            # GPU, ImageNet-1k sizes
    python benchmarks/bench_scan_epoch.py --small    # CPU-sized: 20,000 x 256, C = 100, B = 1024
"""
from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

if __package__ in (None, ""):  # run as a script: make the repo root importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import (Budget, add_budget_argument, environment, print_table, synchronize, time_ms,
                               write_results)

IMAGENET1K = dict(num=1_281_167, dim=2048, views=4, k=50, heads=10, classes=1000, batch=4096)
SMALL = dict(num=20_000, dim=256, views=2, k=20, heads=10, classes=100, batch=1024)
PHASES = ("gather", "heads_fwd", "loss_fwd", "loss_bwd", "heads_bwd", "optimizer")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--small", action="store_true", help=f"CPU-sized run: {SMALL}")
    for name, default in IMAGENET1K.items():
        parser.add_argument(f"--{name}", type=int, default=None, help=f"default {default} ({SMALL[name]} small)")
    parser.add_argument("--lr", type=float, default=5.0)
    parser.add_argument("--momentum", type=float, default=0.9)
    parser.add_argument("--entropy-weight", type=float, default=5.0)
    parser.add_argument("--backends", default=None, help="comma list of torch,triton (default: both on CUDA)")
    parser.add_argument("--precisions", default=None, help="comma list of fp32,bf16 (default fp32,bf16 on CUDA, "
                                                           "fp32 on CPU)")
    parser.add_argument("--warmup-steps", type=int, default=5)
    parser.add_argument("--no-instrumented", action="store_true", help="skip the per-phase epoch")
    parser.add_argument("--out", type=Path, default=None, help="results folder (default benchmarks/results)")
    add_budget_argument(parser)
    args = parser.parse_args(argv)
    base = SMALL if args.small else IMAGENET1K
    for name, default in base.items():
        if getattr(args, name) is None:
            setattr(args, name, default)
    return args


SEED = 0  # run.seed of the draws (partner, view) and of the epoch order


@dataclass
class Setup:
    cache: object
    neighbors: np.ndarray
    device: torch.device


def make_setup(args, device: torch.device) -> Setup:
    from scan_dist.stages.feature_cache import FeatureCache

    gen = torch.Generator(device=device).manual_seed(0)
    table = torch.empty((args.num, args.views + 1, args.dim), dtype=torch.float16, device=device)
    rows = max(1, (1 << 26) // (args.dim * (args.views + 1)))  # fill in pieces: no fp32 copy of the whole table
    for start in range(0, args.num, rows):
        piece = table[start:start + rows]
        piece.copy_(torch.randn(piece.shape, generator=gen, device=device, dtype=torch.float32).clamp_(-4, 4))
    cpu_gen = torch.Generator().manual_seed(1)
    # Host int64, as the mine stage leaves them (np.load(..., mmap_mode="r") in the stage).
    neighbors = torch.randint(0, args.num, (args.num, args.k), generator=cpu_gen).numpy()
    return Setup(FeatureCache(table, device=device), neighbors, device)


def make_engine(args, precision: str, device: torch.device):
    from scan_dist.config import DistConfig
    from scan_dist.distributed.engine import Engine
    from scan_dist.models.heads import ClusterHeads

    torch.manual_seed(0)
    heads = ClusterHeads(args.dim, args.classes, args.heads).to(device)
    optimizer = torch.optim.SGD(heads.parameters(), lr=args.lr, momentum=args.momentum)
    return Engine(heads, optimizer, DistConfig(precision=precision))


def _cut(start: float, seconds: float | None, done: int, steps: int) -> bool:
    """True when a budgeted epoch should stop after ``done`` steps (the rest is extrapolated)."""
    return seconds is not None and done < steps and time.perf_counter() - start > seconds


def _batch(order: np.ndarray, epoch: int, step: int, size: int) -> dict:
    """Step `step` of an epoch as `IndexSource` yields it (one process: the whole global batch)."""
    return {"epoch": epoch, "index": torch.from_numpy(order[step * size:(step + 1) * size])}


def plain_epoch(args, setup: Setup, engine, backend: str, seconds: float | None = None) -> dict:
    from scan_dist.data.sampling import epoch_order, steps_per_epoch
    from scan_dist.stages import scan
    from scan_dist.trainer import READ_EVERY

    step = scan._scan_step(scan.feature_logits(engine, setup.cache.get, setup.neighbors, SEED, args.views), engine,
                           args.entropy_weight, backend)
    steps = steps_per_epoch(args.num, args.batch)
    order = epoch_order(args.num, SEED, "scan", 0)
    for i in range(args.warmup_steps):
        step(_batch(order, 0, i % steps, args.batch))
    synchronize(setup.device)
    start = time.perf_counter()
    last = {}
    done = 0
    for i in range(steps):
        last = step(_batch(order, 0, i, args.batch))
        done += 1
        if done % READ_EVERY == 0:
            float(last["loss"])  # the trainer reads the logged values (one host sync) every READ_EVERY steps
        if _cut(start, seconds, done, steps):
            break
    synchronize(setup.device)
    # With --budget-s an epoch may stop early: its time is then the measured steps' rate times all steps.
    return {"epoch_s": (time.perf_counter() - start) * steps / done, "steps": steps, "steps_timed": done,
            "epoch_s_extrapolated": done < steps,
            # the step returns 0-d tensors (it does not read them; the JSON needs a number)
            "final_loss": None if last.get("loss") is None else float(last["loss"])}


class _Clock:
    """Marks between phases: CUDA events (no sync inside the epoch) or perf_counter on the CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.marks: list[list] = []

    def mark(self):
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def elapsed_ms(self, a, b) -> float:
        return a.elapsed_time(b) if self.cuda else (b - a) * 1e3


def instrumented_epoch(args, setup: Setup, engine, backend: str, seconds: float | None = None) -> dict:
    """The same step as `_scan_step`, its backward split at the logits so loss and heads are timed apart."""
    from scan_dist.data.loaders import sample_partners
    from scan_dist.data.sampling import epoch_order, steps_per_epoch, stream_key
    from scan_dist.losses import scan_objective
    from scan_dist.stages import feature_cache, scan
    from scan_dist.trainer import READ_EVERY

    steps = steps_per_epoch(args.num, args.batch)
    order = epoch_order(args.num, SEED, "scan", 1)
    clock = _Clock(setup.device)
    per_step = []

    def one(batch):
        marks = [clock.mark()]  # below: what _scan_step and feature_logits do, in their order
        anchors = batch["index"].numpy()
        key = stream_key(SEED, "scan", batch["epoch"])
        partners = sample_partners(setup.neighbors, key, anchors)
        chosen = torch.cat([feature_cache.draw_views(key, anchors, feature_cache.ANCHOR_VIEW_DRAW, args.views),
                            feature_cache.draw_views(key, anchors, feature_cache.PARTNER_VIEW_DRAW, args.views)])
        features = setup.cache.get(chosen, torch.from_numpy(np.concatenate([anchors, partners])))
        marks.append(clock.mark())
        logits = engine(features)
        marks.append(clock.mark())
        loss, total, _, _ = scan_objective(logits[:, :len(anchors)], logits[:, len(anchors):], args.entropy_weight,
                                           backend=backend)
        marks.append(clock.mark())
        (grad,) = torch.autograd.grad(loss, logits)
        marks.append(clock.mark())
        logits.backward(grad)
        marks.append(clock.mark())
        engine.step()
        marks.append(clock.mark())
        total.detach().mean()  # what the step returns: a 0-d tensor, read only every READ_EVERY steps
        if len(per_step) % READ_EVERY == READ_EVERY - 1:
            float(total.mean())  # the trainer's periodic read (one host sync)
        return marks

    for i in range(args.warmup_steps):
        one(_batch(order, 1, i % steps, args.batch))
    synchronize(setup.device)
    start = time.perf_counter()
    for i in range(steps):
        per_step.append(one(_batch(order, 1, i, args.batch)))
        if _cut(start, seconds, len(per_step), steps):
            break
    synchronize(setup.device)
    done = len(per_step)
    wall = (time.perf_counter() - start) * steps / done
    sums = dict.fromkeys(PHASES, 0.0)
    for marks in per_step:
        for name, a, b in zip(PHASES, marks[:-1], marks[1:]):
            sums[name] += clock.elapsed_ms(a, b)
    timed = sum(sums.values())
    out = {"instrumented_epoch_s": wall, "instrumented_steps_timed": done,
           **{f"{p}_ms": v / done for p, v in sums.items()}}
    out["loss_share"] = (sums["loss_fwd"] + sums["loss_bwd"]) / timed
    out["heads_share"] = (sums["heads_fwd"] + sums["heads_bwd"]) / timed
    out["gather_share"] = sums["gather"] / timed
    return out


def isolated_loss_ms(args, setup: Setup, engine, backend: str, seconds: float | None = None) -> float:
    """Median ms of `scan_loss` forward + backward alone, on logits the trained heads give one batch (so their scale,
    which matters to CPU timings through denormals, is the epoch's)."""
    from scan_dist.data.loaders import sample_partners
    from scan_dist.data.sampling import stream_key
    from scan_dist.kernels import scan_loss

    rows = np.arange(args.batch, dtype=np.int64)
    partners = sample_partners(setup.neighbors, stream_key(SEED, "scan", 0), rows)
    with torch.no_grad():
        logits = engine(setup.cache.get(torch.ones(2 * args.batch, dtype=torch.long),
                                        torch.from_numpy(np.concatenate([rows, partners]))))
    a = logits[:, :args.batch].contiguous().requires_grad_(True)
    n = logits[:, args.batch:].contiguous().requires_grad_(True)

    def step():
        a.grad = n.grad = None
        total, _, _ = scan_loss(a, n, args.entropy_weight, backend=backend)
        total.sum().backward()

    return time_ms(step, setup.device, warmup=3, repeats=10, seconds=seconds)["median_ms"]


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.set_device(device)
    notes = [] if cuda else ["CPU run: timings say nothing about GPU speed"]
    backends = (args.backends or ("torch,triton" if cuda else "torch")).split(",")
    if not cuda and "triton" in backends:
        backends.remove("triton")
        notes.append("triton skipped: CUDA only in this benchmark")
    precisions = (args.precisions or ("fp32,bf16" if cuda else "fp32")).split(",")
    setup = make_setup(args, device)
    table_gb = setup.cache.table.numel() * 2 / 1e9
    print(f"features [{args.num}, {args.views + 1}, {args.dim}] fp16 ({table_gb:.2f} GB) on {device}; "
          f"K={args.k}, H={args.heads}, C={args.classes}, B={args.batch}")
    rows = []
    budget = Budget(args.budget_s)
    rows_left = len(precisions) * len(backends)
    for precision in precisions:
        for backend in backends:
            share = budget.share(rows_left)
            rows_left -= 1
            if share is not None and share < 1.0:
                notes.append(f"{precision} {backend}: skipped, --budget-s spent")
                continue
            # A row's share: the plain and the instrumented epochs 45 % each, the isolated loss 10 %.
            part = {k: None if share is None else share * f for k, f in (("epoch", 0.45), ("loss", 0.1))}
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            row = {"backend": backend, "precision": precision,
                   "shape": f"N={args.num} D={args.dim} V={args.views} H={args.heads} C={args.classes} B={args.batch}",
                   "N": args.num, "D": args.dim, "V": args.views,
                   "H": args.heads, "C": args.classes, "B": args.batch, "device": device.type}
            engine = make_engine(args, precision, device)
            row.update(plain_epoch(args, setup, engine, backend, part["epoch"]))
            row["img_s"] = row["steps"] * args.batch / row["epoch_s"]  # anchors per second
            if not args.no_instrumented:
                row.update(instrumented_epoch(args, setup, make_engine(args, precision, device), backend,
                                              part["epoch"]))
            row["loss_ms_isolated"] = isolated_loss_ms(args, setup, engine, backend, part["loss"])
            row["loss_share_isolated"] = row["loss_ms_isolated"] * row["steps"] / 1e3 / row["epoch_s"]
            if cuda:
                row["peak_gb"] = torch.cuda.max_memory_allocated() / 1e9
            rows.append(row)
            print(f"  {precision} {backend}: epoch {row['epoch_s']:.2f} s, loss share "
                  f"{row.get('loss_share', float('nan')):.2f}", flush=True)
    print_table(rows, ["precision", "backend", "steps", "epoch_s", "img_s", "loss_share",
                       "loss_share_isolated", "gather_ms", "heads_fwd_ms", "loss_fwd_ms", "loss_bwd_ms",
                       "heads_bwd_ms", "optimizer_ms"])
    for note in notes:
        print("note:", note)
    payload = {
        "environment": environment(device),
        "results": rows,
        "config": {**{k: getattr(args, k) for k in IMAGENET1K}, "lr": args.lr, "momentum": args.momentum,
                   "entropy_weight": args.entropy_weight, "warmup_steps": args.warmup_steps, "small": args.small,
                   "table_gb": table_gb, "optimizer": "sgd", "head_hidden": 0, "budget_s": args.budget_s},
        "notes": notes,
    }
    path = write_results("scan_epoch", payload, args.out)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
