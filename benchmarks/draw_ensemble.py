"""Diagnostic (reads labels): would an ensemble of whole runs (separate seeds, so separate SimCLR draws) lift the
accuracy, and by how much over its members?

The seed is the demo's largest effect (one recipe gives 71 to 77 over ten seeds) and no label-free signal ranks the
draws, so the one way left to use several draws is to combine them. Each finished run's final model (and, apart,
its SCAN stage's selected head) gives class probabilities on the evaluation images; every subset of the runs of
each size is combined the way `scan.select=ensemble` combines heads (`head_consensus.ensemble`: the run agreeing
most with the others is the medoid, every other run is relabelled onto its clusters by Hungarian matching of the
assignments, probabilities averaged). The alignment reads no label; the scores do. As a degenerate head there, a
run that leaves a cluster empty is left out of a subset where the others use every cluster.

One JSON line per subset (its ensemble's ACC, its members' mean and best), then one summary line per stage and
size: the mean and the worst ensemble, and the mean gain over the members' mean.

Usage::

    python benchmarks/draw_ensemble.py runs/base/seed*        # seconds
"""
from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

import numpy as np

if __package__ in (None, ""):  # run as a script: make the repo root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.posthoc_checks import evaluation_targets  # noqa: E402
from scan_dist import head_consensus  # noqa: E402
from scan_dist.metrics import cluster_metrics  # noqa: E402

RUN_FILES = ("config.yaml", "metrics.json", "scan/eval_logits.npy", "evaluate/final_logits.npy")


def stage_logits(run: Path) -> dict[str, np.ndarray]:
    """{"final": the final model's logits [N, C], "scan": the SCAN stage's selected head's [N, C]} on the
    evaluation images of one finished run folder."""
    metrics = json.loads((run / "metrics.json").read_text())
    head = metrics["stages"]["evaluate"]["scan_heads"]["selected_head"]
    return {"final": np.asarray(np.load(run / "evaluate" / "final_logits.npy", mmap_mode="r")[:, 0]),
            "scan": np.asarray(np.load(run / "scan" / "eval_logits.npy", mmap_mode="r")[:, head])}


def ensemble_predictions(logits: list[np.ndarray]) -> np.ndarray:
    """Cluster ids [N] of the runs' combined probabilities: every run relabelled onto the medoid run's clusters."""
    stacked = np.stack(logits)  # [R, N, C], the runs in the place of a SCAN stage's heads
    members, perms, _ = head_consensus.ensemble(stacked, stacked.shape[2], len(logits))
    return head_consensus.ensemble_log_probs(stacked, members, perms).argmax(axis=1)


def subsets(names: list[str], logits: list[np.ndarray], targets: np.ndarray, sizes) -> list[dict]:
    """One row per subset of the runs of each size: the ensemble's ACC against its members' mean and best."""
    single = [100 * cluster_metrics(targets, z.argmax(axis=1))["acc"] for z in logits]
    rows = []
    for size in sizes:
        for combo in itertools.combinations(range(len(logits)), size):
            acc = 100 * cluster_metrics(targets, ensemble_predictions([logits[i] for i in combo]))["acc"]
            members = [single[i] for i in combo]
            rows.append({"runs": [names[i] for i in combo], "size": size, "acc_ensemble": round(acc, 2),
                         "acc_members_mean": round(float(np.mean(members)), 2), "acc_members_best": round(max(members), 2),
                         "gain_over_mean": round(acc - float(np.mean(members)), 2)})
    return rows


def summary(rows: list[dict]) -> list[dict]:
    out = []
    for size in sorted({row["size"] for row in rows}):
        group = [row for row in rows if row["size"] == size]
        gains = [row["gain_over_mean"] for row in group]
        out.append({"size": size, "subsets": len(group),
                    "acc_ensemble_mean": round(float(np.mean([r["acc_ensemble"] for r in group])), 2),
                    "acc_ensemble_worst": min(r["acc_ensemble"] for r in group),
                    "gain_over_mean": round(float(np.mean(gains)), 2),
                    "above_members_mean_in": f"{sum(g > 0 for g in gains)} of {len(gains)}",
                    "at_least_members_best_in": f"{sum(r['acc_ensemble'] >= r['acc_members_best'] for r in group)} "
                                                f"of {len(group)}"})
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help=f"finished run folders ({', '.join(RUN_FILES)})")
    parser.add_argument("--max-size", type=int, default=3, help="largest subset combined (default 3)")
    args = parser.parse_args(argv)
    if len(args.runs) < 2:
        raise SystemExit("draw_ensemble: give at least two finished run folders")
    per_run, targets = [], None
    for run in args.runs:
        run_targets = evaluation_targets(run, RUN_FILES)
        if targets is not None and not np.array_equal(run_targets, targets):
            raise SystemExit(f"{run}: its evaluation images differ from {args.runs[0]}'s; combine runs of one dataset")
        targets = run_targets
        per_run.append(stage_logits(run))
    names = [str(run) for run in args.runs]
    sizes = range(2, min(args.max_size, len(args.runs)) + 1)
    for stage in ("scan", "final"):
        rows = subsets(names, [logits[stage] for logits in per_run], targets, sizes)
        for row in rows:
            print(json.dumps({"stage": stage, **row}), flush=True)
        for line in summary(rows):
            print(json.dumps({"summary": stage, **line}), flush=True)


if __name__ == "__main__":
    main()
