"""benchmarks/backbone_ensemble.py: the joint space's cosine is the backbones' mean cosine blended with the pixels'
as the mine stage blends one backbone's; a run joined with itself is that run's space; bad input is named."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from benchmarks import backbone_ensemble


def _fake_run(root, seed: int, pixels: np.ndarray):
    rng = np.random.default_rng(seed)
    for split, count in (("train", 40), ("eval", 12)):
        (root / "embed").mkdir(parents=True, exist_ok=True)
        (root / "mine").mkdir(parents=True, exist_ok=True)
        np.save(root / "embed" / f"{split}.npy", rng.normal(size=(count, 8)).astype(np.float32) * (seed + 1))
        np.save(root / "mine" / f"{split}_pixel_pca.npy", pixels[split])
    return root


def _pixels():
    rng = np.random.default_rng(99)
    return {split: rng.normal(size=(count, 5)).astype(np.float32) for split, count in (("train", 40), ("eval", 12))}


def _cos(x):
    x = F.normalize(torch.as_tensor(x).float(), dim=1)
    return x @ x.T


@pytest.mark.parametrize("pixel_weight", [1.0, 1.5])
def test_joint_cosine_is_the_backbones_mean_blended_with_the_pixels(tmp_path, pixel_weight):
    pixels = _pixels()
    a, b = _fake_run(tmp_path / "a", 0, pixels), _fake_run(tmp_path / "b", 1, pixels)
    joint = backbone_ensemble.joint_space([a, b], "train", pixel_weight)
    cos_a, cos_b = (_cos(np.load(run / "embed" / "train.npy")) for run in (a, b))
    cos_pix = _cos(pixels["train"])
    expected = (0.5 * (cos_a + cos_b) + pixel_weight ** 2 * cos_pix) / (1 + pixel_weight ** 2)
    torch.testing.assert_close(joint @ joint.T, expected, atol=1e-5, rtol=0)


def test_a_run_joined_with_itself_has_its_own_geometry(tmp_path):
    run = _fake_run(tmp_path / "a", 3, _pixels())
    single = backbone_ensemble.joint_space([run], "eval", 1.0)
    doubled = backbone_ensemble.joint_space([run, run], "eval", 1.0)
    torch.testing.assert_close(single @ single.T, doubled @ doubled.T, atol=1e-5, rtol=0)


def test_a_missing_artifact_is_named(tmp_path):
    run = _fake_run(tmp_path / "a", 0, _pixels())
    (run / "embed" / "eval.npy").unlink()
    with pytest.raises(SystemExit, match="embed/eval.npy is missing"):
        backbone_ensemble.joint_space([run], "eval", 1.0)


def test_one_run_is_refused(tmp_path, capsys):
    with pytest.raises(SystemExit):
        backbone_ensemble.main([str(tmp_path)])
    assert "at least two runs" in capsys.readouterr().err
