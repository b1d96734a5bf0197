"""benchmarks/draw_ensemble.py: runs relabelled onto each other without labels, their average, and the summary."""
import numpy as np

from benchmarks import draw_ensemble


def _runs_wrong_on_different_tenths(targets, classes=3):
    """Three runs, each confidently wrong on another tenth of the images, each with its own cluster ids."""
    n = len(targets)
    runs = []
    for r, relabel in enumerate(([0, 1, 2], [2, 0, 1], [1, 2, 0])):
        predicted = targets.copy()
        wrong = np.arange(n) % 10 == r
        predicted[wrong] = (targets[wrong] + 1) % classes
        logits = 6.0 * np.eye(classes)[np.asarray(relabel)[predicted]]
        runs.append(logits.astype(np.float32))
    return runs


def test_an_ensemble_of_runs_with_independent_mistakes_beats_every_member():
    targets = np.repeat(np.arange(3), 100)
    runs = _runs_wrong_on_different_tenths(targets)
    rows = draw_ensemble.subsets(["a", "b", "c"], runs, targets, sizes=[2, 3])
    assert [row["size"] for row in rows] == [2, 2, 2, 3]
    assert all(row["acc_members_mean"] == 90.0 for row in rows)
    # two runs tie where they disagree (one right, one wrong): only the three-run vote is right everywhere
    three = rows[-1]
    assert three["acc_ensemble"] == 100.0 and three["gain_over_mean"] == 10.0
    for row in rows[:3]:
        assert row["acc_ensemble"] >= 90.0
    lines = draw_ensemble.summary(rows)
    assert [line["size"] for line in lines] == [2, 3]
    assert lines[1]["above_members_mean_in"] == "1 of 1" and lines[1]["acc_ensemble_worst"] == 100.0


def test_the_alignment_reads_no_label_and_undoes_a_relabelling():
    targets = np.repeat(np.arange(4), 50)
    rng = np.random.default_rng(0)
    base = rng.normal(size=(200, 4)).astype(np.float32) + 5.0 * np.eye(4, dtype=np.float32)[targets]
    relabelled = base[:, [3, 0, 2, 1]]  # the same clustering under other cluster ids
    predictions = draw_ensemble.ensemble_predictions([base, relabelled])
    # both runs are the same clustering: the ensemble assigns exactly as either does, up to the ids
    same = {(a, b) for a, b in zip(predictions.tolist(), base.argmax(1).tolist())}
    assert len(same) == 4
