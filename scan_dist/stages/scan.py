"""Stage 4, SCAN: cluster heads trained so an image and its mined neighbours agree, with an entropy term.

`scan.mode=full` trains backbone and heads on augmented views of the anchor and of a sampled neighbour (the
paper's CIFAR/STL recipe); `scan.mode=head` trains only the heads on frozen backbone features (the paper's ImageNet
recipe; seconds per epoch). `scan.mode=cached` also trains only the heads, but on frozen features of fixed
augmented views: the backbone runs once per image and view (`scan.cached_views` views of kind `scan.view`, plus the
un-augmented view 0) into an fp16 memory-mapped cache under `<run>/scan/cache/` (see feature_cache.py), and every
step gathers rows from it. Each anchor and each sampled neighbour draws its own view uniformly from the augmented
views 1..V (as the paper augments both); view 0, the un-augmented image, is used only when V = 0 (then it equals
mode=head) and is kept for consumers of plain features. The head kept is the one with the lowest SCAN loss on the
evaluation images (un-augmented) and their own mined neighbours — the paper's label-free selection rule.
"""
from __future__ import annotations

import numpy as np
import torch

from .. import kernels
from ..data import batch_rng
from ..io_utils import load_torch, save_torch
from ..losses import scan_objective
from ..models import build
from ..trainer import Schedule, run_epochs, steps_per_epoch
from .common import infer, make_optimizer
from .feature_cache import build_cache


def sample_neighbors(indices: torch.Tensor, neighbors: torch.Tensor) -> torch.Tensor:
    """A partner per anchor, uniform over its k neighbours and itself (the paper samples the image itself too)."""
    k = neighbors.shape[1]
    pick = batch_rng.randint(k + 1, len(indices))  # drawn for the global batch: the same partners on N ranks
    partners = neighbors[indices, pick.clamp(max=k - 1)]
    return torch.where(pick == k, indices, partners)


def draw_views(count: int, views: int) -> torch.Tensor:
    """A cached view per row: uniform over the augmented views 1..`views`; all view 0 when `views` is 0.

    Drawn with batch_rng, so N processes draw for their rows what one process draws for them.
    """
    if views == 0:
        return torch.zeros(count, dtype=torch.long)
    return batch_rng.randint(views, count) + 1


def selection_losses(logits: torch.Tensor, neighbors: torch.Tensor, entropy_weight: float) -> torch.Tensor:
    """Per-head SCAN loss over every (image, neighbour) pair of the evaluation set: lower is better."""
    k = neighbors.shape[1]
    anchors = logits.repeat_interleave(k, dim=1)
    partners = logits[:, neighbors.reshape(-1)]
    total, _, _ = kernels.scan_loss(anchors, partners, entropy_weight)
    return total


def load_mined_space(cfg, ctx, space) -> None:
    """Fill the mined-space module with the pretext weights and the mine stage's pixel PCA."""
    if space.encoder is not None:
        build.load_state(space.encoder, ctx.run_dir / "pretext" / "model.pt", key="model")
    if space.pca_dims:
        pca = load_torch(ctx.run_dir / "mine" / "pca.pt")
        mean, std = ctx.normalization
        space.set_pca(pca["mean"], pca["basis"], mean, std)


def run(cfg, ctx, config_hash: str) -> dict:
    s = cfg.scan
    model = ctx.prepare_model(build.cluster_model(cfg, ctx, s.num_heads))
    if s.features == "mined":
        load_mined_space(cfg, ctx, model.backbone)
    elif s.init == "pretext":
        build.load_backbone_from(model.backbone, ctx.run_dir / "pretext" / "model.pt")
    neighbors = torch.from_numpy(np.load(ctx.run_dir / "mine" / "train_neighbors.npy"))

    train = {"full": _train_full, "head": _train_heads, "cached": _train_cached}[s.mode]
    history = train(cfg, ctx, model, neighbors, config_hash)

    model.eval()
    eval_logits = infer(ctx, model, ctx.eval_set.images, desc="scan select")
    eval_neighbors = torch.from_numpy(np.load(ctx.run_dir / "mine" / "eval_neighbors.npy"))
    losses = selection_losses(eval_logits, eval_neighbors, s.select_entropy_weight)
    best = int(torch.argmin(losses))
    ctx.log.info("scan: head selection losses %s -> head %d", [round(float(v), 4) for v in losses], best)
    out = ctx.stage_dir("scan") / "model.pt"
    if ctx.is_main:
        save_torch(out, {"model": model.state_dict(), "best_head": best, "selection_losses": losses.tolist()})
    metrics = {"best_head": best, "selection_losses": [float(v) for v in losses]}
    if history:
        metrics.update({f"final_{k}": v for k, v in history[-1].items()})
    return {"artifacts": {"model": str(out)}, "metrics": metrics}


def _optimizer(cfg, model):
    s = cfg.scan
    groups = [{"params": model.heads.parameters(), "lr": s.lr}]
    if s.mode == "full":
        groups.append({"params": model.backbone.parameters(), "lr": s.backbone_lr or s.lr})
    optimizer = make_optimizer(s.optimizer, groups, s.weight_decay, s.momentum)
    return optimizer, [g["lr"] for g in groups]


def _scan_step(logits_fn, engine, neighbors, entropy_weight, loss_backend):
    """One SCAN step; `logits_fn(anchors, partners)` returns the logits of both, anchors first."""

    def step(indices):
        partners = sample_neighbors(indices, neighbors)
        logits = logits_fn(indices, partners)
        # pbar is the mean over the global batch; every rank gets the global loss, hence scale = world size.
        loss, total, consistency, entropy = scan_objective(logits[:, : len(indices)], logits[:, len(indices):],
                                                           entropy_weight, process_group=engine.process_group,
                                                           backend=loss_backend)
        engine.backward(loss, scale=engine.world_size)
        engine.step()
        return {"loss": total.detach().mean(), "consistency": consistency.detach().mean(),
                "entropy": entropy.detach().mean()}

    return step


def _train_full(cfg, ctx, model, neighbors, config_hash):
    s = cfg.scan
    images = ctx.train_set.images
    view = ctx.transform(s.view)
    optimizer, lrs = _optimizer(cfg, model)
    schedule = Schedule(lrs, total_steps=s.epochs * steps_per_epoch(len(images), s.batch_size))
    model.train()
    engine = ctx.engine(model, optimizer)
    step = _scan_step(lambda anchors, partners: engine(torch.cat([view(images[anchors]), view(images[partners])])),
                      engine, neighbors, s.entropy_weight, s.loss_backend)
    return run_epochs(ctx, "scan", config_hash, {"engine": engine}, len(images),
                      s.batch_size, s.epochs, step, engine, schedule)


def _train_heads(cfg, ctx, model, neighbors, config_hash):
    model.eval()  # frozen backbone: BatchNorm keeps its running statistics, as in the paper's head-only mode
    features = infer(ctx, model.backbone, ctx.train_set.images, desc="scan features").to(ctx.device)
    return train_on_features(cfg, ctx, model, neighbors, config_hash,
                             lambda views, rows: features[rows.to(ctx.device)], len(features), views=0)


def _train_cached(cfg, ctx, model, neighbors, config_hash):
    s = cfg.scan
    model.eval()  # frozen backbone (BatchNorm with running statistics), as in mode=head
    cache = build_cache(ctx, model.backbone, ctx.train_set.images, s.cached_views, s.view,
                        ctx.stage_dir("scan") / "cache")
    return train_on_features(cfg, ctx, model, neighbors, config_hash, cache.get, cache.num_items,
                             views=s.cached_views)


def train_on_features(cfg, ctx, model, neighbors, config_hash, features_fn, num_items: int, views: int):
    """Train `model.heads` (only) on frozen features: `features_fn(views, rows)` returns the float32 features of
    image rows[j] in view views[j] on the device. Anchors and sampled neighbours each draw a view (`draw_views`,
    anchors first) after the neighbour draw; `views=0` draws nothing (every row view 0: mode=head)."""
    s = cfg.scan
    optimizer, lrs = _optimizer(cfg, model)
    schedule = Schedule(lrs, total_steps=s.epochs * steps_per_epoch(num_items, s.batch_size))
    engine = ctx.engine(model.heads, optimizer)  # only the heads train: only they are wrapped
    step = _scan_step(feature_logits(engine, features_fn, views), engine, neighbors, s.entropy_weight,
                      s.loss_backend)
    return run_epochs(ctx, "scan", config_hash, {"engine": engine}, num_items, s.batch_size, s.epochs, step, engine,
                      schedule)


def feature_logits(engine, features_fn, views: int):
    """`logits_fn(anchors, partners)` for `_scan_step` on stored features: a view per row (anchors' draws first),
    the rows' features gathered, the heads (wrapped by `engine`) applied to anchors and partners in one batch."""

    def logits(anchors, partners):
        chosen = torch.cat([draw_views(len(anchors), views), draw_views(len(partners), views)])
        return engine(features_fn(chosen, torch.cat([anchors, partners])))

    return logits
