"""Stage 5, self-labelling: confident predictions (max prob > threshold) on a weak view become pseudo-labels;
the network is trained on a strongly augmented view of the same images with (class-balanced) cross-entropy.

Starts from the SCAN model with only its selected head. With `selflabel.ema_decay > 0` the pseudo-labels come from
an exponential-moving-average teacher (a separate copy, used for the final model too) instead of the student.
"""
from __future__ import annotations

import copy

import torch

from ..io_utils import load_torch, save_torch
from ..losses import confident_targets, self_label_loss
from ..models import build
from ..trainer import Schedule, run_epochs, steps_per_epoch
from .common import make_optimizer
from .feature_cache import build_cache
from .scan import draw_views


def load_scan_model(cfg, ctx):
    """The SCAN model reduced to its selected head."""
    saved = load_torch(ctx.run_dir / "scan" / "model.pt")
    full = build.cluster_model(cfg, ctx, cfg.scan.num_heads)
    full.load_state_dict(saved["model"])
    full.heads = full.heads.keep_head(saved["best_head"])
    return full


@torch.no_grad()
def ema_update(teacher: torch.nn.Module, student: torch.nn.Module, decay: float) -> None:
    for t, s in zip(teacher.parameters(), student.parameters()):
        t.lerp_(s, 1.0 - decay)
    for t, s in zip(teacher.buffers(), student.buffers()):
        t.copy_(s)


def self_label_step(engine, weak_input, strong_input, teacher_fn, threshold: float, class_balance: bool, ema=None):
    """One self-labelling step over `engine` (the stage's, and bench_train_step's): `step(indices) -> logged values`.

    `weak_input(indices)` / `strong_input(indices)` give the two views of the rows; `teacher_fn`, when given, labels
    the weak view (else the student does, in the same forward as the strong view); `ema = (teacher, student, decay)`
    updates that teacher after each optimiser step.
    """

    def step(indices):
        if teacher_fn is not None:
            with torch.no_grad(), engine.autocast():  # the teacher runs at the student's precision
                weak_logits = teacher_fn(weak_input(indices))[0].float()
            strong_logits = engine(strong_input(indices))[0]
        else:
            # One forward for both views so BatchNorm sees them together (as the paper, in train mode).
            logits = engine(torch.cat([weak_input(indices), strong_input(indices)]))[0]
            weak_logits, strong_logits = logits[: len(indices)].detach(), logits[len(indices):]
        mask, labels = confident_targets(weak_logits, threshold)
        # Counts per pseudo-class are global; each rank returns its share of the loss, hence scale = world size.
        loss = self_label_loss(strong_logits, labels, mask, class_balance, process_group=engine.process_group)
        if loss is None:  # no confident sample in the global batch: every rank skips together
            engine.zero_grad()
            return {"confident": 0.0}
        engine.backward(loss, scale=engine.world_size)
        engine.step()
        if ema is not None:
            ema_update(*ema)
        return {"loss": loss.detach() * engine.world_size, "confident": mask.float().mean()}

    return step


def run(cfg, ctx, config_hash: str) -> dict:
    sl = cfg.selflabel
    model = ctx.prepare_model(load_scan_model(cfg, ctx))
    teacher = copy.deepcopy(model).eval() if sl.ema_decay > 0 else None
    images = ctx.train_set.images
    if sl.mode == "cached":
        # Head only, on a frozen backbone: weak = the cached plain image (view 0), strong = one of the cached
        # selflabel.view views, drawn per row with batch_rng (N processes draw what one does).
        model.eval()
        cache = build_cache(ctx, model.backbone, images, sl.cached_views, sl.view,
                            ctx.stage_dir("selflabel") / "cache")
        trained = model.heads

        def weak_input(indices):
            return cache.get(torch.zeros(len(indices), dtype=torch.long), indices)

        def strong_input(indices):
            return cache.get(draw_views(len(indices), sl.cached_views), indices)

        teacher_fn = teacher.heads if teacher is not None else None
    else:
        weak, strong = ctx.transform("eval"), ctx.transform(sl.view)
        trained = model
        model.train()

        def weak_input(indices):
            return weak(images[indices])

        def strong_input(indices):
            return strong(images[indices])

        teacher_fn = teacher
    optimizer = make_optimizer(sl.optimizer, [{"params": trained.parameters(), "lr": sl.lr}], sl.weight_decay,
                               sl.momentum)
    schedule = Schedule([sl.lr], total_steps=sl.epochs * steps_per_epoch(len(images), sl.batch_size))
    engine = ctx.engine(trained, optimizer)

    ema = (teacher, model, sl.ema_decay) if teacher is not None else None
    step = self_label_step(engine, weak_input, strong_input, teacher_fn, sl.threshold, sl.class_balance, ema)

    stateful = {"engine": engine}
    if teacher is not None:
        stateful["teacher"] = teacher
    history = run_epochs(ctx, "selflabel", config_hash, stateful, len(images), sl.batch_size, sl.epochs, step,
                         engine, schedule)
    final = teacher if teacher is not None else model
    out = ctx.stage_dir("selflabel") / "model.pt"
    if ctx.is_main:
        save_torch(out, {"model": final.state_dict()})
    metrics = {f"final_{k}": v for k, v in history[-1].items()} if history else {}
    return {"artifacts": {"model": str(out)}, "metrics": metrics}
