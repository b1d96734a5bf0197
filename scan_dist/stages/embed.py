"""Stage 2, embed: the pretext model embeds every training and evaluation image (no augmentation, eval mode)."""
from __future__ import annotations

import numpy as np
import torch.nn.functional as F

from ..io_utils import save_numpy
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
    for split, imageset in (("train", ctx.train_set), ("eval", ctx.eval_set)):
        features = infer(ctx, embed_fn, imageset.images, desc=f"embed {split}").numpy().astype(np.float32)
        path = out_dir / f"{split}.npy"
        if ctx.is_main:
            save_numpy(path, features)
        artifacts[split] = str(path)
    return {"artifacts": artifacts, "metrics": {"dim": int(features.shape[1])}}
