"""Screen settings at many seeds on one machine: a reference and each arm over the same seeds, P runs at a time.

Why it exists: one demo run is one draw of a wide distribution (70.9 to 76.2 final ACC over ten seeds of one
setting), so a one-point lever needs about ten paired draws an arm to show (benchmarks/results/accuracy_history.md,
sixth pass). On 2 CPU cores that is 2 x 10 x 14 min a lever; on one H200 a demo run takes about a minute and six
share the GPU, so ten draws of a reference and of two arms fit in a few device calls. This script is that screen,
prepared for a device call (no install, a budget, partial results that come back):

    python -m benchmarks.screen_arms RUN_ROOT --seeds 0-9 --parallel 6 --budget-s 480 --out $OUT \\
        --set data.path=.gpudata/fashion-mnist --set data.workers=2 --set run.deterministic=true \\
        --arm nobal selflabel.class_balance=false --arm sl_flip selflabel.teacher_flip=true

- `RUN_ROOT/ref/seed<S>` runs `python -m scan_dist.launch --local PRESET run.seed=S` plus every `--set`;
  `RUN_ROOT/<arm>/seed<S>` adds the arm's settings and starts `--from` the reference's seed, so only the stages the
  arm changes run again and the per-seed difference is paired (on a GPU, pairing needs `run.deterministic=true`).
- Runs go reference seed first, then each arm's run of that seed, so a budget cut leaves whole pairs.
- At `--budget-s` the running ones get SIGTERM (as SLURM's preemption: each checkpoints and stops), and the same
  command later resumes them: finished runs are skipped, stopped ones continue from their checkpoint.
- After every run that ends, `OUT/screen.json` (each run's status and figures, each arm's paired differences) and
  `OUT/report.md` (`python -m scan_dist.report` over the finished runs, with the ablation table) are rewritten.
  An arm that changes SimCLR or its views retrains the backbone from each seed, so its paired differences cancel
  nothing (README, "A changed SimCLR is a new draw"): judge it by report.md's unpaired row (Welch's interval over
  all seeds), not by screen.json's paired Δ.

Where `scan_dist.kernels` does not import (a checkout not installed with pip, as on the device machine), the script
and its runs import the package through a folder of symbolic links, as `benchmarks/gpu_check.sh` does.
"""
from __future__ import annotations

import argparse
import atexit
import datetime
import importlib.util
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
REFERENCE = "ref"
_NAME = re.compile(r"^[A-Za-z0-9_-]+$")


def package_farm(force: bool = False) -> Path | None:
    """A temporary folder whose `scan_dist` links every file of scan_dist/ plus kernels/ as scan_dist.kernels
    (what setup.py's package_dir does on install), removed at exit; None when `scan_dist.kernels` already imports
    (unless `force`)."""
    if not force and importlib.util.find_spec("scan_dist.kernels") is not None:
        return None
    farm = Path(tempfile.mkdtemp(prefix="screen_arms_pkg."))
    atexit.register(shutil.rmtree, farm, ignore_errors=True)  # links only: their targets stay
    (farm / "scan_dist").mkdir()
    for item in (REPO / "scan_dist").iterdir():
        (farm / "scan_dist" / item.name).symlink_to(item)
    (farm / "scan_dist" / "kernels").symlink_to(REPO / "kernels")
    return farm


def launcher(farm: Path | None) -> list[str]:
    """The command prefix that runs `python -m scan_dist.launch` (through `farm` when given) from any folder."""
    if farm is None:
        return [sys.executable, "-m", "scan_dist.launch"]
    code = ("import runpy, sys; sys.path.insert(0, sys.argv.pop(1)); "
            "runpy.run_module('scan_dist.launch', run_name='__main__', alter_sys=True)")
    return [sys.executable, "-c", code, str(farm)]


@dataclass
class Run:
    arm: str
    seed: int
    folder: Path
    overrides: list[str]
    status: str = "waiting"  # waiting | running | done | failed | stopped | skipped
    rc: int | None = None
    seconds: float = 0.0
    process: subprocess.Popen | None = field(default=None, repr=False)
    started: float = 0.0

    @property
    def name(self) -> str:
        return f"{self.arm}_seed{self.seed}"


def parse_seeds(text: str) -> list[int]:
    """'0-9' or '0,1,2' (or both: '0-4,7') -> distinct seeds in order."""
    seeds: list[int] = []
    try:
        for part in (p.strip() for p in text.split(",") if p.strip()):
            lo, _, hi = part.partition("-")
            seeds += list(range(int(lo), int(hi) + 1)) if hi else [int(lo)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--seeds wants 0-9 or 0,1,2; got {text!r}") from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise argparse.ArgumentTypeError(f"--seeds wants distinct seeds such as 0-9 or 0,1,2; got {text!r}")
    return seeds


def plan_runs(root: Path, seeds: list[int], common: list[str], arms: dict[str, list[str]]) -> list[Run]:
    """Reference seed S, then every arm's seed S, for each seed in turn."""
    runs = []
    for seed in seeds:
        runs.append(Run(REFERENCE, seed, root / REFERENCE / f"seed{seed}", [*common, f"run.seed={seed}"]))
        for arm, settings in arms.items():
            runs.append(Run(arm, seed, root / arm / f"seed{seed}", [*common, *settings, f"run.seed={seed}"]))
    return runs


def command(run: Run, preset: str, prefix: list[str], reference: Run | None) -> list[str]:
    argv = [*prefix, "--local", "--run-dir", str(run.folder)]
    if reference is not None:
        argv += ["--from", str(reference.folder)]
    return [*argv, preset, *run.overrides]


def summarize(runs: list[Run], out: Path, preset: str, budget_s: float | None, wall_s: float, argv: list[str],
              device: str) -> dict:
    """Write OUT/screen.json and OUT/report.md from the runs so far; return the summary."""
    from scan_dist.io_utils import write_json, write_text
    from scan_dist.report import ReportError, format_comparison_md, load_run, mean_std

    rows: dict[tuple[str, int], dict] = {}
    loaded = []  # each finished run read once, for its row and for the report
    for run in runs:
        row = {"arm": run.arm, "seed": run.seed, "run_dir": str(run.folder), "status": run.status, "rc": run.rc,
               "wall_s": round(run.seconds, 1), "overrides": run.overrides}
        if run.status == "done":
            try:
                found = load_run(run.folder)
            except ReportError as exc:  # named in screen.json, left out of the report
                row["error"] = str(exc)
            else:
                row.update({key: found[key] for key in ("acc", "nmi", "ari", "scan_acc", "kmeans_acc")})
                row["stage_seconds"] = found["seconds"]
                loaded.append(found)
        rows[(run.arm, run.seed)] = row
    arms: dict[str, dict] = {}
    for arm in dict.fromkeys(r.arm for r in runs):
        done = [r for r in rows.values() if r["arm"] == arm and r.get("acc") is not None]
        mean, std, n = mean_std([100 * r["acc"] for r in done])
        summary = {"finished": n, "final_acc_mean": mean, "final_acc_std": std}
        if arm != REFERENCE:
            deltas = {}
            for r in done:
                ref_acc = rows[(REFERENCE, r["seed"])].get("acc")
                if ref_acc is not None:
                    deltas[str(r["seed"])] = round(100 * (r["acc"] - ref_acc), 2)
            d_mean, d_std, d_n = mean_std(list(deltas.values()))
            summary.update({"paired_delta_final_by_seed": deltas, "paired_delta_mean": d_mean,
                            "paired_delta_std": d_std, "paired": d_n})
        arms[arm] = summary
    result = {"command": " ".join(argv), "date": datetime.datetime.now().isoformat(timespec="seconds"),
              "device": device, "preset": preset, "budget_s": budget_s, "wall_s": round(wall_s, 1),
              "arms": arms, "runs": list(rows.values())}
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "screen.json", result)
    if loaded:
        # Reference runs first: the report pairs every other setup against the first one it meets.
        loaded.sort(key=lambda found: Path(found["path"]).parent.name != REFERENCE)
        write_text(out / "report.md", format_comparison_md(loaded))
    return result


def _device() -> str:
    try:
        import torch

        if torch.cuda.is_available():
            return f"{torch.cuda.get_device_name(0)}, {os.cpu_count()} CPU cores, torch {torch.__version__}"
        return f"CPU only, {os.cpu_count()} cores, torch {torch.__version__}"
    except ImportError:
        return f"{os.cpu_count()} CPU cores, no torch"


class Screen:
    """Runs the planned runs, `parallel` at a time, within `budget_s`; an arm's seed waits for the reference's."""

    def __init__(self, runs: list[Run], preset: str, prefix: list[str], parallel: int, budget_s: float | None,
                 out: Path, argv: list[str], grace_s: float = 60.0, poll_s: float = 1.0):
        self.runs, self.preset, self.prefix, self.parallel = runs, preset, prefix, parallel
        self.budget_s, self.out, self.argv, self.grace_s, self.poll_s = budget_s, out, argv, grace_s, poll_s
        self.start = time.monotonic()
        self.stop_asked = False
        self.device = _device()

    def reference_of(self, run: Run) -> Run | None:
        if run.arm == REFERENCE:
            return None
        return next(r for r in self.runs if r.arm == REFERENCE and r.seed == run.seed)

    def out_of_time(self) -> bool:
        return self.stop_asked or (self.budget_s is not None and time.monotonic() - self.start >= self.budget_s)

    def _launch(self, run: Run) -> None:
        run.folder.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.out / "logs" / f"{run.name}.log", "a", encoding="utf-8")
        argv = command(run, self.preset, self.prefix, self.reference_of(run))
        log.write(f"$ {' '.join(argv)}\n")
        log.flush()
        # Its own session: SIGTERM reaches the run's data workers too, as SLURM signals a whole step.
        run.process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        run.status, run.started = "running", time.monotonic()
        print(f"[{self.elapsed():6.0f} s] start {run.name}", flush=True)

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def _reap(self, run: Run) -> bool:
        rc = run.process.poll()
        if rc is None:
            return False
        run.rc, run.seconds, run.process = rc, time.monotonic() - run.started, None
        done = rc == 0 and (run.folder / "metrics.json").is_file()
        run.status = "done" if done else ("stopped" if rc == 143 else "failed")
        print(f"[{self.elapsed():6.0f} s] {run.status} {run.name} (exit {rc}, {run.seconds:.0f} s)", flush=True)
        return True

    def ready(self, run: Run) -> bool | None:
        """True: may start; False: wait for its reference; None: never (its reference did not finish)."""
        reference = self.reference_of(run)
        if reference is None or reference.status == "done":
            return True
        return None if reference.status in ("failed", "stopped", "skipped") else False

    def run(self) -> dict:
        (self.out / "logs").mkdir(parents=True, exist_ok=True)
        for run in self.runs:
            if (run.folder / "metrics.json").is_file():
                run.status = "done"  # finished by an earlier call: the launcher would skip every stage anyway
        self.write()
        while True:
            running = [r for r in self.runs if r.status == "running"]
            ended = [r for r in running if self._reap(r)]
            if ended:
                self.write()
            if self.out_of_time():
                break
            for run in self.runs:
                if run.status == "waiting" and self.ready(run) is None:
                    run.status = "skipped"
            running = [r for r in self.runs if r.status == "running"]
            for run in self.runs:
                if len(running) >= self.parallel:
                    break
                if run.status == "waiting" and self.ready(run):
                    self._launch(run)
                    running.append(run)
            if not running and not any(r.status == "waiting" for r in self.runs):
                break
            time.sleep(self.poll_s)
        self.stop_running()
        return self.write()

    def stop_running(self) -> None:
        running = [r for r in self.runs if r.status == "running"]
        for run in running:
            print(f"[{self.elapsed():6.0f} s] out of time: SIGTERM to {run.name}", flush=True)
            _signal_group(run.process, signal.SIGTERM)
        deadline = time.monotonic() + self.grace_s
        while running and time.monotonic() < deadline:
            running = [r for r in running if not self._reap(r)]
            time.sleep(min(self.poll_s, 0.2))
        for run in running:
            _signal_group(run.process, signal.SIGKILL)
            run.process.wait()
            self._reap(run)

    def write(self) -> dict:
        return summarize(self.runs, self.out, self.preset, self.budget_s, self.elapsed(), self.argv, self.device)


def _signal_group(process: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(process.pid, sig)
    except ProcessLookupError:
        pass


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.screen_arms", description=__doc__.split("\n\n")[0])
    parser.add_argument("root", type=Path, metavar="RUN_ROOT", help="run folders go to RUN_ROOT/<arm>/seed<S>")
    parser.add_argument("--preset", default="demo", help="preset or YAML file every run starts from (default: demo)")
    parser.add_argument("--seeds", type=parse_seeds, default=parse_seeds("0-9"), help="e.g. 0-9 or 0,1,2 (default 0-9)")
    parser.add_argument("--set", dest="common", action="append", default=[], metavar="KEY=VALUE",
                        help="a setting of every run, reference and arms (repeatable)")
    parser.add_argument("--arm", nargs="+", action="append", default=[], metavar=("NAME", "KEY=VALUE"),
                        help="an arm: its name, then the settings it changes (repeatable)")
    parser.add_argument("--parallel", type=int, default=1, help="runs at a time (default 1)")
    parser.add_argument("--budget-s", type=float, default=None,
                        help="stop starting runs and SIGTERM the running ones after this many seconds")
    parser.add_argument("--grace-s", type=float, default=60.0,
                        help="after SIGTERM, seconds a run has to checkpoint before SIGKILL (default 60)")
    parser.add_argument("--out", type=Path, default=None, help="where screen.json, report.md and logs go "
                                                                 "(default RUN_ROOT)")
    args = parser.parse_args(argv)
    arms: dict[str, list[str]] = {}
    for name, *settings in args.arm:
        if not _NAME.match(name) or name == REFERENCE or name in arms:
            parser.error(f"--arm {name}: a name of letters, digits, _ or -, not '{REFERENCE}', used once")
        if not settings or not all("=" in s for s in settings):
            parser.error(f"--arm {name}: give the settings it changes as KEY=VALUE")
        arms[name] = settings
    if args.parallel < 1:
        parser.error("--parallel must be at least 1")
    if any("=" not in s or s.startswith(("run.seed=", "run.start_from=")) for s in args.common):
        parser.error("--set wants KEY=VALUE, and not run.seed or run.start_from (the screen sets those)")
    args.arms = arms
    args.out = args.out or args.root
    return args


def check_settings(preset: str, common: list[str], arms: dict[str, list[str]]) -> None:
    """Every arm's config builds (a misspelt key stops the screen before any run starts)."""
    from scan_dist.config import load_config
    from scan_dist.errors import ScanDistError

    for arm, settings in {REFERENCE: [], **arms}.items():
        try:
            load_config(preset, [*common, *settings])
        except ScanDistError as exc:
            raise SystemExit(f"error: arm {arm}: {exc}") from None


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    farm = package_farm()
    if farm is not None:
        sys.path.insert(0, str(farm))
        for name in [m for m in sys.modules if m == "scan_dist" or m.startswith("scan_dist.")]:
            del sys.modules[name]
    check_settings(args.preset, args.common, args.arms)
    runs = plan_runs(args.root.resolve(), args.seeds, args.common, args.arms)
    screen = Screen(runs, args.preset, launcher(farm), args.parallel, args.budget_s, args.out.resolve(),
                    ["python -m benchmarks.screen_arms", *argv], grace_s=args.grace_s)

    def ask_stop(signum, frame):  # the device's limit or a user's Ctrl-C: stop the runs cleanly, keep the summary
        screen.stop_asked = True

    signal.signal(signal.SIGTERM, ask_stop)
    signal.signal(signal.SIGINT, ask_stop)
    result = screen.run()
    for arm, summary in result["arms"].items():
        delta = "" if arm == REFERENCE or summary.get("paired_delta_mean") is None else (
            f", paired Δ final {summary['paired_delta_mean']:+.2f} over {summary['paired']} seeds")
        mean = summary["final_acc_mean"]
        print(f"{arm}: {summary['finished']} finished" + (f", final ACC {mean:.2f}" if mean is not None else "") + delta)
    print(f"summary: {screen.out / 'screen.json'}; report: {screen.out / 'report.md'}")
    return 0 if all(r.status == "done" for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
