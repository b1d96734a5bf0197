"""Self-labelling: the head-only mode on a frozen backbone's cached features (selflabel.mode=cached), and the
teacher whose pseudo-labels must hold for an image and its mirror image (selflabel.teacher_flip)."""
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from scan_dist.config import load_config
from scan_dist.errors import ConfigError
from scan_dist.losses import confident_targets
from scan_dist.stages.selflabel import mirror_averaged


def test_cached_mode_needs_views():
    with pytest.raises(ConfigError, match="selflabel.cached_views"):
        load_config("smoke", ["selflabel.mode=cached", "selflabel.cached_views=0"])


@pytest.mark.slow
def test_cached_self_labelling_end_to_end(tmp_path, fashion_mnist):
    run_dir = tmp_path / "run"
    result = subprocess.run([sys.executable, "-m", "scan_dist.launch", "--run-dir", str(run_dir), "smoke",
                             "run.progress=false", "selflabel.mode=cached", "selflabel.cached_views=2",
                             "selflabel.threshold=0.3"], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    stage = json.loads((run_dir / "selflabel" / "DONE").read_text())["metrics"]
    assert stage["final_confident"] > 0 and "final_loss" in stage  # the head actually trained
    (cache,) = (run_dir / "selflabel" / "cache").iterdir()
    table = np.load(cache / "features.npy", mmap_mode="r")
    assert table.dtype == np.float16 and table.shape[:2] == (3000, 3)  # plain view + 2 strong views
    assert json.loads((run_dir / "metrics.json").read_text())["acc"] > 0.2


class _SidedModel(torch.nn.Module):
    """Logits [1, B, 2] that favour class 0 by the image's left-half minus right-half mass: a mirror flips them."""

    def forward(self, x):
        half = x.shape[-1] // 2
        margin = 20.0 * (x[..., :half].sum(dim=(1, 2, 3)) - x[..., half:].sum(dim=(1, 2, 3)))
        return torch.stack([margin, -margin], dim=-1).unsqueeze(0)


def test_mirror_averaged_teacher_labels_only_what_holds_for_both_mirror_images():
    images = torch.zeros(3, 1, 4, 4)
    images[0, ..., :2] = 1.0  # mass on the left: confident class 0, its mirror confident class 1
    images[1] = 1.0  # symmetric: both mirror images give 0.5 / 0.5
    images[2, ..., 0] = 1.0
    images[2, ..., 3] = 0.9  # nearly symmetric, leaning left
    model = _SidedModel()
    plain_mask, _ = confident_targets(model(images)[0], 0.99)
    averaged = mirror_averaged(model)(images)
    assert averaged.shape == (1, 3, 2)
    probs = averaged[0].exp()
    assert torch.allclose(probs.sum(-1), torch.ones(3))
    mirrored = model(torch.flip(images, dims=[-1]))[0].softmax(-1)
    assert torch.allclose(probs, 0.5 * (model(images)[0].softmax(-1) + mirrored), atol=1e-6)
    mask, labels = confident_targets(averaged[0], 0.99)
    assert plain_mask[0] and not mask[0]  # confident on the image alone, not once its mirror image disagrees
    assert not mask.any() and labels[2] == 0  # the leaning image keeps its side


@pytest.mark.parametrize("overrides, fragment", [
    (["selflabel.ema_decay=0"], "ema_decay=0.0"),
    (["selflabel.mode=cached", "selflabel.ema_decay=0.999"], "mode=cached"),
    (["augment.flip=false", "selflabel.ema_decay=0.999"], "augment.flip=False"),
])
def test_teacher_flip_refuses_what_it_cannot_mirror(overrides, fragment):
    with pytest.raises(ConfigError, match=r"selflabel\.teacher_flip.*" + fragment.replace(".", r"\.")):
        load_config("smoke", ["selflabel.teacher_flip=true", *overrides])
