"""Model heads: the SimCLR projection MLP and several cluster heads evaluated in one batched matmul."""
from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn
import torch.nn.functional as F


class ProjectionHead(nn.Module):
    """SimCLR's MLP (Linear, ReLU, Linear); the output is L2-normalised."""

    def __init__(self, in_dim: int, out_dim: int = 128):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(in_dim, in_dim), nn.ReLU(inplace=True), nn.Linear(in_dim, out_dim))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.mlp(features), dim=1)


class ClusterHeads(nn.Module):
    """H independent heads (linear, or a one-hidden-layer MLP) -> logits [H, B, C].

    The heads' weights are stacked so all heads run as one batched matmul instead of H small ones. With
    `average=True` the heads are one ensemble: the output is [1, B, C], the log of their mean probability (its
    softmax is that mean), so every stage treats an ensemble as one head.
    """

    def __init__(self, in_dim: int, num_clusters: int, num_heads: int, hidden: int = 0, average: bool = False):
        super().__init__()
        self.num_heads, self.num_clusters, self.hidden, self.average = num_heads, num_clusters, hidden, average
        dims = [in_dim, hidden, num_clusters] if hidden > 0 else [in_dim, num_clusters]
        self.weights = nn.ParameterList()
        self.biases = nn.ParameterList()
        for d_in, d_out in zip(dims[:-1], dims[1:]):
            bound = 1.0 / math.sqrt(d_in)  # nn.Linear's default initialisation, per head
            self.weights.append(nn.Parameter(torch.empty(num_heads, d_in, d_out).uniform_(-bound, bound)))
            self.biases.append(nn.Parameter(torch.empty(num_heads, 1, d_out).uniform_(-bound, bound)))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        x = features.unsqueeze(0).expand(self.num_heads, -1, -1)
        for layer, (w, b) in enumerate(zip(self.weights, self.biases)):
            x = torch.baddbmm(b, x, w)
            if layer < len(self.weights) - 1:
                x = F.relu(x)
        if self.average:
            return torch.logsumexp(F.log_softmax(x.float(), dim=-1), dim=0, keepdim=True) - math.log(self.num_heads)
        return x

    def copy_heads_from(self, source: "ClusterHeads", heads, at=None) -> None:
        """Overwrite this module's heads `at` (default: the first len(heads)) with heads `heads` of `source` (same
        sizes), in place."""
        device = self.weights[0].device
        index = torch.as_tensor(list(heads), dtype=torch.long, device=device)
        target = torch.arange(len(index), device=device) if at is None else torch.as_tensor(list(at), device=device)
        with torch.no_grad():
            for dst, src in zip(list(self.weights) + list(self.biases), list(source.weights) + list(source.biases)):
                dst[target] = src[index].to(dst.dtype)

    def keep_head(self, head: int) -> "ClusterHeads":
        """A one-head copy holding head `head` (self-labelling trains only the selected head)."""
        return self.keep_heads([head])

    def keep_heads(self, heads: list[int], perms=None) -> "ClusterHeads":
        """A copy holding `heads`, averaged into one output when there are several (an ensemble). perms[i][c], when
        given, is the output cluster of head heads[i]'s cluster c: the last layer's columns are reordered so all
        members number the clusters alike."""
        kept = ClusterHeads(self.weights[0].shape[1], self.num_clusters, len(heads), self.hidden,
                            average=len(heads) > 1)
        index = torch.as_tensor(list(heads), dtype=torch.long)
        with torch.no_grad():
            for dst, src in zip(list(kept.weights) + list(kept.biases), list(self.weights) + list(self.biases)):
                dst.copy_(src[index])
            if perms is not None:
                order = torch.as_tensor(np.argsort(np.asarray(perms), axis=1))  # new column j <- old column order[j]
                for param in (kept.weights[-1], kept.biases[-1]):
                    param.copy_(torch.gather(param, 2, order[:, None, :].expand(-1, param.shape[1], -1)))
        return kept


class ClusterModel(nn.Module):
    """Backbone + cluster heads: images -> logits [H, B, C]."""

    def __init__(self, backbone: nn.Module, heads: ClusterHeads):
        super().__init__()
        self.backbone, self.heads = backbone, heads

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.heads(self.backbone(images))


class SimCLRModel(nn.Module):
    """Backbone + projection head: images -> L2-normalised embeddings."""

    def __init__(self, backbone: nn.Module, projection_dim: int):
        super().__init__()
        self.backbone = backbone
        self.projection = ProjectionHead(backbone.out_dim, projection_dim)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.projection(self.backbone(images))

    def embedding(self, images: torch.Tensor, layer: str, grid: int) -> torch.Tensor:
        """The embedding `mine.layer` names, L2-normalised: projection (SimCLR's output), backbone (pooled
        features), or grid (the last feature map average-pooled to grid x grid cells: keeps where in the image a
        feature is, which the global pool discards)."""
        if layer == "projection":
            return self(images)
        if layer == "grid":
            cells = F.adaptive_avg_pool2d(self.backbone.feature_map(images), grid).flatten(1)
            return F.normalize(cells, dim=1)
        return F.normalize(self.backbone(images), dim=1)

    def embedding_dim(self, layer: str, grid: int) -> int:
        if layer == "projection":
            return self.projection.mlp[-1].out_features
        return self.backbone.out_dim * (grid * grid if layer == "grid" else 1)
