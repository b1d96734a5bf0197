"""Diagnostic (reads labels): what would a perfect head-selection rule give after self-labelling?

Copies a finished run folder (without its feature caches, and without its self-labelling and evaluate stages)
and rewrites the copy's `scan/model.pt` so that the SCAN stage hands on its best head by the labels (the evaluate
stage's `acc_per_head`) instead of the one its label-free rule chose. Every stage's DONE marker stays valid, so
launching the run's own command on the copy resumes at self-labelling: its final ACC is what the same run would
end with under an oracle selection rule, the ceiling of any `scan.select` rule for that run.

Where the rule already chose the best head, the copy would only repeat the run, so it is not made (exit status 0,
a message says so). Labels are read here, for the diagnostic only; the copy says so in `oracle_selection.json`.

Usage::

    python benchmarks/oracle_selection.py runs/base/seed2 runs/oracle/seed2
    python -m scan_dist.launch --local --run-dir runs/oracle/seed2 demo run.seed=2   # the run's own command
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import torch

if __package__ in (None, ""):  # run as a script: make the repo root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from scan_dist.io_utils import save_torch, write_json  # noqa: E402

RECORD = "oracle_selection.json"
RERUN = ("selflabel", "evaluate")  # the stages the copy runs again


def best_head(metrics: dict) -> tuple[int, int, list[float]]:
    """(head the run handed on, best head by the labels, every head's accuracy) from a run's metrics.json."""
    heads = metrics["stages"]["evaluate"]["scan_heads"]
    per_head = [float(v) for v in heads["acc_per_head"]]
    return int(heads["selected_head"]), max(range(len(per_head)), key=per_head.__getitem__), per_head


def prepare(source: Path, target: Path) -> dict | None:
    """Make the oracle copy of `source` at `target`; None (nothing made) when the run kept its best head."""
    metrics_path, model_path = source / "metrics.json", source / "scan" / "model.pt"
    for path in (metrics_path, model_path):
        if not path.is_file():
            raise SystemExit(f"{source}: not a finished run folder (no {path.relative_to(source)})")
    if target.exists():
        raise SystemExit(f"{target} exists: give a new folder")
    saved = torch.load(model_path, weights_only=False)
    if saved.get("select") == "ensemble":
        raise SystemExit(f"{source}: its SCAN stage handed on an ensemble (scan.select=ensemble), not one head")
    selected, best, per_head = best_head(json.loads(metrics_path.read_text()))
    record = {"source": str(source), "selected_head": selected, "best_head": best,
              "selected_acc": per_head[selected], "best_acc": per_head[best]}
    if best == selected:
        return None
    shutil.copytree(source, target, ignore=shutil.ignore_patterns("cache"))
    for stage in RERUN:
        shutil.rmtree(target / stage, ignore_errors=True)
    (target / "metrics.json").unlink()
    saved["best_head"] = best
    save_torch(target / "scan" / "model.pt", saved)
    write_json(target / RECORD, {**record, "note": "diagnostic: the head handed on was chosen with the labels"})
    return record


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("source", type=Path, help="a finished run folder (scan.select=loss or consensus)")
    parser.add_argument("target", type=Path, help="the new folder for the oracle copy")
    args = parser.parse_args(argv)
    record = prepare(args.source, args.target)
    if record is None:
        print(f"{args.source}: the run already handed on its best head; its final ACC is the oracle's")
    else:
        print(json.dumps(record))
        print(f"now resume the copy with the run's own command and --run-dir {args.target}")


if __name__ == "__main__":
    main()
