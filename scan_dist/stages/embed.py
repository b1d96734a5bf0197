"""Stage 2, embed: the pretext model embeds every training and evaluation image (no augmentation, eval mode)."""
from __future__ import annotations

from ..models import build
from .common import infer, require_finite


def run(cfg, ctx, config_hash: str) -> dict:
    model = ctx.prepare_model(build.simclr_model(cfg, ctx.channels))
    build.load_state(model, ctx.run_dir / "pretext" / "model.pt", key="model")
    model.eval()
    def embed_fn(x):
        return model.embedding(x, cfg.mine.layer, cfg.mine.grid)
    out_dir = ctx.stage_dir("embed")
    artifacts = {}
    for split in ("train", "eval"):
        path = out_dir / f"{split}.npy"  # every rank writes its rows; memory-mapped by the mine stage
        features = infer(ctx, embed_fn, split, desc=f"embed {split}", out_path=path)
        require_finite(features, f"embed: the pretext model's {split} features",
                       "the pretext model diverged: lower pretext.lr (or check model.pretrained) and rerun")
        artifacts[split] = str(path)
    return {"artifacts": artifacts, "metrics": {"dim": int(features.shape[1])}}
