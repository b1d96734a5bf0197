"""Diagnostic (reads labels): post-hoc rules screened on finished runs before anyone builds them.

1. **Balanced assignment** of the final predictions: Fashion-MNIST's classes are exactly balanced, and a final
   clustering has clusters of 400 to 1,400 test images, so equalising the cluster sizes (Sinkhorn-Knopp scaling of
   the final softmax to equal column sums, then argmax) might repair a merged or split class.
2. **A label-free guard on self-labelling**: self-labelling lowers the SCAN-stage accuracy on some seeds. If a
   label-free signal moved with the accuracy change, the pipeline could keep the SCAN-stage clustering whenever it
   says self-labelling hurt. Measured per run on the evaluation images and their mined neighbours (the mine stage's
   `eval_neighbors.npy`): how often an image and a neighbour share the predicted cluster, and SCAN's consistency
   term `-mean log <p_i, p_j>`, for the selected SCAN head and for the final model.

3. **An ensemble of the lowest-loss heads** handed on instead of the lowest-loss head alone: the SCAN heads of
   lowest selection loss (`metrics.json`, stages.scan.selection_losses: the `scan.select=loss` rule's scores) lie
   within a few thousandths of each other and still differ by up to four points of accuracy, so the rule's pick
   among them is close to a draw. The `m` lowest (m = 3, 5, 10), each relabelled onto the lowest-loss head's
   clusters by Hungarian matching (as `scan.select=ensemble` relabels onto its medoid), probabilities averaged,
   scored against the SCAN stage's own clustering.

4. **The selection loss's entropy weight** (`scan.select_entropy_weight`, the paper's 1): the head the loss rule
   picks with weights 0, 0.5, 1, 2 and 5, and the best head by the labels, scored with the evaluate stage's own
   per-head accuracies (`acc_per_head`), to see whether another weight would pick better at the loss's floor.

One JSON line per run, then a summary line: the balanced and ensemble rules' mean changes, and the Pearson
correlation of each signal's change with the accuracy change across the runs. Labels are read here, for the
diagnostic only.

Usage::

    python benchmarks/posthoc_checks.py runs/base/seed*            # seconds per run
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import numpy as np
from scipy.special import softmax

if __package__ in (None, ""):  # run as a script: make the repo root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from scan_dist import head_consensus  # noqa: E402
from scan_dist.config import load_config  # noqa: E402
from scan_dist.context import RunContext  # noqa: E402
from scan_dist.metrics import cluster_metrics, neighbor_agreement  # noqa: E402
from scan_dist.stages.scan import selection_losses  # noqa: E402

SINKHORN_ITERATIONS = 100
LOSS_ENSEMBLE_SIZES = (3, 5, 10)
SELECTION_WEIGHTS = (0.0, 0.5, 1.0, 2.0, 5.0)
RUN_FILES = ("config.yaml", "metrics.json", "scan/eval_logits.npy", "evaluate/final_logits.npy",
             "mine/eval_neighbors.npy")  # what a finished run folder holds that these checks read


def balanced(probs: np.ndarray, iterations: int = SINKHORN_ITERATIONS) -> np.ndarray:
    """Sinkhorn-Knopp: `probs` [N, C] rescaled so every column sums to N / C and every row to 1."""
    q = probs.astype(np.float64)
    for _ in range(iterations):
        q = q / q.sum(axis=0, keepdims=True) / q.shape[1]
        q = q / q.sum(axis=1, keepdims=True)
    return q


def loss_ensemble(logits: np.ndarray, losses, size: int) -> np.ndarray:
    """Log mean probability [N, C] of the `size` heads of lowest loss, from the SCAN stage's logits [N, H, C], each
    head relabelled onto the clusters of the lowest-loss one: `scan.ensemble_rank=loss`'s ensemble."""
    heads_first = np.swapaxes(np.asarray(logits), 0, 1)
    members, perms, _ = head_consensus.ensemble(heads_first, logits.shape[2], size, losses=losses)
    return head_consensus.ensemble_log_probs(heads_first, members, perms)


def picks_by_weight(logits: np.ndarray, neighbors: np.ndarray, weights=SELECTION_WEIGHTS) -> dict[float, int]:
    """{entropy weight: the head of lowest selection loss with that weight}, from the SCAN stage's logits
    [N, H, C]: the loss is consistency - weight * entropy, so both terms are computed once."""
    heads_first = np.swapaxes(logits, 0, 1)
    consistency = selection_losses(heads_first, neighbors, 0.0).double().numpy()
    entropy = consistency - selection_losses(heads_first, neighbors, 1.0).double().numpy()
    return {w: int(np.argmin(consistency - w * entropy)) for w in weights}


def neighbour_signals(probs: np.ndarray, neighbors: np.ndarray) -> dict:
    """Label-free: the share of (image, neighbour) pairs predicted in one cluster, and SCAN's consistency term."""
    inner = np.einsum("nc,nkc->nk", probs, probs[neighbors])
    return {"agreement": neighbor_agreement(probs.argmax(axis=1), neighbors),  # the mine stage's purity, of clusters
            "consistency": float(-np.log(np.clip(inner, 1e-7, None)).mean())}


def measure(run: Path, targets: np.ndarray, k: int | None = None) -> dict:
    """The two checks on one finished run folder, against the evaluation images' `targets`."""
    metrics = json.loads((run / "metrics.json").read_text())
    head = metrics["stages"]["evaluate"]["scan_heads"]["selected_head"]
    scan_logits = np.load(run / "scan" / "eval_logits.npy", mmap_mode="r")
    scan_probs = softmax(scan_logits[:, head], axis=1)
    losses = metrics["stages"]["scan"]["selection_losses"]
    final_probs = softmax(np.load(run / "evaluate" / "final_logits.npy", mmap_mode="r")[:, 0], axis=1)
    neighbors = np.load(run / "mine" / "eval_neighbors.npy", mmap_mode="r")
    if k and k > neighbors.shape[1]:
        raise SystemExit(f"{run}: --k {k} but mine/eval_neighbors.npy keeps {neighbors.shape[1]} neighbours per image")
    neighbors = np.asarray(neighbors[:, :k] if k else neighbors)

    def acc(probs):
        return round(100 * cluster_metrics(targets, probs.argmax(axis=1))["acc"], 2)

    scan_signals, final_signals = neighbour_signals(scan_probs, neighbors), neighbour_signals(final_probs, neighbors)
    per_head = metrics["stages"]["evaluate"]["scan_heads"]["acc_per_head"]
    picks = picks_by_weight(scan_logits, neighbors)
    return {"run": str(run), "k": neighbors.shape[1],
            "acc_scan": acc(scan_probs), "acc_final": acc(final_probs),
            "acc_final_balanced": acc(balanced(final_probs)),
            **{f"acc_scan_loss_ensemble{m}": acc(loss_ensemble(scan_logits, losses, m))
               for m in LOSS_ENSEMBLE_SIZES if m <= len(losses)},
            **{f"acc_select_w{w:g}": round(100 * per_head[h], 2) for w, h in picks.items()},
            "acc_best_head": round(100 * max(per_head), 2),
            "cluster_sizes": sorted(np.bincount(final_probs.argmax(axis=1), minlength=final_probs.shape[1]).tolist()),
            **{f"{name}_scan": round(value, 4) for name, value in scan_signals.items()},
            **{f"{name}_final": round(value, 4) for name, value in final_signals.items()}}


def summary(rows: list[dict]) -> dict:
    """Mean change of the balanced rule; correlation of each label-free signal's change with the ACC change."""
    d_acc = np.array([row["acc_final"] - row["acc_scan"] for row in rows])
    d_balanced = [row["acc_final_balanced"] - row["acc_final"] for row in rows]
    out = {"runs": len(rows), "balanced_minus_final_mean": round(float(np.mean(d_balanced)), 2),
           "balanced_better_in": sum(r["acc_final_balanced"] > r["acc_final"] for r in rows),
           "selflabel_delta_mean": round(float(d_acc.mean()), 2), "selflabel_negative_in": int((d_acc < 0).sum())}
    for m in LOSS_ENSEMBLE_SIZES:
        changes = [row[f"acc_scan_loss_ensemble{m}"] - row["acc_scan"] for row in rows
                   if f"acc_scan_loss_ensemble{m}" in row]
        if changes:
            out[f"loss_ensemble{m}_minus_scan_mean"] = round(float(np.mean(changes)), 2)
            out[f"loss_ensemble{m}_better_in"] = f"{sum(c > 0 for c in changes)} of {len(changes)}"
    for w in SELECTION_WEIGHTS:
        if f"acc_select_w{w:g}" in rows[0]:
            out[f"select_w{w:g}_mean"] = round(float(np.mean([row[f"acc_select_w{w:g}"] for row in rows])), 2)
    if "acc_best_head" in rows[0]:
        out["best_head_mean"] = round(float(np.mean([row["acc_best_head"] for row in rows])), 2)
    for name in ("agreement", "consistency"):
        change = np.array([row[f"{name}_final"] - row[f"{name}_scan"] for row in rows])
        usable = len(rows) >= 3 and change.std() > 0 and d_acc.std() > 0
        corr = round(float(np.corrcoef(change, d_acc)[0, 1]), 3) if usable else None
        out[f"corr_{name}_change_with_acc_change"] = corr
    return out


def evaluation_targets(run: Path, required=RUN_FILES) -> np.ndarray:
    """The labels of a finished run folder's evaluation images, read by the stages' own reader of that split (same
    subset, format detection and listing as the run); SystemExit naming what is missing when a file of `required`
    is not there."""
    missing = [name for name in required if not (run / name).exists()]
    if missing:
        raise SystemExit(f"{run}: not a finished run folder (missing {', '.join(missing)})")
    cfg = load_config(str(run / "config.yaml"))
    return np.asarray(RunContext(cfg, run, logging.getLogger("posthoc_checks")).eval_set.targets)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("runs", nargs="+", type=Path,
                        help=f"finished run folders ({', '.join(RUN_FILES)})")
    parser.add_argument("--k", type=int, default=None, help="neighbours per image (default: all the mine stage kept)")
    args = parser.parse_args(argv)
    rows = []
    for run in args.runs:
        rows.append(measure(run, evaluation_targets(run), args.k))
        print(json.dumps(rows[-1]), flush=True)
    print(json.dumps({"summary": summary(rows)}), flush=True)


if __name__ == "__main__":
    main()
