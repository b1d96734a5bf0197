"""A run's training history: `RUN_DIR/history.jsonl`, one JSON object per logged point of every training stage.

Rank 0 appends a line per read of the logged values (every `trainer.read_interval` steps and at each epoch end):
stage, epoch, step, global step, the stage's loss terms averaged over the steps since the previous point (and over
ranks), the learning rate, images/s of the global batch, the share of that time spent waiting for data, wall
seconds since the stage started, and on CUDA the peak GPU memory. Each line is one `write` of a complete line
followed by a flush, so a kill leaves at most a torn last line, which `read_history` skips. When a stage starts
(fresh or resumed), its points after the resume position are dropped first (one atomic rewrite), so a resumed run
continues the history without duplicate steps. With `run.tensorboard=true` (and the `tensorboard` package) the same
scalars also go to `RUN_DIR/tb/`.
"""
from __future__ import annotations

import json
from pathlib import Path

from .io_utils import write_text

HISTORY_FILE = "history.jsonl"


def read_history(run_dir) -> list[dict]:
    """Every complete point of `RUN_DIR/history.jsonl` (a torn or foreign line is skipped)."""
    path = Path(run_dir) / HISTORY_FILE
    if not path.is_file():
        return []
    points = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            point = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(point, dict) and "stage" in point:
            points.append(point)
    return points


class HistoryWriter:
    """Appends one stage's points (rank 0 only; other ranks get a writer that does nothing)."""

    def __init__(self, run_dir, stage: str, enabled: bool, tensorboard: bool = False, log=None):
        self.path = Path(run_dir) / HISTORY_FILE
        self.stage, self.enabled = stage, enabled
        self.tb = None
        if enabled and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # an optional extra: say so once, keep going
                if log is not None:
                    log.warning("run.tensorboard=true but the tensorboard package is not installed "
                                "(pip install -e .[tensorboard]); writing history.jsonl only")
            else:
                self.tb = SummaryWriter(log_dir=str(Path(run_dir) / "tb"))

    def start(self, epoch: int, step: int) -> None:
        """Drop this stage's points after (epoch, step), the position the stage (re)starts from."""
        if not self.enabled:
            return
        points = read_history(self.path.parent)
        kept = [p for p in points if p["stage"] != self.stage or (p["epoch"], p["step"]) <= (epoch, step)]
        if len(kept) != len(points) or (points and not self.path.read_text().endswith("\n")):
            write_text(self.path, "".join(json.dumps(p) + "\n" for p in kept))

    def add(self, point: dict) -> None:
        if not self.enabled:
            return
        point = {"stage": self.stage, **point}
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(point) + "\n")  # one write of a whole line
            handle.flush()
        if self.tb is not None:
            for key, value in point.items():
                if isinstance(value, (int, float)) and key not in ("epoch", "step", "global_step"):
                    self.tb.add_scalar(f"{self.stage}/{key}", value, point["global_step"])

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
            self.tb = None


def stage_progress(points: list[dict]) -> dict[str, dict]:
    """Per stage: its last point, throughput and ETA (from the last point's position and rate)."""
    out: dict[str, dict] = {}
    for point in points:
        out[point["stage"]] = point
    for stage, last in out.items():
        total = last.get("epochs", 0) * last.get("steps_per_epoch", 0)
        done = last.get("global_step", 0)
        rate = last.get("steps_per_s") or 0.0
        last = dict(last)
        last["eta_s"] = (total - done) / rate if rate > 0 and total >= done else None
        last["fraction"] = done / total if total else None
        out[stage] = last
    return out


def format_status(run_dir) -> str:
    """The local-run status: stages done, the running stage's epoch, last loss, images/s and ETA."""
    from .pipeline import read_marker

    run_dir = Path(run_dir)
    points = read_history(run_dir)
    lines = [f"run {run_dir}"]
    for stage, last in stage_progress(points).items():
        done = read_marker(run_dir, stage) is not None
        eta = last.get("eta_s")
        lines.append(f"  {stage:<10} {'done' if done else 'running or stopped'}: epoch {last['epoch'] + 1}/"
                     f"{last.get('epochs', '?')}, step {last['step']}/{last.get('steps_per_epoch', '?')}, loss "
                     + (f"{last['loss']:.4f}" if "loss" in last else "-")
                     + f", {last.get('images_per_s', 0):.0f} img/s"
                     + ("" if done or eta is None else f", ETA {eta / 60:.1f} min"))
    if not points:
        lines.append("  no training point logged yet (history.jsonl is empty)")
    lock = run_dir / ".lock"
    if lock.is_file():
        try:
            holder = json.loads(lock.read_text())
            lines.append(f"  held by pid {holder.get('pid')} on {holder.get('host')} since {holder.get('started')}")
        except (OSError, json.JSONDecodeError):
            pass
    if (run_dir / "metrics.json").is_file():
        lines.append(f"  finished: {run_dir / 'metrics.json'}")
    lines.append(f"  follow: tail -f {run_dir / 'log.txt'}")
    return "\n".join(lines)
