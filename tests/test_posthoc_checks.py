"""benchmarks/posthoc_checks.py: the balanced assignment, the label-free signals, and one fabricated run folder."""
import json

import numpy as np
import pytest
from scipy.special import softmax

from benchmarks import posthoc_checks


def test_balanced_scaling_equalises_the_columns_and_keeps_rows_distributions():
    rng = np.random.default_rng(0)
    probs = softmax(rng.normal(size=(600, 4)) + np.array([2.0, 0.0, 0.0, -1.0]), axis=1)
    q = posthoc_checks.balanced(probs)
    np.testing.assert_allclose(q.sum(axis=1), 1.0, atol=1e-9)
    np.testing.assert_allclose(q.sum(axis=0), 150.0, rtol=1e-3)
    # the over-full first cluster gives images up, the starved last one gains them
    before, after = np.bincount(probs.argmax(1), minlength=4), np.bincount(q.argmax(1), minlength=4)
    assert after[0] < before[0] and after[3] > before[3]


def test_neighbour_signals_of_agreeing_and_disagreeing_neighbours():
    one_hot = np.eye(3)[[0, 0, 1, 1, 2, 2]] * 0.98 + 0.02 / 3
    agreeing = np.array([[1], [0], [3], [2], [5], [4]])
    crossing = np.array([[2], [4], [0], [5], [1], [3]])
    good, bad = (posthoc_checks.neighbour_signals(one_hot, agreeing),
                 posthoc_checks.neighbour_signals(one_hot, crossing))
    assert good["agreement"] == 1.0 and bad["agreement"] == 0.0
    assert good["consistency"] < 0.05 < 3.0 < bad["consistency"]


def _fake_run(tmp_path, targets, scan_pred, final_pred, heads=3, selected=1):
    run = tmp_path / "run"
    for stage in ("scan", "evaluate", "mine"):
        (run / stage).mkdir(parents=True)
    n = len(targets)
    scan_logits = np.zeros((n, heads, 2), np.float32)
    scan_logits[np.arange(n), selected, scan_pred] = 8.0  # only the selected head knows anything
    np.save(run / "scan" / "eval_logits.npy", scan_logits)
    np.save(run / "evaluate" / "final_logits.npy", (8.0 * np.eye(2)[final_pred])[:, None].astype(np.float32))
    np.save(run / "mine" / "eval_neighbors.npy", np.array([(i + 1) % n for i in range(n)])[:, None].repeat(2, 1))
    per_head = [0.5] * heads
    per_head[selected] = float(np.mean(scan_pred == targets))
    (run / "metrics.json").write_text(json.dumps({"stages": {"evaluate": {"scan_heads": {"selected_head": selected,
                                                                                         "acc_per_head": per_head}},
                                                             "scan": {"selection_losses": [0.0] * heads}}}))
    return run


def test_measure_scores_the_selected_head_and_the_final_model(tmp_path):
    targets = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    run = _fake_run(tmp_path, targets, scan_pred=np.array([0, 0, 0, 1, 1, 1, 1, 1]), final_pred=targets)
    row = posthoc_checks.measure(run, targets, k=1)
    assert (row["acc_scan"], row["acc_final"], row["acc_final_balanced"]) == (87.5, 100.0, 100.0)
    assert row["k"] == 1 and row["cluster_sizes"] == [4, 4] and row["acc_best_head"] == 87.5
    # pairs (i, i+1 mod 8): the final model splits 2 of 8 pairs (3-4 and 7-0), the SCAN head 2 as well (2-3, 7-0)
    assert row["agreement_final"] == row["agreement_scan"] == 0.75
    with pytest.raises(SystemExit, match="keeps 2 neighbours"):
        posthoc_checks.measure(run, targets, k=3)


def test_summary_correlates_changes_and_needs_three_runs():
    rows = [{"acc_scan": 70.0, "acc_final": 70.0 + d, "acc_final_balanced": 70.0 + d - 0.5,
             "agreement_scan": 0.9, "agreement_final": 0.9 + d / 100, "consistency_scan": 0.2,
             "consistency_final": 0.2 - d / 100} for d in (-1.0, 0.5, 2.0)]
    out = posthoc_checks.summary(rows)
    assert out["balanced_minus_final_mean"] == -0.5 and out["balanced_better_in"] == 0
    assert out["selflabel_negative_in"] == 1
    assert out["corr_agreement_change_with_acc_change"] == pytest.approx(1.0)
    assert out["corr_consistency_change_with_acc_change"] == pytest.approx(-1.0)
    assert posthoc_checks.summary(rows[:2])["corr_agreement_change_with_acc_change"] is None


def test_a_folder_without_the_stage_files_is_named(tmp_path):
    (tmp_path / "metrics.json").write_text("{}")
    with pytest.raises(SystemExit, match="missing config.yaml, scan/eval_logits.npy"):
        posthoc_checks.main([str(tmp_path)])


def test_loss_ensemble_relabels_the_heads_onto_the_lowest_loss_one():
    targets = np.array([0, 0, 0, 1, 1, 1])
    logits = np.zeros((6, 3, 2), np.float32)
    logits[np.arange(6), 0, [0, 0, 1, 1, 1, 1]] = 2.0  # lowest loss, one image wrong
    logits[np.arange(6), 1, [1, 1, 1, 0, 0, 0]] = 2.0  # right, with the clusters numbered the other way
    logits[np.arange(6), 2, [1, 1, 1, 0, 0, 0]] = 2.0  # highest loss: left out at size 2
    losses = [-2.0, -1.9, -1.0]
    # head 1 relabelled onto head 0's numbering agrees with it on five images; on image 2 they split evenly
    probs = np.exp(posthoc_checks.loss_ensemble(logits, losses, 2))
    np.testing.assert_allclose(probs.sum(1), 1.0, rtol=1e-5)
    assert list(probs.argmax(1)[[0, 1, 3, 4, 5]]) == [0, 0, 1, 1, 1] and probs[2, 0] == pytest.approx(probs[2, 1])
    one = posthoc_checks.loss_ensemble(logits, losses, 1).argmax(1)
    assert list(one) == [0, 0, 1, 1, 1, 1]  # size 1 is the lowest-loss head itself


def test_the_entropy_weight_decides_between_a_consistent_and_a_balanced_head():
    """Head 0 puts every image in one cluster (perfectly consistent, no entropy); head 1 splits the images evenly
    with two of the eight neighbour pairs across its clusters (consistency about 1.8, entropy log 2): weights 0 and
    1 keep head 0, weight 5 keeps head 1."""
    n = 8
    logits = np.zeros((n, 2, 2), np.float32)
    logits[:, 0, 0] = 8.0
    logits[np.arange(n), 1, (np.arange(n) >= 4).astype(int)] = 8.0
    neighbors = np.array([(i + 1) % n for i in range(n)])[:, None]
    picks = posthoc_checks.picks_by_weight(logits, neighbors, weights=(0.0, 1.0, 5.0))
    assert picks == {0.0: 0, 1.0: 0, 5.0: 1}
