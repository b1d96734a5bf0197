"""Diagnostic (reads labels): label-free head selection rules that treat near-equal selection losses as a tie.

The loss rule (`scan.select=loss`, the paper's) keeps the head of lowest SCAN loss on the evaluation images and
their mined neighbours. On the demo the lowest losses lie within a few thousandths of each other, about one
standard error of a paired loss difference over the 10,000 evaluation images, and the twenty-sixth pass saw the
pick flip between two of them (74.9 % and 71.7 %, losses 0.0002 apart) when only the float rounding of the later
stages changed. This script scores, on finished runs, rules that call such heads a tie and break it by something
the rounding cannot flip, the heads' agreement with each other. It reads each run's `scan/eval_logits.npy` (every
head's logits on the evaluation images), `mine/eval_neighbors.npy` and `metrics.json` (the selection losses; each
head's accuracy from the evaluate stage):

* ``loss``: the lowest loss (the reference);
* ``tie@z``: `scan.select=tie` with `scan.tie_z=z` (head_consensus.tie_break): of the lowest-loss head and the
  usable heads within z paired standard errors of its loss, the one of highest mean NMI to the usable heads;
* ``eps@e``: the same with a fixed margin e instead of z standard errors;
* ``top@k``: of the k lowest-loss usable heads, the one of highest mean NMI to the usable heads.

For each rule and run: the picked head and its accuracy (the SCAN stage's ACC that rule hands on) and, to see how
much each rule leans on the last bits, its mean accuracy and the share of draws whose pick changes when every
head's loss moves by Gaussian noise of `--noise` (default 0.0003, the size of the flip seen); and the tie of the
default `scan.tie_z` (2), in loss order. One JSON line per run, then a summary line (per rule: mean points below
the best head, the worst run, the same under noise, the flip rate). Labels are read here, for the diagnostic
only; nothing is written into the runs.

The tie rule's standard errors count only the consistency term's sampling error: the entropy term is a function of
the set's mean prediction, not a mean over images. Its sampling error is not zero, though; linearised (the delta
method), image i adds -(log p̄_h + 1) · p_h(i) to head h's entropy. Each row also gives, for the three heads of
lowest loss after the reference (`nearest_heads`), the paired standard error without and with that term, at the
run's `scan.select_entropy_weight` (`nearest_errors`, `nearest_errors_with_entropy`), and both z values (`nearest_z`,
`nearest_z_with_entropy`): where the two z's lie on the same side of `scan.tie_z`, leaving the term out changes no
tie.

`tie_ensemble_acc`: the accuracy of the default tie's heads averaged (each relabelled onto the lowest-loss head's
clusters by Hungarian matching, probabilities averaged), the clustering `scan.select=ensemble
scan.ensemble_rank=tie` hands on (the same as `scan.ensemble_rank=loss scan.ensemble_size=<the tie's size>` where
the tie is the lowest-loss heads, as on every demo run measured). It reads the evaluation labels with the stages' own
reader (benchmarks/posthoc_checks.py `evaluation_targets`).

Usage::

    python benchmarks/tie_selection.py runs/base/seed* runs/avx2/seed*          # a few seconds per run
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

if __package__ in (None, ""):  # run as a script: make the repo root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.posthoc_checks import evaluation_targets  # noqa: E402
from scan_dist import head_consensus  # noqa: E402
from scan_dist.config import load_config  # noqa: E402
from scan_dist.metrics import cluster_metrics  # noqa: E402
from scan_dist.stages.scan import consistency_moments, paired_standard_errors  # noqa: E402

Z_VALUES = (1.0, 1.5, 2.0, 3.0)
DEFAULT_Z = 2.0  # scan.tie_z's default: the tie each row records
EPSILONS = (0.003, 0.005, 0.01)
TOP_KS = (3,)
NOISE_DRAWS = 400


def top_pick(losses: np.ndarray, usable: np.ndarray, agreement: np.ndarray, k: int) -> int:
    order = [h for h in np.argsort(losses, kind="stable") if usable[h]][:k]
    return int(order[np.argmax(agreement[order])])


def rules(errors: np.ndarray, agreement: np.ndarray) -> dict:
    """name -> function(losses) -> head: every rule this script scores. `errors[r]`: paired standard errors against
    head r (under the loss noise another head may become the lowest; the errors' size is the images')."""
    usable = agreement > -1
    out = {"loss": lambda losses: int(np.argmin(losses))}
    for z in Z_VALUES:
        out[f"tie@{z:g}"] = lambda losses, z=z: head_consensus.tie_break(losses, errors[np.argmin(losses)],
                                                                          agreement, z)[0]
    for eps in EPSILONS:
        flat = np.full(len(errors), eps)
        out[f"eps@{eps:g}"] = lambda losses, f=flat: head_consensus.tie_break(losses, f, agreement, 1.0)[0]
    for k in TOP_KS:
        out[f"top@{k}"] = lambda losses, k=k: top_pick(losses, usable, agreement, k)
    return out


def per_image_terms(logits, neighbors, eps: float = 1e-8) -> tuple[np.ndarray, np.ndarray]:
    """([H, N] consistency term c_h(i), [H, N] linearised entropy contribution e_h(i) = -(log p̄_h + 1) · p_h(i)),
    in float64; the whole set in memory (a diagnostic for evaluation sets of the demo's size)."""
    logits = np.asarray(logits, dtype=np.float64)
    probs = np.exp(logits - logits.max(axis=-1, keepdims=True))
    probs /= probs.sum(axis=-1, keepdims=True)
    neighbors = np.asarray(neighbors)
    consistency = np.mean([-np.log(np.maximum((probs * probs[:, neighbors[:, j]]).sum(-1), eps))
                           for j in range(neighbors.shape[1])], axis=0)
    mean_prob = probs.mean(axis=1, keepdims=True)
    entropy = -((np.log(np.maximum(mean_prob, eps)) + 1) * probs).sum(-1)
    return consistency, entropy


def errors_with_entropy(consistency: np.ndarray, entropy: np.ndarray, reference: int, weight: float) -> np.ndarray:
    """[H] standard error of the paired difference of the linearised per-image selection loss c - weight · e."""
    loss = consistency - weight * entropy
    return (loss - loss[reference]).std(axis=1) / np.sqrt(loss.shape[1])


def tie_ensemble_accuracy(logits, assignments: np.ndarray, agreement: np.ndarray, tie: list[int], targets) -> float:
    """ACC (percent) of the tie's usable heads relabelled onto tie[0]'s clusters and averaged: the stage's own
    `scan.ensemble_rank=tie` members (head_consensus.tie_ensemble)."""
    members, perms = head_consensus.tie_ensemble(assignments, logits.shape[2], tie, agreement)
    predictions = head_consensus.ensemble_log_probs(logits, members, perms).argmax(axis=1)
    return round(100 * cluster_metrics(targets, predictions)["acc"], 2)


def measure(run: Path, noise: float, seed: int = 0, targets=None) -> dict:
    metrics = json.loads((run / "metrics.json").read_text())
    losses = np.asarray(metrics["stages"]["scan"]["selection_losses"], dtype=np.float64)
    acc = 100 * np.asarray(metrics["stages"]["evaluate"]["scan_heads"]["acc_per_head"], dtype=np.float64)
    logits = np.swapaxes(np.load(run / "scan" / "eval_logits.npy", mmap_mode="r"), 0, 1)  # [H, N, C]
    neighbors = np.load(run / "mine" / "eval_neighbors.npy", mmap_mode="r")
    assignments = head_consensus.hard_assignments(logits)
    agreement, _ = head_consensus.consensus_scores(assignments, logits.shape[2])
    moments = consistency_moments(logits, neighbors)
    errors = np.stack([paired_standard_errors(moments, r) for r in range(len(losses))])
    shifts = np.random.default_rng(seed).normal(0.0, noise, size=(NOISE_DRAWS, len(losses)))
    row = {"run": str(run), "best": round(float(acc.max()), 2), "median": round(float(np.median(acc)), 2),
           "lowest_errors": [round(float(v), 4) for v in np.sort(errors[np.argmin(losses)])[1:4]],
           "tie": head_consensus.tie_break(losses, errors[np.argmin(losses)], agreement, DEFAULT_Z)[1]}
    reference, nearest = int(np.argmin(losses)), np.argsort(losses, kind="stable")[1:4]
    config = run / "config.yaml"  # a fabricated run has none: the default weight
    weight = load_config(str(config)).scan.select_entropy_weight if config.exists() else 1.0
    with_entropy = errors_with_entropy(*per_image_terms(logits, neighbors), reference, weight)
    gaps = losses[nearest] - losses[reference]
    row.update({"nearest_heads": [int(h) for h in nearest],
                "nearest_errors": [round(float(v), 4) for v in errors[reference][nearest]],
                "nearest_errors_with_entropy": [round(float(v), 4) for v in with_entropy[nearest]],
                "nearest_z": [round(float(v), 2) for v in gaps / errors[reference][nearest]],
                "nearest_z_with_entropy": [round(float(v), 2) for v in gaps / with_entropy[nearest]]})
    if targets is not None:
        row["tie_ensemble_acc"] = tie_ensemble_accuracy(logits, assignments, agreement, row["tie"], targets)
    for name, pick in rules(errors, agreement).items():
        head = pick(losses)
        noisy = np.array([pick(losses + s) for s in shifts])
        row[name] = {"head": head, "acc": round(float(acc[head]), 2),
                     "acc_noisy": round(float(acc[noisy].mean()), 2),
                     "flips": round(float((noisy != head).mean()), 3)}
    return row


def summary(rows: list[dict]) -> dict:
    names = [k for k in rows[0] if isinstance(rows[0][k], dict)]
    out = {"runs": len(rows)}
    for name in names:
        below = [r["best"] - r[name]["acc"] for r in rows]
        below_noisy = [r["best"] - r[name]["acc_noisy"] for r in rows]
        out[name] = {"below_best": round(float(np.mean(below)), 2), "worst_below": round(float(np.max(below)), 2),
                     "below_best_noisy": round(float(np.mean(below_noisy)), 2),
                     "flips": round(float(np.mean([r[name]["flips"] for r in rows])), 3)}
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="finished run folders (scan and evaluate stages done)")
    parser.add_argument("--noise", type=float, default=0.0003, help="std of the loss perturbation (default 0.0003)")
    parser.add_argument("--out", type=Path, help="also append the JSON lines to this file")
    args = parser.parse_args(argv)
    rows = []
    for run in args.runs:
        needed = ("metrics.json", "scan/eval_logits.npy", "mine/eval_neighbors.npy")
        missing = [p for p in needed if not (run / p).exists()]
        if missing:
            raise SystemExit(f"{run}: not a finished run ({', '.join(missing)} missing)")
        rows.append(measure(run, args.noise, targets=evaluation_targets(run, required=("config.yaml",))))
    lines = [json.dumps(r) for r in rows] + [json.dumps({"summary": summary(rows)})]
    print("\n".join(lines))
    if args.out:
        with args.out.open("a") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
