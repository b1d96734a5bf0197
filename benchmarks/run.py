"""Run every benchmark script, collect their JSON into one file per device type, and plot ours vs the baselines.

Usage (from the repository root)::

    python -m benchmarks.run                       # every benchmarks/bench_*.py, full size
    python -m benchmarks.run --small               # CPU-sized smoke runs
    python -m benchmarks.run --small --only scan_loss knn
    python -m benchmarks.run --script-args scan_loss "--repeats 3 --no-compile"
    python -m benchmarks.run --budget-s 1800        # all of them within 30 minutes (default: 600 s)
    python -m benchmarks.run --budget-s 0           # no budget: every script at its full default size

Budget: ``--budget-s`` (default 600, i.e. the whole run fits 10 minutes) is shared out over the benchmarks by
weight (``WEIGHTS``; what a finished one did not use goes to the ones after it).  Each script that declares
``--budget-s`` gets its share minus a start-up allowance and sizes itself to fit (fewer repeats, a query subset
with the full-size time extrapolated, skipped cases -- all noted in its JSON); every script is killed at its share,
so the run ends within the budget whatever a script does.

Each ``bench_<name>.py`` runs as its own subprocess (``python bench_<name>.py [--small] --out TMP``), so a crash,
an out-of-memory kill or a missing optional library in one benchmark is reported and the others still run.  A
script that has no ``--out`` flag is run without it, and the JSON files ``<name>-*.json`` it wrote to
``benchmarks/results/`` after it started are collected instead.

Output, in ``--out-dir`` (default ``benchmarks/results/``):

* ``all-<device_type>-<timestamp>.json``: ``{"environment": ..., "benchmarks": {name: payload | {"error": ...}}}``
  where ``payload`` is the benchmark's own JSON unchanged (its ``environment``, ``config`` and ``results`` rows) and
  ``environment`` is that of the machine running this script.  Benchmarks are filed under the ``device_type`` their
  own payload records; failed ones under this machine's (``cuda`` when a GPU is visible, else ``cpu``);
* ``all-<device_type>-<timestamp>-<name>.png`` beside it: per benchmark, one panel per case (shape, pipeline, model
  and step, ...) with a bar per implementation: throughput (higher is better) when the rows carry one, else median
  milliseconds (lower is better).  Baselines are grey, ours coloured; rows measured in Triton's CPU interpreter are
  hatched, since they time numpy rather than a GPU.

Exit status: 0 when every benchmark produced JSON, 1 when any failed (the combined file is still written), 2 for a
usage error (unknown ``--only`` name, no scripts found).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any, Mapping, Sequence

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
RESULTS_DIR = BENCH_DIR / "results"

# Implementations that are reference points rather than this project's code paths, per benchmark (a payload's own
# config["baselines"] list is honoured too).  Everything else in a plot is "ours".
BASELINES: dict[str, frozenset] = {
    "knn": frozenset({"naive_fp32", "naive_bf16", "faiss"}),
    "scan_loss": frozenset({"torch", "compile"}),
    "pipeline": frozenset({"tv2"}),
}
# Row fields naming the implementation when a row has no "impl", and fields naming the case being measured.
_IMPL_FIELDS = ("backend", "zero", "precision", "compile", "channels_last", "augment", "workers", "threads")
_CASE_FIELDS = ("shape", "pipeline", "model", "step", "dtype", "data")
# Throughput fields (higher is better), preferred over median_ms when present.
_THROUGHPUT_FIELDS = (("views_per_s", "views/s"), ("img_s", "images/s"))
_TAIL_LINES = 40
# Relative shares of --budget-s (names not listed weigh 1): k-NN at ImageNet size and the training steps are the
# long ones.
WEIGHTS = {"knn": 3.0, "train_step": 3.0, "scan_epoch": 2.0, "pipeline": 2.0, "scan_loss": 1.0}
DEFAULT_BUDGET_S = 600.0
# Kept back from the budget for the runner itself (combined JSON, plots), and per script for interpreter and torch
# start-up, which a script cannot count in its own budget.
_RUNNER_RESERVE_S = 15.0
_STARTUP_S = 5.0


def discover(scripts_dir: Path) -> dict[str, Path]:
    """``{name: path}`` for every ``bench_<name>.py`` in ``scripts_dir``, sorted by name."""
    return {p.stem[len("bench_"):]: p for p in sorted(scripts_dir.glob("bench_*.py")) if p.is_file()}


def script_flags(script: Path) -> set[str]:
    """The long options a script declares (read from its source, which is faster than importing torch for --help)."""
    text = script.read_text(encoding="utf-8", errors="replace")
    flags = set(re.findall(r"""add_argument\(\s*["'](--[A-Za-z0-9][\w-]*)["']""", text))
    if "add_budget_argument(" in text:  # benchmarks.common's shared --budget-s option
        flags.add("--budget-s")
    return flags


def _device_type() -> str:
    try:
        import torch
        return "cuda" if torch.cuda.is_available() else "cpu"
    except ImportError:
        return "cpu"


def _environment(device_type: str) -> dict:
    try:
        sys.path.insert(0, str(REPO_ROOT))
        from benchmarks.common import environment
        return environment(device_type)
    except Exception as exc:  # the runner still reports results without torch
        import platform
        return {"device_type": device_type, "python": platform.python_version(), "host": platform.node(),
                "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                "environment_error": f"{type(exc).__name__}: {exc}"}
    finally:
        if sys.path and sys.path[0] == str(REPO_ROOT):
            sys.path.pop(0)


def _run_streaming(cmd: list[str], timeout_s: float | None, prefix: str) -> tuple[int | None, str, bool]:
    """Run ``cmd`` echoing its output with ``prefix``; returns (return code, last lines, timed out)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), *filter(None, [env.get("PYTHONPATH")])])
    env.setdefault("PYTHONUNBUFFERED", "1")
    tail: deque[str] = deque(maxlen=_TAIL_LINES)
    proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, errors="replace", start_new_session=True)
    timed_out = threading.Event()

    def kill() -> None:
        timed_out.set()
        try:
            os.killpg(proc.pid, 9)  # the benchmark's own process group (start_new_session), children included
        except ProcessLookupError:
            pass

    timer = threading.Timer(timeout_s, kill) if timeout_s else None
    if timer:
        timer.start()
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            tail.append(line.rstrip("\n"))
            print(f"{prefix}{line}", end="", flush=True)
        code = proc.wait()
    except BaseException:
        kill()
        proc.wait()
        raise
    finally:
        if timer:
            timer.cancel()
    return code, "\n".join(tail), timed_out.is_set()


def _merge_payloads(paths: Sequence[Path]) -> dict:
    payloads = [json.loads(p.read_text(encoding="utf-8")) for p in paths]
    if len(payloads) == 1:
        return payloads[0]
    # Several files from one script: keep the first one's metadata and concatenate the rows.
    merged = dict(payloads[0])
    merged["results"] = [row for p in payloads for row in p.get("results", [])]
    merged["files"] = [p.name for p in paths]
    return merged


def share_s(left_s: float, weights: Mapping[str, float], names: Sequence[str]) -> float:
    """Seconds for ``names[0]`` out of ``left_s`` shared by weight among ``names`` (the benchmarks still to run)."""
    total = sum(weights.get(n, 1.0) for n in names)
    return max(0.0, left_s) * weights.get(names[0], 1.0) / total


def run_one(name: str, script: Path, small: bool, timeout_s: float | None,
            extra_args: Sequence[str] = (), budget_s: float | None = None) -> tuple[dict, float]:
    """Run one benchmark; returns (its payload or ``{"error": ...}``, seconds).  ``budget_s``: passed on as
    ``--budget-s`` (less a start-up allowance) when the script declares it; the caller also kills at it."""
    flags = script_flags(script)
    tmp = Path(tempfile.mkdtemp(prefix=f"bench-{name}-"))
    cmd = [sys.executable, str(script)]
    notes = []
    if small:
        if "--small" in flags:
            cmd.append("--small")
        else:
            notes.append("script has no --small flag; ran at full size")
    if budget_s is not None:
        if "--budget-s" in flags:
            cmd += ["--budget-s", f"{max(1.0, budget_s * 0.9 - _STARTUP_S):.0f}"]
        else:
            notes.append(f"script has no --budget-s flag: not sized to its {budget_s:.0f} s share, only killed "
                         "at it")
    uses_out = "--out" in flags
    if uses_out:
        cmd += ["--out", str(tmp)]
    cmd += list(extra_args)
    print(f"== {name}: {shlex.join(cmd)}", flush=True)
    started_wall = time.time()
    start = time.perf_counter()
    try:
        code, tail, timed_out = _run_streaming(cmd, timeout_s, prefix=f"[{name}] ")
        seconds = time.perf_counter() - start
        if uses_out:
            found = sorted(tmp.glob("*.json"))
        else:  # collect what it wrote to results/ since it started, by modification time
            found = sorted((p for p in RESULTS_DIR.glob(f"{name}-*.json")
                            if p.stat().st_mtime >= started_wall - 1.0), key=lambda p: p.stat().st_mtime)
        error = None
        if timed_out:
            error = f"timed out after {timeout_s:g} s"
        elif code != 0:
            error = f"exit status {code}"
        elif not found:
            error = "finished but wrote no JSON"
        if error is None:
            try:
                payload = _merge_payloads(found)
            except (OSError, ValueError) as exc:
                error = f"unreadable JSON: {exc}"
        if error is not None:
            payload = {"error": error, "returncode": code, "command": shlex.join(cmd), "output_tail": tail}
        if notes:
            payload["runner_notes"] = notes
        return payload, seconds
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ---------------------------------------------------------------------------------------------- plots


def _label(row: Mapping, fields: Sequence[str], varying: set[str]) -> str:
    parts = []
    for field in fields:
        if field in row and field in varying:
            value = row[field]
            parts.append(f"{field}={value}" if isinstance(value, bool) or field in ("zero", "workers", "threads")
                         else str(value))
    return " ".join(parts)


def plot_series(name: str, payload: Mapping) -> tuple[str, str, dict[str, list[tuple[str, float, bool, bool]]]]:
    """(metric key, axis label, {case: [(implementation, value, is_baseline, interpreter)]}) for one payload."""
    rows = [r for r in payload.get("results", []) if isinstance(r, Mapping)]
    metric, unit = "median_ms", "median ms (lower is better)"
    for key, what in _THROUGHPUT_FIELDS:
        if any(isinstance(r.get(key), (int, float)) for r in rows):
            metric, unit = key, f"{what} (higher is better)"
            break
    rows = [r for r in rows if isinstance(r.get(metric), (int, float)) and not isinstance(r.get(metric), bool)]
    varying = {f for f in (*_IMPL_FIELDS, *_CASE_FIELDS) if len({json.dumps(r.get(f), default=str) for r in rows}) > 1}
    case_fields = [f for f in _CASE_FIELDS if f in varying] or [f for f in _CASE_FIELDS if any(f in r for r in rows)]
    config = payload.get("config") if isinstance(payload.get("config"), Mapping) else {}
    baselines = set(BASELINES.get(name, ())) | {str(b) for b in config.get("baselines", []) or []}
    cases: dict[str, list[tuple[str, float, bool, bool]]] = {}
    for row in rows:
        case = " ".join(str(row[f]) for f in case_fields if f in row) or name
        impl = str(row["impl"]) if "impl" in row else (_label(row, _IMPL_FIELDS, varying)
                                                        or _label(row, ("backend", "precision"), set(_IMPL_FIELDS))
                                                        or "run")
        if "impl" in row:
            extra = _label(row, [f for f in _IMPL_FIELDS if f not in case_fields], varying)
            impl = f"{impl} {extra}".strip()
        cases.setdefault(case, []).append((impl, float(row[metric]), str(row.get("impl")) in baselines,
                                           bool(row.get("interpreter"))))
    return metric, unit, cases


def write_plot(path: Path, name: str, payload: Mapping, device: str = "") -> bool:
    """One PNG for a benchmark payload; False (and no file) when it has no plottable rows."""
    from matplotlib.figure import Figure

    _, unit, cases = plot_series(name, payload)
    if not cases:
        return False
    max_cases = 16
    shown = list(cases.items())[:max_cases]
    heights = [0.9 + 0.32 * len(bars) for _, bars in shown]
    fig = Figure(figsize=(8.0, min(sum(heights) + 0.8, 60.0)), dpi=100)
    axes = fig.subplots(len(shown), 1, squeeze=False, gridspec_kw={"height_ratios": heights})[:, 0]
    for ax, (case, bars) in zip(axes, shown):
        labels = [b[0] for b in bars]
        values = [b[1] for b in bars]
        colours = ["#9e9e9e" if b[2] else "#dd8452" for b in bars]
        drawn = ax.barh(range(len(bars)), values, color=colours)
        for bar, (_, _, _, interp) in zip(drawn, bars):
            if interp:
                bar.set_hatch("//")
                bar.set_edgecolor("black")
        ax.set_yticks(range(len(bars)))
        ax.set_yticklabels([f"{lab} (interp.)" if b[3] else lab for lab, b in zip(labels, bars)], fontsize=8)
        ax.invert_yaxis()
        positive = [v for v in values if v > 0]
        if positive and max(positive) / min(positive) > 100:
            ax.set_xscale("log")
        for bar, value in zip(drawn, values):
            ax.annotate(f"{value:.4g}", (bar.get_width(), bar.get_y() + bar.get_height() / 2),
                        xytext=(3, 0), textcoords="offset points", va="center", fontsize=7)
        ax.set_title(case, fontsize=9, loc="left")
        ax.grid(axis="x", alpha=0.3)
        ax.margins(x=0.15)
    axes[-1].set_xlabel(unit)
    more = f" (first {max_cases} of {len(cases)} cases)" if len(cases) > max_cases else ""
    fig.suptitle(f"{name}{' on ' + device if device else ''}: grey = baseline, orange = ours{more}", fontsize=10)
    fig.tight_layout()
    tmp = path.with_name(f".tmp-{path.name}")
    try:
        fig.savefig(tmp, format="png")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return True


# ---------------------------------------------------------------------------------------------- main


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(f".tmp-{path.name}")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run",
                                     description="Run benchmarks/bench_*.py and combine their JSON and plots.")
    parser.add_argument("--small", action="store_true", help="pass --small to every script (CPU-sized runs)")
    parser.add_argument("--only", nargs="+", metavar="NAME", default=None,
                        help="run only these benchmarks (NAME as in bench_NAME.py)")
    parser.add_argument("--out-dir", type=Path, default=RESULTS_DIR, help="where the combined JSON and PNGs go")
    parser.add_argument("--scripts-dir", type=Path, default=BENCH_DIR, help="where to look for bench_*.py")
    parser.add_argument("--script-args", nargs=2, action="append", default=[], metavar=("NAME", "ARGS"),
                        help='extra arguments for one script, e.g. --script-args scan_loss "--repeats 3"')
    parser.add_argument("--timeout-s", type=float, default=None, help="kill a benchmark after this many seconds")
    parser.add_argument("--budget-s", type=float, default=DEFAULT_BUDGET_S,
                        help=f"seconds for the whole run, shared out by weight (default {DEFAULT_BUDGET_S:g}; "
                             "0: no budget, full-size scripts)")
    parser.add_argument("--no-plots", action="store_true", help="write only the combined JSON")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    scripts = discover(args.scripts_dir)
    if not scripts:
        print(f"benchmarks.run: error: no bench_*.py in {args.scripts_dir}", file=sys.stderr)
        return 2
    names = list(scripts)
    if args.only:
        unknown = [n for n in args.only if n not in scripts]
        if unknown:
            print(f"benchmarks.run: error: unknown benchmark(s) {', '.join(unknown)}; "
                  f"available: {', '.join(scripts)}", file=sys.stderr)
            return 2
        names = list(dict.fromkeys(args.only))
    extra: dict[str, list[str]] = {}
    for name, text in args.script_args:
        if name not in scripts:
            print(f"benchmarks.run: error: --script-args for unknown benchmark {name}", file=sys.stderr)
            return 2
        extra.setdefault(name, []).extend(shlex.split(text))

    local_type = _device_type()
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    by_type: dict[str, dict[str, Any]] = {}
    summary = []
    budgeted = args.budget_s is not None and args.budget_s > 0
    run_start = time.perf_counter()
    for position, name in enumerate(names):
        timeout_s, share = args.timeout_s, None
        if budgeted:
            left = args.budget_s - _RUNNER_RESERVE_S - (time.perf_counter() - run_start)
            share = share_s(left, WEIGHTS, names[position:])
            timeout_s = share if timeout_s is None else min(timeout_s, share)
            if share < 1.0:
                payload = {"error": "skipped: --budget-s spent"}
                by_type.setdefault(local_type, {})[name] = payload
                summary.append((name, "FAILED (skipped: --budget-s spent)", 0.0))
                print(f"== {name}: skipped, --budget-s spent", flush=True)
                continue
            print(f"== {name}: share {share:.0f} s of --budget-s {args.budget_s:g}", flush=True)
        payload, seconds = run_one(name, scripts[name], args.small, timeout_s, extra.get(name, ()), share)
        env = payload.get("environment") if isinstance(payload.get("environment"), Mapping) else {}
        device_type = str(env.get("device_type") or local_type)
        by_type.setdefault(device_type, {})[name] = payload
        status = f"FAILED ({payload['error']})" if "error" in payload else "ok"
        summary.append((name, status, seconds))
        print(f"== {name}: {status} in {seconds:.1f} s", flush=True)

    args.out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for device_type, benchmarks in by_type.items():
        path = args.out_dir / f"all-{device_type}-{stamp}.json"
        _write_json(path, {"environment": _environment(device_type), "benchmarks": benchmarks})
        written.append(path)
        if args.no_plots:
            continue
        for name, payload in benchmarks.items():
            if "error" in payload:
                continue
            png = args.out_dir / f"all-{device_type}-{stamp}-{name}.png"
            device = str((payload.get("environment") or {}).get("device", ""))
            try:
                if write_plot(png, name, payload, device):
                    written.append(png)
            except Exception as exc:  # a plot must never lose the collected numbers
                print(f"benchmarks.run: warning: no plot for {name}: {type(exc).__name__}: {exc}", file=sys.stderr)

    width = max(len("benchmark"), *(len(n) for n, _, _ in summary))
    print(f"\n{'benchmark':<{width}}  {'seconds':>8}  status")
    for name, status, seconds in summary:
        print(f"{name:<{width}}  {seconds:8.1f}  {status}")
    for path in written:
        print(f"wrote {path}")
    return 1 if any(s != "ok" for _, s, _ in summary) else 0


if __name__ == "__main__":
    raise SystemExit(main())
