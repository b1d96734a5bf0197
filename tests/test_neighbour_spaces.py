"""benchmarks/neighbour_spaces.py on a finished smoke run: it reads the run's own labels, heads and neighbours."""
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from benchmarks import neighbour_spaces
from scan_dist.stages.mine import shard_neighbors

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def head_run(tmp_path_factory, fashion_mnist):
    run_dir = tmp_path_factory.mktemp("spaces") / "run"
    cmd = [sys.executable, "-m", "scan_dist.launch", "--local", "--run-dir", str(run_dir), "smoke",
           "run.progress=false", "selflabel.enabled=false"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    return run_dir


def test_the_mined_space_is_searched_as_the_mine_stage_did(head_run):
    """The search the diagnostic runs on the other spaces, on the (unit) mined space, gives the mine stage's neighbours."""
    space = torch.from_numpy(np.load(head_run / "mine" / "train_space.npy"))
    mined = np.load(head_run / "mine" / "train_neighbors.npy")
    found = shard_neighbors(space, mined.shape[1], "torch", torch.device("cpu"), "fp32", 0, len(space))
    assert np.array_equal(found.numpy(), mined)


def test_agreements_of_every_space_and_the_mine_stages_own(head_run, capsys):
    neighbour_spaces.main([str(head_run)])
    row = json.loads(capsys.readouterr().out.strip())
    metrics = json.loads((head_run / "metrics.json").read_text())
    # the labels are the run's own training subset: the mined space scores what the mine stage logged
    assert row["mined"] == pytest.approx(metrics["stages"]["mine"]["train_neighbor_agreement"], abs=1e-4)
    assert row["heads"] == 3 and row["k"] == 10
    for name in ("head_probs", "head_probs_sqrt", "mined+head_probs", "head_hidden"):  # smoke heads are MLPs
        assert 0.1 < row[name] <= 1.0, name  # ten balanced classes: chance is 0.1


def test_the_mined_space_rebuilt_at_other_pixel_weights(head_run):
    """At weight 1 the rebuilt space is the mine stage's own (same agreement); other weights give other spaces."""
    row = neighbour_spaces.measure(head_run, None, heads=False, pixel_weights=[1.0, 3.0])
    assert "heads" not in row and "head_probs" not in row
    assert row["pixel_weight=1"] == pytest.approx(row["mined"], abs=1e-3)
    space = neighbour_spaces.reweighted_spaces(head_run, neighbour_spaces.load_config(str(head_run / "config.yaml")),
                                               [1.0, 3.0])
    mined = torch.from_numpy(np.load(head_run / "mine" / "train_space.npy"))
    assert torch.allclose(space["pixel_weight=1"], mined, atol=1e-5)
    assert not torch.allclose(space["pixel_weight=3"], mined, atol=1e-2)
    assert 0.1 < row["pixel_weight=3"] <= 1.0


def test_pixel_weights_of_a_run_without_the_pixel_part_are_refused(head_run, tmp_path):
    other = tmp_path / "run"
    other.mkdir()
    (other / "config.yaml").write_text((head_run / "config.yaml").read_text().replace("features: both",
                                                                                      "features: pretext"))
    with pytest.raises(SystemExit, match="mine.features=pretext"):
        neighbour_spaces.reweighted_spaces(other, neighbour_spaces.load_config(str(other / "config.yaml")), [2.0])


def test_pixel_weights_that_are_not_numbers_are_refused_before_any_run_is_read(tmp_path, capsys):
    with pytest.raises(SystemExit):
        neighbour_spaces.main(["--pixel-weights", "1,two", str(tmp_path / "absent")])
    assert "comma-separated numbers" in capsys.readouterr().err


def test_a_run_whose_heads_read_the_backbone_is_refused(head_run, tmp_path):
    other = tmp_path / "run"
    other.mkdir()
    text = (head_run / "config.yaml").read_text().replace("features: mined", "features: backbone")
    (other / "config.yaml").write_text(text)
    with pytest.raises(SystemExit, match="scan.features=backbone"):
        neighbour_spaces.measure(other, None)
