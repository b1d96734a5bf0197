"""benchmarks/tie_selection.py: the tie rules on one fabricated run folder, and the noise that flips the loss rule."""
import json

import numpy as np
import pytest

from benchmarks import tie_selection
from fake_heads import noisy_head
from scan_dist.metrics import cluster_metrics
from scan_dist.stages.scan import consistency_moments, paired_standard_errors


def _fake_run(tmp_path, losses, accs, noise=(0.45, 0.05, 0.4)):
    rng = np.random.default_rng(0)
    classes, truth = 4, rng.integers(0, 4, 2000)
    run = tmp_path / "run"
    for stage in ("scan", "mine"):
        (run / stage).mkdir(parents=True)
    logits = np.stack([noisy_head(truth, n, classes, rng) for n in noise], axis=1).astype(np.float32)  # [N, H, C]
    np.save(run / "scan" / "eval_logits.npy", logits)
    order = np.argsort(truth, kind="stable")  # neighbours: the next images of the same true class
    neighbors = np.empty((len(truth), 2), np.int64)
    for shift in (1, 2):
        neighbors[order, shift - 1] = order[(np.arange(len(order)) + shift) % len(order)]
    np.save(run / "mine" / "eval_neighbors.npy", neighbors)
    (run / "metrics.json").write_text(json.dumps({"stages": {"scan": {"selection_losses": losses},
                                                             "evaluate": {"scan_heads": {"acc_per_head": accs}}}}))
    return run


def test_a_near_tie_goes_to_the_most_agreeing_head_and_no_noise_flips_it(tmp_path):
    # head 0 lowest by 0.0001 (a last-bit gap), head 1 the cleanest clustering, head 2 far above in loss
    run = _fake_run(tmp_path, losses=[-2.0, -1.9999, -1.0], accs=[0.6, 0.9, 0.7])
    truth = np.random.default_rng(0).integers(0, 4, 2000)  # _fake_run's draw
    row = tie_selection.measure(run, noise=0.0003, targets=truth)
    assert row["best"] == 90.0 and row["loss"]["head"] == 0 and row["loss"]["acc"] == 60.0 and row["tie"] == [0, 1]
    assert 0.2 < row["loss"]["flips"] < 0.8  # the loss rule's pick is a coin under noise of that size
    for rule in ("tie@1", "tie@2", "eps@0.005", "top@3"):
        assert (row[rule]["head"], row[rule]["acc"], row[rule]["flips"]) == (1, 90.0, 0.0), rule
    # the paired errors of differing heads: positive, and far below head 2's gap of 1.0
    errors = np.asarray(row["lowest_errors"])
    assert (errors > 0).all() and (errors < 0.5).all()
    # the two tied heads averaged: at least as right as the noisier one alone (45 % of its rows moved at random)
    noisier = np.load(run / "scan" / "eval_logits.npy")[:, 0].argmax(axis=1)
    assert row["tie_ensemble_acc"] >= round(100 * cluster_metrics(truth, noisier)["acc"], 2)
    summary = tie_selection.summary([row])
    assert summary["loss"]["below_best"] == 30.0 and summary["tie@2"]["below_best"] == 0.0


def test_a_clear_loss_gap_keeps_the_lowest_loss_head(tmp_path):
    run = _fake_run(tmp_path, losses=[-2.0, -1.5, -1.0], accs=[0.6, 0.9, 0.7])
    truth = np.random.default_rng(0).integers(0, 4, 2000)  # _fake_run's draw
    row = tie_selection.measure(run, noise=0.0003, targets=truth)
    assert row["tie@2"]["head"] == row["loss"]["head"] == 0 and row["tie@2"]["flips"] == 0.0
    # a tie of one head: its "ensemble" is that head's own clustering, scored against the labels
    own = np.load(run / "scan" / "eval_logits.npy")[:, 0].argmax(axis=1)
    assert row["tie"] == [0] and row["tie_ensemble_acc"] == round(100 * cluster_metrics(truth, own)["acc"], 2)
    assert row["top@3"]["head"] == 1  # top@k ignores the gap: what the tie rule is built not to do


def test_an_unfinished_run_is_named(tmp_path):
    (tmp_path / "run").mkdir()
    with pytest.raises(SystemExit, match="run: not a finished run"):
        tie_selection.main([str(tmp_path / "run")])


def test_the_entropy_terms_error_is_the_bootstrap_error_of_the_selection_loss():
    """The linearised error of a paired selection-loss difference (consistency and entropy) matches the spread of
    that difference over resampled evaluation sets; with the entropy weight 0 it is the SCAN stage's error."""
    rng = np.random.default_rng(3)
    classes, num = 4, 3000
    truth = rng.choice(classes, num, p=[0.4, 0.3, 0.2, 0.1])  # unequal clusters: the entropy term varies
    logits = np.stack([noisy_head(truth, n, classes, rng) for n in (0.3, 0.5)]).astype(np.float64)  # [H, N, C]
    neighbors = np.stack([rng.permutation(num) for _ in range(3)], axis=1)
    consistency, entropy = tie_selection.per_image_terms(logits, neighbors)
    stage = paired_standard_errors(consistency_moments(logits.astype(np.float32), neighbors), 0)
    np.testing.assert_allclose(tie_selection.errors_with_entropy(consistency, entropy, 0, 0.0), stage, rtol=1e-4)

    probs = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    weight, diffs = 5.0, []
    for _ in range(400):
        pick = rng.integers(0, num, num)
        mean_prob = probs[:, pick].mean(1)
        loss = consistency[:, pick].mean(1) + weight * (mean_prob * np.log(mean_prob)).sum(-1)
        diffs.append(loss[1] - loss[0])
    linearised = tie_selection.errors_with_entropy(consistency, entropy, 0, weight)[1]
    assert abs(linearised / np.std(diffs) - 1) < 0.15
    assert abs(linearised / stage[1] - 1) > 0.05  # the entropy term does move the error here
