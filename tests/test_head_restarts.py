"""benchmarks/head_restarts.py: the subset simulation on hand-made populations, and a population on two blobs."""
import json
from types import SimpleNamespace

import numpy as np
import pytest

from benchmarks import head_restarts
from scan_dist.metrics import cluster_metrics
from test_head_objectives import _two_blobs


def test_best_of_all_heads_is_the_lowest_loss_head_and_a_screen_can_lose_it():
    final_loss = np.array([0.5, 0.1, 0.9, 0.3])
    final_acc = np.array([0.6, 0.8, 0.5, 0.7])
    rng = np.random.default_rng(0)
    assert head_restarts.simulate(final_loss, final_acc, 4, 50, rng) == pytest.approx((0.8, 0.0))
    mean, std = head_restarts.simulate(final_loss, final_acc, 2, 4000, rng)
    assert abs(mean - (0.8 * 3 + 0.7 * 2 + 0.6 * 1) / 6) < 0.01 and std > 0  # lowest loss of each of the 6 pairs
    # a screen whose early ranking puts head 1 last drops it: the rule then keeps head 3
    early_loss = np.array([0.0, 1.0, 0.2, 0.1])
    assert head_restarts.simulate(final_loss, final_acc, 4, 10, rng, early_loss, keep=2) == pytest.approx((0.7, 0.0))


def test_population_and_summary_on_two_blobs():
    points, neighbors, truth = _two_blobs()
    scan = SimpleNamespace(head_hidden=8, lr=1e-2, weight_decay=0.0, min_steps=60, epochs=1, batch_size=64,
                           entropy_weight=5.0, select_entropy_weight=1.0)
    steps, recorded = head_restarts.train_population(points * 8.0, neighbors, points * 8.0, neighbors.numpy(), 2,
                                                     scan, heads=6, checks=[20], seed=0)
    assert steps == 60 and sorted(recorded) == [20, 60]
    losses, predictions = recorded[60]
    assert losses.shape == (6,) and predictions.shape == (6, len(points))
    losses = {step: loss for step, (loss, _) in recorded.items()}
    accs = {step: [cluster_metrics(truth.numpy(), p)["acc"] for p in preds] for step, (_, preds) in recorded.items()}
    out = head_restarts.summarise(steps, losses, accs, keep=3, draws=20, seed=0)
    assert out["heads"] == 6 and out["best"] >= 0.99  # two separable blobs: some head splits them exactly
    assert set(out["best_of"]) == {"6"} and out["best_of"]["6"]["head_steps"] == 360
    assert set(out["screen"]) == {"6@20"} and out["screen"]["6@20"]["head_steps"] == 6 * 20 + 3 * 40
    assert set(out["early_spearman"]) == {"20"}
    assert out["best_of"]["6"]["std"] == 0.0  # every draw is the whole population


def test_a_kept_population_summarises_again(tmp_path, capsys):
    kept = {"run": "runs/x", "steps": 50, "losses": {"10": [0.1, 0.4, 0.2, 0.3], "50": [0.4, 0.1, 0.3, 0.2]},
            "accs": {"10": [0.5, 0.5, 0.5, 0.5], "50": [0.6, 0.9, 0.7, 0.8]}}
    path = tmp_path / "pop.json"
    path.write_text(json.dumps(kept))
    head_restarts.main(["--from-population", str(path), "--keep", "2", "--draws", "10"])
    out = json.loads(capsys.readouterr().out)
    assert out["best_of"]["4"]["acc"] == 0.9  # head 1 has the lowest final loss
    assert out["screen"]["4@10"]["acc"] == 0.7  # the screen at step 10 keeps heads 0 and 2, then head 2 wins
