"""Builds the models of each stage from the config, and loads the previous stage's weights into them."""
from __future__ import annotations

from pathlib import Path

import torch

from ..config import Config
from ..errors import DataError
from ..io_utils import load_torch
from .backbones import build_backbone
from .heads import ClusterHeads, ClusterModel, SimCLRModel
from .mined_space import MinedSpace


def simclr_model(cfg: Config, channels: int) -> SimCLRModel:
    return SimCLRModel(build_backbone(cfg.model.backbone, channels, cfg.model.width), cfg.model.projection_dim)


def cluster_model(cfg: Config, ctx, num_heads: int) -> ClusterModel:
    """Backbone + heads; with scan.features=mined the "backbone" is the mined space (weights loaded separately)."""
    channels = ctx.channels
    if cfg.scan.features == "mined":
        encoder = simclr_model(cfg, channels) if cfg.mine.features in ("pretext", "both") else None
        pca_dims = ctx.pca_dims if cfg.mine.features in ("pixels", "both") else 0
        backbone = MinedSpace(encoder, cfg.mine.layer, ctx.pixel_shape, pca_dims, cfg.mine.grid,
                              cfg.mine.pixel_weight)
    else:
        backbone = build_backbone(cfg.model.backbone, channels, cfg.model.width)
    heads = ClusterHeads(backbone.out_dim, cfg.num_clusters, num_heads, cfg.scan.head_hidden)
    return ClusterModel(backbone, heads)


def load_state(module: torch.nn.Module, path: Path, key: str | None = None) -> None:
    """Strict load of a saved state dict (optionally nested under `key`), with a one-line error on mismatch."""
    if not Path(path).is_file():
        raise DataError(f"weights file {path} does not exist")
    try:
        state = load_torch(path)
    except Exception as exc:  # a corrupt or foreign file: say which
        raise DataError(f"cannot read weights file {path}: {exc}") from None
    if key is not None:
        state = state[key]
    missing, unexpected = module.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise DataError(
            f"weights file {path} does not match the model: {len(missing)} missing key(s) "
            f"(e.g. {missing[:2]}), {len(unexpected)} unexpected (e.g. {unexpected[:2]})"
        )


def load_backbone_from(backbone: torch.nn.Module, path: Path) -> None:
    """Load the `backbone.*` entries of a saved model (pretext or SCAN) into a bare backbone."""
    state = load_torch(path)["model"]
    prefix = "backbone."
    backbone.load_state_dict({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)})
