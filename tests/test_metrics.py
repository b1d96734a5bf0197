"""Tests for scan_dist.metrics: Hungarian accuracy, clustering scores, confusion order, kNN purity, k-means baseline."""

import math

import numpy as np
import pytest
import torch
from scipy.optimize import linear_sum_assignment
from sklearn import metrics as skm

from scan_dist.metrics import (
    cluster_metrics,
    confident_purity,
    confusion_matrix,
    hungarian_match,
    kmeans_baseline,
    neighbor_agreement,
)


def test_relabelled_perfect_clustering_scores_one():
    targets = np.repeat(np.arange(4), 5)
    perm = np.array([2, 0, 3, 1])
    preds = perm[targets]
    for t, p in [(targets, preds), (torch.from_numpy(targets), torch.from_numpy(preds)),
                 (targets.tolist(), preds.tolist())]:
        m = cluster_metrics(t, p)
        assert m["acc"] == 1.0
        assert m["acc_many_to_one"] == 1.0
        assert m["nmi"] == pytest.approx(1.0)
        assert m["ari"] == pytest.approx(1.0)
        assert m["ami"] == pytest.approx(1.0)
        assert m["num_clusters"] == 4 and m["num_classes"] == 4
    assert hungarian_match(targets, preds) == {2: 0, 0: 1, 3: 2, 1: 3}


def test_hand_computed_acc_and_many_to_one():
    # Cluster 0 holds classes {0,0,0,1}, cluster 1 holds {1,1,0}, cluster 2 holds {0,1}.
    targets = [0, 0, 0, 1, 1, 1, 0, 0, 1]
    preds = [0, 0, 0, 0, 1, 1, 1, 2, 2]
    m = cluster_metrics(targets, preds)
    # One-to-one: 0->0 (3) and 1->1 (2) = 5/9; cluster 2 is unmatched, so its samples are wrong.
    assert m["acc"] == pytest.approx(5 / 9)
    # Many-to-one: 3 + 2 + 1 = 6/9.
    assert m["acc_many_to_one"] == pytest.approx(6 / 9)
    assert m["nmi"] == pytest.approx(skm.normalized_mutual_info_score(targets, preds, average_method="arithmetic"))
    assert m["ari"] == pytest.approx(skm.adjusted_rand_score(targets, preds))
    assert m["ami"] == pytest.approx(skm.adjusted_mutual_info_score(targets, preds))
    assert m["num_clusters"] == 3 and m["num_classes"] == 2
    mapping = hungarian_match(targets, preds)
    assert mapping == {0: 0, 1: 1}


def test_acc_matches_scipy_on_random_labels():
    rng = np.random.default_rng(0)
    targets = rng.integers(0, 6, size=500)
    preds = np.where(rng.random(500) < 0.6, (targets + 2) % 6, rng.integers(0, 6, size=500))
    counts = skm.confusion_matrix(targets, preds, labels=range(6))  # rows class, cols cluster
    rows, cols = linear_sum_assignment(-counts)
    expected = counts[rows, cols].sum() / 500
    assert cluster_metrics(targets, preds)["acc"] == pytest.approx(expected)


def test_overclustering_one_to_one_vs_many_to_one():
    # Each of 3 classes is split cleanly over 2 clusters of 4 and 2 samples.
    targets = np.repeat([0, 1, 2], 6)
    preds = np.array([0] * 4 + [1] * 2 + [2] * 4 + [3] * 2 + [4] * 4 + [5] * 2)
    m = cluster_metrics(targets, preds)
    assert m["acc"] == pytest.approx(12 / 18)
    assert m["acc_many_to_one"] == 1.0
    assert m["num_clusters"] == 6 and m["num_classes"] == 3
    mapping = hungarian_match(targets, preds)
    assert mapping == {0: 0, 2: 1, 4: 2}


def test_underclustering_maps_every_cluster():
    mapping = hungarian_match([0, 0, 1, 1, 2, 2, 2], [0, 0, 0, 0, 1, 1, 1])
    assert mapping[1] == 2 and mapping[0] in (0, 1) and len(mapping) == 2
    # Explicit sizes add empty clusters/classes; the observed pairs keep their match.
    wide = hungarian_match([0, 1], [0, 1], num_clusters=4, num_classes=3)
    assert wide[0] == 0 and wide[1] == 1 and len(wide) == 3


def test_unlabelled_targets_are_ignored():
    targets = np.array([0, 0, 1, 1, -1, -1, -1])
    preds = np.array([1, 1, 0, 0, 0, 1, 2])
    m = cluster_metrics(targets, preds)
    assert m["acc"] == 1.0 and m["nmi"] == pytest.approx(1.0)
    assert m["num_classes"] == 2
    assert m["num_clusters"] == 3  # counted over every prediction, labelled or not
    assert hungarian_match(targets, preds) == {1: 0, 0: 1}


def test_all_unlabelled_returns_none():
    m = cluster_metrics([-1, -1, -1], [0, 1, 2])
    assert m == {"acc": None, "nmi": None, "ari": None, "ami": None}
    assert cluster_metrics(torch.full((4,), -1), torch.arange(4), torch.rand(4, 6))["acc"] is None


def test_top5_with_crafted_probabilities():
    # Clusters are a permutation of classes, so top-5 must go through the Hungarian mapping.
    targets = np.arange(6)
    perm = np.array([3, 5, 0, 1, 2, 4])
    preds = perm[targets]
    probs = np.eye(6)[preds] * 0.5 + 0.05
    assert cluster_metrics(targets, preds, probs)["top5"] == 1.0
    # Give the true cluster of samples 0 and 1 the lowest probability (rank 6, a miss)
    # and that of sample 2 the fifth-highest (still a hit).
    descending = np.array([0.3, 0.25, 0.2, 0.15, 0.1, 0.0])
    for sample, true_rank in [(0, 5), (1, 5), (2, 4)]:
        others = [k for k in range(6) if k != preds[sample]]
        order = others[:true_rank] + [preds[sample]] + others[true_rank:]
        probs[sample, order] = descending
    m = cluster_metrics(torch.from_numpy(targets), torch.from_numpy(preds), torch.tensor(probs, dtype=torch.float16))
    assert m["top5"] == pytest.approx(4 / 6)
    assert m["acc"] == 1.0


def test_top5_omitted_for_fewer_than_five_clusters():
    m = cluster_metrics([0, 1, 2], [0, 1, 2], np.eye(3))
    assert "top5" not in m


def test_confusion_reorder_puts_matches_on_diagonal():
    targets = np.array([0, 0, 0, 1, 1, 2, 2, 2])
    preds = np.array([2, 2, 1, 0, 0, 1, 1, 3])  # 2->0, 0->1, 1->2, cluster 3 extra
    conf = confusion_matrix(targets, preds)
    assert conf.shape == (3, 4)
    np.testing.assert_array_equal(conf, [[2, 0, 1, 0],
                                         [0, 2, 0, 0],
                                         [0, 0, 2, 1]])
    assert conf.sum() == 8
    assert np.trace(conf) / conf.sum() == pytest.approx(cluster_metrics(targets, preds)["acc"])


def test_confusion_with_given_mapping_and_fewer_clusters():
    targets = [0, 1, 2, 2, -1]
    preds = [0, 0, 1, 1, 1]
    conf = confusion_matrix(targets, preds, mapping={0: 1, 1: 2})
    # Class 0 has no cluster, so its column is all zero; class 1 -> cluster 0, class 2 -> cluster 1.
    np.testing.assert_array_equal(conf, [[0, 1, 0],
                                         [0, 1, 0],
                                         [0, 0, 2]])


def test_neighbor_agreement_by_hand():
    targets = np.array([0, 0, 1, 1, -1])
    neighbors = np.array([[1, 2],   # agree, disagree
                          [0, 4],   # agree, skipped (unlabelled neighbour)
                          [3, 0],   # agree, disagree
                          [2, 1],   # agree, disagree
                          [0, 1]])  # skipped (unlabelled sample)
    assert neighbor_agreement(targets, neighbors) == pytest.approx(4 / 7)
    assert neighbor_agreement(torch.tensor(targets), torch.tensor(neighbors), chunk_rows=2) == pytest.approx(4 / 7)
    assert math.isnan(neighbor_agreement([-1, -1], [[1], [0]]))


def test_confident_purity_by_hand():
    # Clusters 0 -> class 1 and 1 -> class 0 under the Hungarian map (4 of 6 agree); cluster 2 is empty.
    targets = [1, 1, 0, 0, 0, -1]
    predictions = [0, 0, 1, 1, 0, 1]
    confidence = [0.999, 0.5, 0.995, 0.999, 0.999, 0.999]
    out = confident_purity(targets, predictions, confidence, 0.99, num_clusters=3, num_classes=2)
    assert out["threshold"] == 0.99
    assert out["share"] == pytest.approx(5 / 6)
    # Above the threshold and labelled: rows 0 (right), 2 (right), 3 (right), 4 (wrong: cluster 0 is class 1).
    assert out["acc"] == pytest.approx(3 / 4)
    assert out["min_cluster_share"] == pytest.approx(2 / 3)  # cluster 0: rows 0, 4 of 0, 1, 4; empty cluster 2 ignored
    nobody = confident_purity(targets, predictions, np.zeros(6), 0.99)
    assert nobody["share"] == 0.0 and nobody["acc"] is None and nobody["min_cluster_share"] == 0.0
    with pytest.raises(ValueError, match="confidence"):
        confident_purity(targets, predictions, [0.5], 0.9)


def test_input_validation():
    with pytest.raises(ValueError):
        cluster_metrics([0, 1], [0])
    with pytest.raises(ValueError):
        cluster_metrics([0, 1], [0.5, 1.0])
    with pytest.raises(ValueError):
        hungarian_match([0, 1], [0, 3], num_clusters=2)


def _blob_images(n_per_class=30, seed=0):
    """Three visually distinct 1x8x8 patterns (left bar, right bar, centre square) plus noise."""
    rng = np.random.default_rng(seed)
    patterns = np.zeros((3, 8, 8))
    patterns[0, :, :3] = 1
    patterns[1, :, 5:] = 1
    patterns[2, 2:6, 2:6] = 1
    targets = np.repeat(np.arange(3), n_per_class)
    images = patterns[targets] * 200 + rng.normal(0, 20, size=(targets.size, 8, 8)) + 20
    images = np.clip(images, 0, 255).astype(np.uint8)[:, None]
    perm = rng.permutation(targets.size)
    return images[perm], targets[perm]


def test_kmeans_baseline_separable_blobs():
    images, targets = _blob_images()
    result = kmeans_baseline(torch.from_numpy(images), targets, num_clusters=3, seed=0, pca_dims=10)
    assert result["acc"] > 0.9
    assert result["nmi"] > 0.8
    assert result["seconds"] >= 0.0
    assert result["num_clusters"] == 3
