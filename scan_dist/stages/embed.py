"""Stage 2, embed: the pretext model embeds every training and evaluation image (no augmentation, eval mode)."""
from __future__ import annotations

import numpy as np
import torch.nn.functional as F

from ..errors import DataError
from ..models import build
from .common import infer


def run(cfg, ctx, config_hash: str) -> dict:
    model = ctx.prepare_model(build.simclr_model(cfg, ctx.channels))
    build.load_state(model, ctx.run_dir / "pretext" / "model.pt", key="model")
    model.eval()
    if cfg.mine.layer == "projection":
        embed_fn = model
    else:
        def embed_fn(x):
            return F.normalize(model.backbone(x), dim=1)
    out_dir = ctx.stage_dir("embed")
    artifacts = {}
    for split in ("train", "eval"):
        path = out_dir / f"{split}.npy"  # every rank writes its rows; memory-mapped by the mine stage
        features = infer(ctx, embed_fn, split, desc=f"embed {split}", out_path=path)
        if not np.isfinite(features[: min(len(features), 4096)]).all():
            raise DataError(f"embed: the pretext model's {split} features are not finite (NaN/inf); the pretext "
                            "stage diverged -- lower pretext.lr and rerun")
        artifacts[split] = str(path)
    return {"artifacts": artifacts, "metrics": {"dim": int(features.shape[1])}}
