"""benchmarks/head_objectives.py: its graph tools on hand-built graphs, TEMI heads on separable data, and every
method on a finished smoke run (whose own evaluation it must reproduce)."""
import json
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from benchmarks import head_objectives
from scan_dist.stages.mine import shard_neighbors


def _two_blobs(per_blob: int = 200, dim: int = 16, seed: int = 0):
    """Unit vectors around two orthogonal directions, and each row's 5 nearest rows (all inside its blob)."""
    generator = torch.Generator().manual_seed(seed)
    centres = torch.eye(dim)[:2]
    points = centres.repeat_interleave(per_blob, 0) + 0.1 * torch.randn(2 * per_blob, dim, generator=generator)
    points = torch.nn.functional.normalize(points, dim=1)
    neighbors = shard_neighbors(points, 5, "torch", torch.device("cpu"), "fp32", 0, len(points))
    return points, neighbors, torch.arange(2).repeat_interleave(per_blob)


def test_merging_joins_the_clusters_the_neighbour_pairs_join():
    # four clusters; every neighbour pair stays inside {0, 1} or inside {2, 3}
    assign = np.array([0, 1, 0, 1, 2, 3, 2, 3])
    neighbors = np.array([[1], [0], [3], [2], [5], [4], [7], [6]])
    mapping = head_objectives.merge_clusters(assign, neighbors, 4, 2)
    assert mapping[0] == mapping[1] and mapping[2] == mapping[3] and mapping[0] != mapping[2]
    assert sorted(set(mapping.tolist())) == [0, 1]


def test_spectral_clustering_splits_two_disconnected_cliques():
    points, neighbors, truth = _two_blobs()
    labels = head_objectives.spectral(neighbors.numpy(), 2, seed=0)
    assert len(set(labels[truth.numpy() == 0])) == 1 and len(set(labels[truth.numpy() == 1])) == 1
    assert labels[0] != labels[-1]


@pytest.mark.parametrize("objective", ["scan", "temi"])
def test_trained_heads_separate_two_blobs(objective):
    points, neighbors, truth = _two_blobs()
    scan = SimpleNamespace(num_heads=2, head_hidden=16, lr=1e-2, weight_decay=0.0, min_steps=150, epochs=1,
                           batch_size=64, entropy_weight=5.0)
    temi = {"beta": 0.6, "student_temp": 0.1, "teacher_temp": 0.1, "teacher_momentum": 0.9, "size_momentum": 0.9}
    heads = head_objectives.train_heads(points * 8.0, neighbors, 2, SimpleNamespace(scan=scan), objective, 0, temi)
    with torch.no_grad():
        predictions = heads(points * 8.0).argmax(-1)
    for head in predictions:  # every head puts each blob in one cluster, the two blobs in different ones
        agree = (head == truth).float().mean().item()
        assert max(agree, 1 - agree) >= 0.99


@pytest.mark.slow
def test_every_method_on_a_finished_smoke_run(tmp_path, fashion_mnist):
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "scan_dist.launch", "--local", "--run-dir", str(run_dir), "smoke",
           "run.progress=false", "selflabel.enabled=false"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    row = head_objectives.measure(run_dir, list(head_objectives.METHODS), clusters_over=12, smooth_k=5,
                                  temi={"beta": 0.6, "student_temp": 0.1, "teacher_temp": 0.1,
                                        "teacher_momentum": 0.996, "size_momentum": 0.9})
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert row["final"] == pytest.approx(metrics["acc"], abs=1e-4)  # the labels and logits the evaluate stage scored
    for name in ("scan", "temi", "scan@12"):
        scores = row[name]
        assert scores["worst"] <= scores["median"] <= scores["best"]
        assert scores["worst"] <= scores["loss_rule"] <= scores["best"]
    assert row["scan"]["best"] > 0.2 and row["spectral"]["best"] > 0.2  # ten classes: chance is 0.1
    assert 0.0 < row["smooth=5"] <= 1.0
    # The harness's own forward pass of the final model gives the evaluate stage's score; flipped, another one.
    assert row["mirror"]["final"] == pytest.approx(metrics["acc"], abs=1e-4)
    assert row["mirror"]["scan"] == pytest.approx(metrics["stages"]["evaluate"]["scan_heads"]["selected"]["acc"], abs=1e-4)
    assert 0.1 < row["mirror"]["final+mirror"] <= 1.0 and 0.1 < row["mirror"]["scan+mirror"] <= 1.0
    with pytest.raises(SystemExit, match="num_clusters=10"):  # merging 10 clusters into 10 would screen nothing
        head_objectives.measure(run_dir, ["scan@C"], clusters_over=10, smooth_k=5, temi={})


def test_unknown_methods_are_refused_by_name():
    result = subprocess.run([sys.executable, "benchmarks/head_objectives.py", "--methods", "scan,kmeans", "x"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "kmeans" in result.stderr and "spectral" in result.stderr
