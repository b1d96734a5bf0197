"""Stage 5, self-labelling: confident predictions (max prob > threshold) on a weak view become pseudo-labels;
the network is trained on a strongly augmented view of the same images with (class-balanced) cross-entropy.

Starts from the SCAN model with only its selected head. With `selflabel.ema_decay > 0` the pseudo-labels come from
an exponential-moving-average teacher (a separate copy, used for the final model too) instead of the student.
"""
from __future__ import annotations

import copy

import torch

from ..data import sampling
from ..data.loaders import EpochRequests, ViewSpec
from ..distributed import comm
from ..io_utils import save_torch
from ..losses import confident_targets, self_label_loss
from ..trainer import IndexSource, Schedule, run_epochs, scaled_epochs
from .common import epoch_diagnostics, image_logits, load_scan_model, make_optimizer
from .feature_cache import ANCHOR_VIEW_DRAW, build_cache, draw_views


@torch.no_grad()
def ema_update(teacher: torch.nn.Module, student: torch.nn.Module, decay: float) -> None:
    for t, s in zip(teacher.parameters(), student.parameters()):
        t.lerp_(s, 1.0 - decay)
    for t, s in zip(teacher.buffers(), student.buffers()):
        t.copy_(s)


def mirror_averaged(model: torch.nn.Module):
    """`fn(images) -> [1, B, C]`: log of the model's softmax averaged over the images and their mirror images
    (width flipped), as logits: a pseudo-label then has to hold for both."""

    def fn(images):
        probs = model(images)[0].float().softmax(-1) + model(torch.flip(images, dims=[-1]))[0].float().softmax(-1)
        return (0.5 * probs).log().unsqueeze(0)

    return fn


def self_label_step(engine, weak_input, strong_input, teacher_fn, threshold: float, class_balance: bool, ema=None):
    """One self-labelling step over `engine` (the stage's, and bench_train_step's): `step(batch) -> logged values`.

    `weak_input(batch)` / `strong_input(batch)` give the two views of the batch's rows; `teacher_fn`, when given,
    labels the weak view (else the student does, in the same forward as the strong view); `ema = (teacher, student,
    decay)` updates that teacher after each optimiser step.
    """

    def step(batch):
        count = len(batch["index"])
        if teacher_fn is not None:
            with torch.no_grad(), engine.autocast():  # the teacher runs at the student's precision
                weak_logits = teacher_fn(weak_input(batch))[0].float()
            strong_logits = engine(strong_input(batch))[0]
        else:
            # One forward for both views so BatchNorm sees them together (as the paper, in train mode).
            logits = engine(torch.cat([weak_input(batch), strong_input(batch)]))[0]
            weak_logits, strong_logits = logits[:count].detach(), logits[count:]
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
    if sl.mode == "cached":
        # Head only, on a frozen backbone: weak = the cached plain image (view 0), strong = one of the cached
        # selflabel.view views, drawn per row from the counter-based stream of (seed, "selflabel", epoch, row).
        model.eval()
        cache = build_cache(ctx, model.backbone, sl.cached_views, sl.view, ctx.stage_dir("selflabel") / "cache")
        trained = model.heads
        source = IndexSource(EpochRequests(cache.num_items, sl.batch_size, cfg.run.seed, "selflabel", comm.rank(),
                                           comm.world_size()))

        def weak_input(batch):
            return cache.get(torch.zeros(len(batch["index"]), dtype=torch.long), batch["index"])

        def strong_input(batch):
            key = sampling.stream_key(cfg.run.seed, "selflabel", batch["epoch"])
            return cache.get(draw_views(key, batch["index"].numpy(), ANCHOR_VIEW_DRAW, sl.cached_views),
                             batch["index"])

        teacher_fn = teacher.heads if teacher is not None else None
    else:
        source = ctx.batches("train", [ViewSpec("eval"), ViewSpec(sl.view, "selflabel", 0)], sl.batch_size,
                             "selflabel")
        trained = model
        model.train()

        def weak_input(batch):
            return batch["views"][0]

        def strong_input(batch):
            return batch["views"][1]

        teacher_fn = mirror_averaged(teacher) if sl.teacher_flip else teacher  # validate(): teacher_flip needs the EMA teacher
    optimizer = make_optimizer(sl.optimizer, [{"params": trained.parameters(), "lr": sl.lr}], sl.weight_decay,
                               sl.momentum)
    epochs = scaled_epochs(sl.epochs, sl.min_steps, source.sampler.steps)
    schedule = Schedule([sl.lr], total_steps=epochs * source.sampler.steps)
    engine = ctx.engine(trained, optimizer)

    ema = (teacher, model, sl.ema_decay) if teacher is not None else None
    step = self_label_step(engine, weak_input, strong_input, teacher_fn, sl.threshold, sl.class_balance, ema)

    stateful = {"engine": engine}
    if teacher is not None:
        stateful["teacher"] = teacher
    if sl.mode == "cached":
        def logits_fn(rows):
            return model.heads(cache.get(torch.zeros(len(rows), dtype=torch.long), torch.from_numpy(rows)))
    else:
        logits_fn = image_logits(ctx, model)
    history = run_epochs(ctx, "selflabel", config_hash, stateful, source, epochs, step, engine, schedule,
                         epoch_end=epoch_diagnostics(ctx, trained, logits_fn, ctx.run_dir / "mine" / "train_neighbors.npy"))
    final = teacher if teacher is not None else model
    out = ctx.stage_dir("selflabel") / "model.pt"
    if ctx.is_main:
        save_torch(out, {"model": final.state_dict()})
    metrics = {f"final_{k}": v for k, v in history[-1].items()} if history else {}
    return {"artifacts": {"model": str(out)}, "metrics": metrics}
