"""Stage 1, pretext: SimCLR (two augmented views per image, NT-Xent) trains the backbone without labels."""
from __future__ import annotations

import torch

from ..io_utils import save_torch
from ..losses import nt_xent
from ..models import build
from ..models.pretrained import load_pretrained_backbone
from ..data.loaders import ViewSpec
from ..trainer import Schedule, run_epochs, scaled_epochs
from .common import make_optimizer

ARTIFACT = "model.pt"


def run(cfg, ctx, config_hash: str) -> dict:
    out = ctx.stage_dir("pretext") / ARTIFACT
    model = ctx.prepare_model(build.simclr_model(cfg, ctx.channels))
    metrics: dict = {}
    if cfg.model.pretrained:
        loaded = load_pretrained_backbone(model.backbone, cfg.model.pretrained)
        ctx.log.info("pretext: %s; SimCLR training skipped", loaded["summary"])
        metrics["pretrained"] = {"format": loaded["format"], "tensors": loaded["loaded"],
                                 "dropped": sum(len(keys) for keys in loaded["dropped"].values())}
    else:
        history = _train(cfg, ctx, model, config_hash)
        if history:
            metrics["final_loss"] = history[-1]["loss"]
    if ctx.is_main:
        save_torch(out, {"model": model.state_dict()})
    return {"artifacts": {"model": str(out)}, "metrics": metrics}


def _train(cfg, ctx, model, config_hash: str) -> list[dict]:
    p = cfg.pretext
    source = ctx.batches("train", [ViewSpec("simclr", "pretext", 0), ViewSpec("simclr", "pretext", 1)],
                         p.batch_size, "pretext")
    optimizer = make_optimizer(p.optimizer, [{"params": model.parameters(), "lr": p.lr}], p.weight_decay, p.momentum)
    per_epoch = source.sampler.steps
    epochs = scaled_epochs(p.epochs, p.min_steps, per_epoch)
    # warm-up keeps its share of the schedule when min_steps raises the epochs
    warmup = int(p.warmup_epochs / max(p.epochs, 1) * epochs * per_epoch)
    schedule = Schedule([p.lr], total_steps=epochs * per_epoch, warmup_steps=warmup,
                        cosine=True, min_ratio=p.min_lr_ratio)
    model.train()
    engine = ctx.engine(model, optimizer)
    # Negatives come from the whole global batch: embeddings are all-gathered with their gradients.
    gather = (lambda z: engine.all_gather(z, grad=True)) if engine.world_size > 1 else None

    def step(batch: dict) -> dict:
        first, second = batch["views"]
        z = engine(torch.cat([first, second]))
        loss = nt_xent(z[: len(first)], z[len(first):], p.temperature, gather=gather, rank=engine.rank)
        engine.backward(loss)
        engine.step()
        return {"loss": loss.detach()}

    return run_epochs(ctx, "pretext", config_hash, {"engine": engine}, source, epochs, step, engine, schedule)
