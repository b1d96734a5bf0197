"""The demo's pretext stage on CPU with and without the host-allocator tuning (`run.tune_malloc`, host_memory.py).

Each sample is a fresh interpreter (mallopt settings and glibc's adaptive mmap threshold are per process) that
runs the `demo` preset's pretext stage for one epoch on ``--images`` Fashion-MNIST training images (a seeded
subset, ``data.max_images``) and reports, around the stage only: wall seconds, minor page faults, user and system
CPU seconds (`resource.getrusage`) and peak RSS of the training process. The views are built by the stage's
DataLoader worker(s) (``data.workers``, default 1 on CPU; forked, so they inherit the allocator settings); their
totals, reaped when the stage closes its loader, come from ``RUSAGE_CHILDREN`` as the ``workers_*`` fields
(``workers_peak_rss_mb`` is the largest worker's). Modes alternate (default, tuned, default, ...) so drifting
machine load hits both alike; the table and the JSON give the median of each, and ``ratio`` = default wall /
tuned wall.

Needs the Fashion-MNIST files (`make data`, or ``--data PATH``). Usage::

    python benchmarks/bench_host_memory.py                  # 16,384 images (32 steps of 512), 3 samples per mode
    python benchmarks/bench_host_memory.py --small          # 2,048 images (4 steps), 1 sample per mode
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repo root importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import Budget, add_budget_argument, environment, print_table, write_results

REPO = Path(__file__).resolve().parent.parent
DEFAULT_DATA = "/usr/share/datasets/fashion-mnist"

# One sample: the pretext stage alone, measured from inside the process.
_SAMPLE = r"""
import json, logging, resource, sys, tempfile, time
from pathlib import Path
import torch
from scan_dist.config import load_config
from scan_dist.context import RunContext
from scan_dist.host_memory import tune_malloc
from scan_dist.pipeline import stage_hashes
from scan_dist.stages import pretext

mode, images, data, threads = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
torch.set_num_threads(threads)
cfg = load_config("demo", ["pretext.epochs=1", "run.progress=false", f"data.max_images={images}",
                           f"data.path={data}"])
if mode == "tuned":
    tune_malloc()
with tempfile.TemporaryDirectory() as run_dir:
    ctx = RunContext(cfg, Path(run_dir), logging.getLogger("bench"))
    ctx.train_set, ctx.normalization  # open (and on first use cache) the images before the clock starts
    before, start = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    kids_before = resource.getrusage(resource.RUSAGE_CHILDREN)
    pretext.run(cfg, ctx, stage_hashes(cfg)["pretext"])
    wall, after = time.perf_counter() - start, resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    workers = ctx.loader_settings.workers
print(json.dumps({"wall_s": wall, "minor_faults": after.ru_minflt - before.ru_minflt,
                  "user_s": after.ru_utime - before.ru_utime, "system_s": after.ru_stime - before.ru_stime,
                  "peak_rss_mb": after.ru_maxrss / 1024, "workers": workers,
                  "workers_minor_faults": kids.ru_minflt - kids_before.ru_minflt,
                  "workers_user_s": kids.ru_utime - kids_before.ru_utime,
                  "workers_system_s": kids.ru_stime - kids_before.ru_stime,
                  "workers_peak_rss_mb": kids.ru_maxrss / 1024 if workers else 0.0}))
"""
_FIELDS = ("wall_s", "minor_faults", "user_s", "system_s", "peak_rss_mb", "workers_minor_faults", "workers_user_s",
           "workers_system_s", "workers_peak_rss_mb")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--small", action="store_true", help="2,048 images, 1 sample per mode")
    parser.add_argument("--images", type=int, default=None, help="training images (default 16384; 2048 small)")
    parser.add_argument("--samples", type=int, default=None, help="processes per mode (default 3; 1 small)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads per process (default 2)")
    parser.add_argument("--data", default=DEFAULT_DATA, help=f"Fashion-MNIST folder (default {DEFAULT_DATA})")
    parser.add_argument("--out", type=Path, default=None, help="results folder (default benchmarks/results)")
    add_budget_argument(parser)
    args = parser.parse_args(argv)
    args.images = args.images or (2048 if args.small else 16384)
    args.samples = args.samples or (1 if args.small else 3)
    return args


def run_sample(mode: str, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, "-c", _SAMPLE, mode, str(args.images), args.data, str(args.threads)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{mode} sample failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    args = parse_args(argv)
    if not Path(args.data).is_dir():
        raise SystemExit(f"--data {args.data} does not exist: install Fashion-MNIST (make data) or pass --data")
    samples: dict[str, list[dict]] = {"default": [], "tuned": []}
    budget = Budget(args.budget_s)
    notes = []
    last_pair_s = 0.0
    for index in range(args.samples):
        pair_start = time.perf_counter()
        if index and budget.limited and budget.left() < last_pair_s:
            notes.append(f"{index} of {args.samples} sample pairs: --budget-s would not fit another")
            break
        for mode in ("default", "tuned"):
            sample = run_sample(mode, args)
            samples[mode].append(sample)
            print(f"  sample {index + 1}/{args.samples} {mode:7s} " +
                  "  ".join(f"{k}={sample[k]:.4g}" for k in _FIELDS), flush=True)
        last_pair_s = time.perf_counter() - pair_start
    rows = []
    for mode, runs in samples.items():
        row = {"impl": mode, "shape": f"pretext {args.images} images", "samples": len(runs),
               "median_ms": 1e3 * statistics.median(r["wall_s"] for r in runs)}
        for field in _FIELDS:
            values = [r[field] for r in runs]
            row[field] = statistics.median(values)
            row[f"{field}_range"] = [min(values), max(values)]
        rows.append(row)
    rows[1]["ratio"] = rows[0]["median_ms"] / rows[1]["median_ms"]
    print_table(rows, ["impl", "shape", "samples", "wall_s", "minor_faults", "system_s", "peak_rss_mb",
                       "workers_minor_faults", "workers_system_s", "workers_peak_rss_mb", "ratio"])
    payload = {"benchmark": "host_memory", "environment": environment("cpu"),
               "config": {"small": args.small, "images": args.images, "samples": args.samples,
                          "threads": args.threads, "baselines": ["default"], "budget_s": args.budget_s,
                          "workers": samples["default"][0]["workers"] if samples["default"] else None},
               "results": rows, "samples": samples, "notes": notes}
    print(f"wrote {write_results('host_memory', payload, args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
