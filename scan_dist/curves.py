"""`RUN_DIR/curves.png`: the training curves of a run from its history.jsonl, one panel per training stage.

Each panel plots the stage's logged terms (loss, and e.g. SCAN's consistency/entropy or self-labelling's confident
fraction) against the global step, and its throughput (images/s, dashed) on a second axis; epoch boundaries are
faint vertical lines.
"""
from __future__ import annotations

import os
from collections import OrderedDict

from .history import read_history

# Keys of a point that are positions or bookkeeping, not curves.
_NOT_CURVES = {"stage", "epoch", "step", "global_step", "epochs", "steps_per_epoch", "wall_s", "steps_per_s",
               "images_per_s", "data_wait_fraction", "lr", "gpu_peak_gb"}


def write_curves_png(path: str | os.PathLike, run_dir) -> bool:
    """Draw the curves of every stage in `run_dir`'s history; False (nothing written) when there is no history."""
    from matplotlib.figure import Figure

    stages: "OrderedDict[str, list[dict]]" = OrderedDict()
    for point in read_history(run_dir):
        stages.setdefault(point["stage"], []).append(point)
    if not stages:
        return False
    fig = Figure(figsize=(5.2 * len(stages), 3.8), dpi=100)
    for i, (stage, points) in enumerate(stages.items()):
        ax = fig.add_subplot(1, len(stages), i + 1)
        steps = [p["global_step"] for p in points]
        keys = [k for k in points[-1] if k not in _NOT_CURVES and isinstance(points[-1][k], (int, float))]
        marker = "o" if len(points) < 30 else None  # a short run: show the points themselves
        for key in keys:
            ax.plot(steps, [p.get(key, float("nan")) for p in points], label=key, linewidth=1.4, marker=marker,
                    markersize=3)
        per_epoch = points[-1].get("steps_per_epoch") or 0
        if per_epoch:
            for boundary in range(per_epoch, max(steps) + 1, per_epoch):
                ax.axvline(boundary, color="0.85", linewidth=0.8, zorder=0)
        ax.set_title(stage)
        ax.set_xlabel("step")
        ax.set_ylabel("mean since the previous point")
        speed = ax.twinx()
        speed.plot(steps, [p.get("images_per_s", float("nan")) for p in points], color="0.45", linestyle="--",
                   linewidth=1.0, label="images/s", marker=marker, markersize=2)
        speed.set_ylabel("images/s (dashed)")
        speed.set_ylim(bottom=0)
        lines, labels = ax.get_legend_handles_labels()
        extra_lines, extra_labels = speed.get_legend_handles_labels()
        ax.legend(lines + extra_lines, labels + extra_labels, fontsize=8, loc="upper right")
    fig.tight_layout()
    fig.savefig(path)
    return True
