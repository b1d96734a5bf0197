"""The space the neighbours were mined in, as a module on images, so cluster heads can read it directly.

`mine.features` searches neighbours in the pretext embedding, in a PCA of the pixels, or in both (each part
L2-normalised, concatenated, normalised again). With `scan.features=mined` the SCAN heads read exactly those vectors:
on small images where pixels carry much of the class (Fashion-MNIST), heads on this space cluster better than heads
on the backbone alone (see README, "Measured results"). As a module it stays a function of the image, so
self-labelling can still train the convolutional part end to end; the PCA part is a fixed linear map.
"""
from __future__ import annotations

import torch
from torch import nn
import torch.nn.functional as F

from .heads import SimCLRModel

# Unit vectors are scaled so that freshly initialised heads produce logits of a useful size (measured: 8 works
# for 64..2048 dimensions with linear or MLP heads).
SCALE = 8.0


class MinedSpace(nn.Module):
    def __init__(self, encoder: SimCLRModel | None, layer: str, pixel_shape: tuple[int, int, int], pca_dims: int,
                 grid: int, pixel_weight: float = 1.0):
        super().__init__()
        self.encoder, self.layer, self.pca_dims, self.grid = encoder, layer, pca_dims, grid
        self.pixel_weight = float(pixel_weight)
        channels, height, width = pixel_shape
        if pca_dims:
            self.register_buffer("pca_mean", torch.zeros(1, channels * height * width))
            self.register_buffer("pca_basis", torch.zeros(channels * height * width, pca_dims))
            # inputs arrive normalised; the PCA was fitted on pixels in [0, 1]
            self.register_buffer("pixel_mean", torch.zeros(1, channels, 1, 1))
            self.register_buffer("pixel_std", torch.ones(1, channels, 1, 1))
        encoder_dim = 0
        if encoder is not None:
            encoder_dim = encoder.embedding_dim(layer, grid)
        self.out_dim = encoder_dim + pca_dims

    def set_pca(self, mean: torch.Tensor, basis: torch.Tensor, pixel_mean, pixel_std) -> None:
        with torch.no_grad():
            self.pca_mean.copy_(mean.reshape(self.pca_mean.shape))
            self.pca_basis.copy_(basis)
            self.pixel_mean.copy_(torch.as_tensor(pixel_mean).reshape(self.pixel_mean.shape))
            self.pixel_std.copy_(torch.as_tensor(pixel_std).reshape(self.pixel_std.shape))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        parts = []  # same order as the mine stage: pretext embedding first, then pixels
        if self.encoder is not None:
            parts.append(self.encoder.embedding(images, self.layer, self.grid).float())
        if self.pca_dims:
            pixels = (images * self.pixel_std + self.pixel_mean).flatten(1)
            parts.append((pixels - self.pca_mean) @ self.pca_basis)
        return join(parts, self.part_weights) * SCALE

    @property
    def part_weights(self) -> list[float]:
        return part_weights(self.encoder is not None, bool(self.pca_dims), self.pixel_weight)


def part_weights(pretext: bool, pixels: bool, pixel_weight: float) -> list[float]:
    """The weights `join` gives the parts present, in their order: pretext embedding, then pixels."""
    return [1.0] * pretext + [pixel_weight] * pixels


def join(parts: list[torch.Tensor], weights: list[float]) -> torch.Tensor:
    """The mined vectors: each part L2-normalised and multiplied by its weight, concatenated, normalised again
    (so the cosine of two vectors is the weighted mean of the parts' cosines, weights squared)."""
    return F.normalize(torch.cat([F.normalize(part, dim=1) * weight for part, weight in zip(parts, weights)], dim=1),
                       dim=1)
