"""MinedSpace: on images it reproduces exactly the vectors the mine stage searched in (pretext, pixels, both)."""
import pytest
import torch
import torch.nn.functional as F

from scan_dist.data.augment import normalize
from scan_dist.models.backbones import build_backbone
from scan_dist.models.heads import SimCLRModel
from scan_dist.models.mined_space import SCALE, MinedSpace
from scan_dist.stages.mine import fit_pixel_pca


@pytest.mark.parametrize("features, layer, pixel_weight", [("both", "projection", 1.0), ("pixels", "projection", 1.0),
                                                           ("pretext", "backbone", 1.0), ("both", "grid", 1.0),
                                                           ("both", "projection", 2.0), ("pixels", "projection", 3.0)])
def test_matches_the_mined_vectors(features, layer, pixel_weight):
    torch.manual_seed(0)
    images = torch.randint(0, 256, (40, 1, 12, 12), dtype=torch.uint8)
    mean, std = [0.4], [0.3]
    encoder = SimCLRModel(build_backbone("cnn_small", 1, width=4), 8).eval() if features != "pixels" else None
    pca_dims = 5 if features != "pretext" else 0
    space = MinedSpace(encoder, layer, (1, 12, 12), pca_dims, grid=2, pixel_weight=pixel_weight).eval()
    parts = []  # what the mine stage computes
    x = normalize(images, mean, std)
    if encoder is not None:
        with torch.no_grad():
            if layer == "grid":  # 12 px -> a 3x3 map; 2x2 cells of it, by hand
                fmap = encoder.backbone.features[:-2](x)
                cells = [fmap[:, :, r0:r1, c0:c1].mean((2, 3)) for r0, r1 in ((0, 2), (1, 3)) for c0, c1 in ((0, 2), (1, 3))]
                parts.append(F.normalize(torch.stack(cells, dim=2).flatten(1), dim=1))
            else:
                parts.append(F.normalize(encoder(x) if layer == "projection" else encoder.backbone(x), dim=1))
    if pca_dims:
        flat = images.reshape(len(images), -1).float() / 255
        pca_mean, basis = fit_pixel_pca(flat, pca_dims, seed=0)
        space.set_pca(pca_mean, basis, mean, std)
        # the pixel part's weight counts only beside the pretext part (alone, the final normalisation undoes it)
        parts.append(F.normalize((flat - pca_mean) @ basis, dim=1) * (pixel_weight if encoder is not None else 1.0))
    expected = F.normalize(torch.cat(parts, dim=1), dim=1) * SCALE
    with torch.no_grad():
        got = space(x)
    assert got.shape == (40, space.out_dim)
    assert torch.allclose(got, expected, atol=1e-4)


def test_state_dict_carries_the_pca():
    space = MinedSpace(None, "projection", (1, 4, 4), 3, grid=2)
    space.set_pca(torch.ones(1, 16), torch.full((16, 3), 2.0), [0.5], [0.25])
    fresh = MinedSpace(None, "projection", (1, 4, 4), 3, grid=2)
    fresh.load_state_dict(space.state_dict())
    assert torch.equal(fresh.pca_basis, space.pca_basis) and fresh.pixel_std.item() == 0.25
