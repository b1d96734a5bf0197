"""Label-free choice of a cluster head by agreement with the other heads (`scan.select=consensus`).

Heads trained from different initialisations on the same data agree on the structure they all find and disagree
on their mistakes; the head that agrees most with the others (the medoid under normalised mutual information) is
the most typical clustering. Measured on the demo (30 heads): mean NMI to the other heads correlates 0.86 with a
head's accuracy, and the medoid was the best head; accuracy_history.md in benchmarks/results has the per-seed table.
Over the 18 head populations measured since, though, the medoid was 0.75 below the best head on average and the
lowest-loss head 0.35 (benchmarks/results/accuracy_history.md, third pass), so the demo uses `scan.select=loss`.

Heads that left a cluster empty are degenerate (the entropy term failed) and are neither candidates nor voters,
unless every head did. NMI is computed on hard assignments of at most `max_rows` evaluation images (evenly spaced
rows, no randomness), so the cost is O(H^2 * max_rows) whatever N, plus one pass over the logits.

`scan.select=ensemble` goes one step further: the most agreeing heads, each relabelled onto the medoid's clusters
by Hungarian matching, are averaged (mean probability). Where the heads' errors are independent the average beats
every member; on the demo they are only partly so: over six head populations the top-10 ensemble scored between
2.1 points above and 0.75 below the medoid, +0.3 on average (benchmarks/results/accuracy_history.md, second
pass), so the demo does not hand on an ensemble (it keeps the lowest-loss head:
benchmarks/results/accuracy_history.md, third pass). `scan.ensemble_rank=loss` averages the lowest-loss heads
instead of the most agreeing ones, and `scan.ensemble_rank=tie` the heads of `scan.select=tie`'s tie (below)
(README's lever table has what each measured).

`scan.select=tie` (`tie_break`) uses agreement only where the loss cannot decide: among the heads whose SCAN loss
the evaluation images cannot tell from the lowest one's.
"""
from __future__ import annotations

import numpy as np

from . import metrics

MAX_ROWS = 20000


def hard_assignments(logits, max_rows: int = MAX_ROWS, chunk: int = 4096) -> np.ndarray:
    """argmax cluster [H, n] of every head on at most max_rows evenly spaced rows of `logits` ([H, N, C], may be
    a memory-mapped view); read a chunk of rows at a time."""
    num = logits.shape[1]
    rows = np.linspace(0, num - 1, min(num, max_rows)).round().astype(np.int64)
    rows = np.unique(rows)
    parts = [np.asarray(logits[:, rows[i:i + chunk]]).argmax(axis=2) for i in range(0, len(rows), chunk)]
    return np.concatenate(parts, axis=1).astype(np.int64)


def _entropy(counts: np.ndarray) -> float:
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


def nmi(a: np.ndarray, b: np.ndarray, classes: int) -> float:
    """Normalised mutual information (arithmetic mean normalisation) of two labelings with values < classes."""
    joint = np.bincount(a * classes + b, minlength=classes * classes).astype(np.float64)
    h_a = _entropy(np.bincount(a, minlength=classes).astype(np.float64))
    h_b = _entropy(np.bincount(b, minlength=classes).astype(np.float64))
    mutual = h_a + h_b - _entropy(joint)
    denom = 0.5 * (h_a + h_b)
    return float(mutual / denom) if denom > 0 else 0.0


def agreement(assignments: np.ndarray, classes: int) -> np.ndarray:
    """[H, H] pairwise NMI between the heads' assignments (diagonal 1)."""
    heads = len(assignments)
    scores = np.eye(heads)
    for i in range(heads):
        for j in range(i + 1, heads):
            scores[i, j] = scores[j, i] = nmi(assignments[i], assignments[j], classes)
    return scores


def consensus_scores(assignments: np.ndarray, classes: int) -> tuple[np.ndarray, np.ndarray]:
    """(mean NMI of each head to the other usable heads, usable mask). Unusable (degenerate) heads score -1."""
    heads = len(assignments)
    used = np.array([len(np.unique(a)) for a in assignments])
    usable = used == classes if (used == classes).any() else used == used.max()
    scores = agreement(assignments, classes)
    voters = np.flatnonzero(usable)
    mean = np.full(heads, -1.0)
    for h in voters:
        others = voters[voters != h]
        mean[h] = scores[h, others].mean() if len(others) else 1.0
    return mean, usable


def alignment(reference: np.ndarray, other: np.ndarray, classes: int) -> np.ndarray:
    """perm [C] mapping `other`'s cluster c to the `reference` cluster it overlaps most: the evaluation's Hungarian
    matching with `reference` in the place of the labels, a one-to-one relabelling (every cluster keeps its images)."""
    mapping = metrics.hungarian_match(reference, other, classes, classes)
    return np.array([mapping[c] for c in range(classes)], dtype=np.int64)


def ensemble(logits, classes: int, size: int, max_rows: int = MAX_ROWS,
             losses=None, assignments: np.ndarray | None = None) -> tuple[list[int], np.ndarray, np.ndarray]:
    """(members, perms [m, C], every head's mean agreement) of the `size` usable heads that agree most with the
    others, for logits [H, N, C]. members[0] is the medoid (`scan.select=consensus`'s head); every member is
    relabelled onto its clusters (perms[i][c] = the medoid cluster of member i's cluster c). `ensemble_log_probs`
    averages them. Given per-head `losses` (`scan.ensemble_rank=loss`), the members are instead the `size` usable
    heads of lowest loss, members[0] the lowest (`scan.select=loss`'s head, when it is usable). `assignments`:
    the logits' hard_assignments, where the caller already has them (the logits are then not read)."""
    if assignments is None:
        assignments = hard_assignments(logits, max_rows)
    mean, usable = consensus_scores(assignments, classes)
    order = np.argsort(-mean, kind="stable") if losses is None else np.argsort(np.asarray(losses), kind="stable")
    members = [int(h) for h in order if usable[h]][:max(1, size)]
    return members, _perms_onto_first(assignments[members], classes), mean


def _perms_onto_first(assignments: np.ndarray, classes: int) -> np.ndarray:
    return np.stack([alignment(assignments[0], a, classes) for a in assignments])


def tie_ensemble(assignments: np.ndarray, classes: int, tie: list[int], agreement) -> tuple[list[int], np.ndarray]:
    """(members, perms [m, C]) for `scan.ensemble_rank=tie`, from every head's hard_assignments: the usable heads of
    the tie (`tie_break`'s list, in loss order), each relabelled onto the first one's clusters; the lowest-loss head
    alone if none is usable."""
    members = [int(h) for h in tie if agreement[h] > -1] or [int(tie[0])]
    return members, _perms_onto_first(assignments[members], classes)


def ensemble_log_probs(logits: np.ndarray, members: list[int], perms: np.ndarray) -> np.ndarray:
    """log of the members' mean aligned probability, [n, C], from logits [H, n, C] (an ensemble's 'logits':
    their softmax is the mean probability)."""
    total = None
    for head, perm in zip(members, perms):
        z = np.asarray(logits[head], dtype=np.float64)
        p = np.exp(z - z.max(axis=1, keepdims=True))
        p /= p.sum(axis=1, keepdims=True)
        aligned = np.empty_like(p)
        aligned[:, perm] = p
        total = aligned if total is None else total + aligned
    return np.log(np.maximum(total / len(members), 1e-30)).astype(np.float32)


def tie_break(losses, standard_errors, agreement, z: float) -> tuple[int, list[int]]:
    """(head kept, the tie in loss order) for `scan.select=tie`: the tie is the lowest-loss head and every usable head
    (`agreement` > -1, see consensus_scores) whose loss lies within z `standard_errors` (paired, against the
    lowest-loss head: stages/scan.py, paired_standard_errors) of the lowest; of it the head of highest agreement
    with the other heads is kept (the earlier in loss order on equal agreement).

    Why: on the demo the lowest losses lie within a few thousandths of each other while the evaluation images
    measure a loss difference to about 0.003 (one standard error), so the loss rule's pick among them is decided by
    sampling noise, and the twenty-sixth pass saw float rounding alone flip it from a 74.9 % head to a 71.7 % one.
    Agreement with the other heads is a property of whole clusterings that such noise does not reorder."""
    losses, agreement = np.asarray(losses, dtype=np.float64), np.asarray(agreement, dtype=np.float64)
    lowest = int(np.argmin(losses))
    within = losses - losses[lowest] <= z * np.asarray(standard_errors, dtype=np.float64)
    tie = [int(h) for h in np.argsort(losses, kind="stable") if h == lowest or (within[h] and agreement[h] > -1)]
    candidates = [h for h in tie if agreement[h] > -1] or [lowest]
    return max(candidates, key=lambda h: agreement[h]), tie
