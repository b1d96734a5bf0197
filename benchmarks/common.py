"""Shared benchmark plumbing: timing (median over repeats after warm-up), environment facts, JSON output.

Every benchmark script prints a table and writes one JSON file to ``benchmarks/results/`` holding the device, the
library versions, the shapes and the median milliseconds of each implementation, plus ratios against the baseline
of the same run.  Timings on CPU or under ``TRITON_INTERPRET=1`` say nothing about GPU speed; the JSON records which.
"""
from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Callable

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def synchronize(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def time_ms(fn: Callable[[], object], device: torch.device | str, warmup: int = 5, repeats: int = 20,
            seconds: float | None = None) -> dict:
    """Median / min / max wall milliseconds of ``fn()`` over ``repeats`` runs after ``warmup`` runs.

    ``seconds``: the time this measurement may take, warm-up included.  Warm-up stops early once it has used a third
    of it, and repeats stop once another one would not fit; at least one warm-up call and one timed call always run
    (so a single call longer than ``seconds`` overruns: callers size their work first).  ``budget_cut`` says whether
    fewer calls than asked were made.
    """
    begin = time.perf_counter()
    done_warmup = 0
    for _ in range(max(1, warmup) if seconds is not None else warmup):
        fn()
        done_warmup += 1
        if seconds is not None:
            synchronize(device)
            if time.perf_counter() - begin > seconds / 3:
                break
    synchronize(device)
    samples: list[float] = []
    for _ in range(max(1, repeats)):
        spent = time.perf_counter() - begin
        if seconds is not None and samples and spent + statistics.median(samples) / 1e3 > seconds:
            break
        start = time.perf_counter()
        fn()
        synchronize(device)
        samples.append((time.perf_counter() - start) * 1e3)
    return {"median_ms": statistics.median(samples), "min_ms": min(samples), "max_ms": max(samples),
            "repeats": len(samples), "warmup": done_warmup,
            "budget_cut": len(samples) < repeats or done_warmup < warmup}


class Budget:
    """The seconds a benchmark script may take (``--budget-s``; None or 0: unlimited), shared out over the work
    items still to run: ``share(n)`` = what is left divided by the ``n`` items left, so time an early item does
    not use goes to the later ones."""

    def __init__(self, seconds: float | None):
        self.seconds = seconds if seconds and seconds > 0 else None
        self.start = time.perf_counter()

    @property
    def limited(self) -> bool:
        return self.seconds is not None

    def left(self) -> float:
        return float("inf") if self.seconds is None else self.seconds - (time.perf_counter() - self.start)

    def share(self, items_left: int) -> float | None:
        if self.seconds is None:
            return None
        return max(0.0, self.left()) / max(1, items_left)


def add_budget_argument(parser) -> None:
    parser.add_argument("--budget-s", type=float, default=None,
                        help="seconds this script may take; work is sized (repeats, query subsets, skipped cases) "
                             "to fit, and what was cut is noted in the JSON (default: unlimited)")


def _cpu_model() -> str:
    try:  # gpu_check.sh may run the benchmarks from a link farm holding only the kernels
        from scan_dist.reproducibility import cpu_model
    except ImportError:
        return platform.processor() or platform.machine() or "unknown"
    return cpu_model()


def environment(device: torch.device | str) -> dict:
    device = torch.device(device)
    info = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "device_type": device.type,
        "cpu_model": _cpu_model(),
        "cpu_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton_interpret": os.environ.get("TRITON_INTERPRET", "0"),
        "host": platform.node(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    try:
        import triton
        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    return info


def write_results(name: str, payload: dict, out_dir: Path | None = None) -> Path:
    """Write ``payload`` as ``<out_dir>/<name>-<device_type>-<timestamp>.json`` (atomic) and return the path."""
    out_dir = Path(out_dir or RESULTS_DIR)
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    path = out_dir / f"{name}-{payload['environment']['device_type']}-{stamp}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path


def print_table(rows: list[dict], columns: list[str]) -> None:
    widths = {c: max(len(c), *(len(_fmt(r.get(c))) for r in rows)) for c in columns}
    print("  ".join(c.ljust(widths[c]) for c in columns))
    for row in rows:
        print("  ".join(_fmt(row.get(c)).ljust(widths[c]) for c in columns))


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "-" if value is None else str(value)
