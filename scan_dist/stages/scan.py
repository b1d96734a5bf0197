"""Stage 4, SCAN: cluster heads trained so an image and its mined neighbours agree, with an entropy term.

`scan.mode=full` trains backbone and heads on augmented views of the anchor and of a sampled neighbour (the
paper's CIFAR/STL recipe); the loader workers build both views. `scan.mode=head` trains only the heads on frozen,
un-augmented backbone features; `scan.mode=cached` also trains only the heads, on frozen features of fixed
augmented views (the paper's ImageNet recipe): the backbone runs once per image and view (`scan.cached_views`
views of kind `scan.view`, plus the un-augmented view 0) into a memory-mapped cache under `<run>/scan/cache/` (see
feature_cache.py; mode=head is that cache with no augmented view, in fp32), and every step gathers rows from it.
Each anchor and each sampled neighbour draws its own view uniformly from the augmented views 1..V (as the paper
augments both). Every choice (order, partner, view) is a counter-based function of (seed, "scan", epoch, anchor).

What is handed on is chosen without labels on the evaluation images (un-augmented): `scan.select=loss` takes the
head with the lowest SCAN loss over them and their own mined neighbours (the paper's rule), computed in chunks over
a memory-mapped logits file; `scan.select=consensus` takes the head that agrees most with the other heads;
`scan.select=ensemble` hands on the `scan.ensemble_size` most agreeing heads (`scan.ensemble_rank=loss`: those of
lowest loss; `tie`: the tie below, whatever its size), relabelled onto the first one's clusters and averaged (see
head_consensus.py); `scan.select=tie` takes, of the heads whose loss lies within `scan.tie_z` standard errors of the
lowest (the error of the mean per-image difference of two heads' consistency terms, `paired_standard_errors`), the
one that agrees most with the other heads (head_consensus.tie_break). Every rule's choice is logged and kept,
whichever is used. With `scan.candidate_heads` (mode=head|cached) more heads start than are kept, and the loss rule
screens them early (`screen_candidates`).
"""
from __future__ import annotations

import json

import numpy as np
import torch
from tqdm import tqdm

from .. import head_consensus, kernels
from ..data import sampling
from ..data.loaders import EpochRequests, Partners, ViewSpec, sample_partners
from ..distributed import comm
from ..distributed.checkpoint import load_checkpoint
from ..io_utils import load_torch, save_torch, write_json
from ..losses import scan_objective
from ..models import build
from ..models.heads import ClusterHeads
from ..trainer import IndexSource, Schedule, run_epochs, scaled_epochs
from .common import EVAL_LOGITS, epoch_diagnostics, image_logits, infer, make_optimizer, require_finite
from .feature_cache import ANCHOR_VIEW_DRAW, PARTNER_VIEW_DRAW, build_cache, draw_views


SCREEN_RECORD = "screen.json"  # scan.candidate_heads: the screen's losses and kept heads
SELECT_CHUNK_BYTES = 128 << 20  # partner logits read per chunk of the head selection


def selection_chunk(k: int, heads: int, classes: int, num: int) -> int:
    """Anchors per chunk of the head selection, so that one chunk's partner logits take ~SELECT_CHUNK_BYTES."""
    return int(min(num, max(1, SELECT_CHUNK_BYTES // max(1, k * heads * classes * 4))))


def _anchor_chunks(logits, neighbors, chunk: int | None):
    """(anchors [H, n, C], their neighbours' logits [H, n * k, C]) as float32 tensors, a chunk of anchors at a time,
    from `logits` [H, N, C] (a tensor or a memory-mapped array) and `neighbors` [N, k]."""
    if isinstance(logits, torch.Tensor):
        logits = logits.detach().cpu().float().numpy()
    heads, num, classes = logits.shape
    neighbors = np.asarray(neighbors)
    chunk = chunk or selection_chunk(neighbors.shape[1], heads, classes, num)
    for start in range(0, num, chunk):
        stop = min(start + chunk, num)
        anchors = torch.as_tensor(np.array(logits[:, start:stop], dtype=np.float32))
        flat = neighbors[start:stop].reshape(-1)
        order = np.argsort(flat, kind="stable")  # read the partner rows in file order, then put them back
        partners = torch.empty(heads, len(flat), classes)
        partners[:, torch.from_numpy(order)] = torch.as_tensor(np.array(logits[:, flat[order]], dtype=np.float32))
        yield anchors, partners


def selection_statistics(logits, neighbors, entropy_weight: float, chunk: int | None = None, moments: bool = True,
                         eps: float = 1e-8):
    """Per-head SCAN loss over every (image, neighbour) pair of the evaluation set (lower is better) and, with
    `moments`, the summary of the per-image consistency terms that `paired_standard_errors` needs, in one pass.

    `logits` [H, N, C] (tensor or a memory-mapped array) and `neighbors` [N, k] are read a chunk of anchors at a
    time: the consistency term sums over pairs, and the entropy's mean prediction over the anchors repeated k times
    is the mean over the anchors. Memory is O(chunk * k * H * C), not O(N * k * H * C); the moments add O(H^2).
    The per-image term is c_h(i) = -mean_j log <p_h(i), p_h(j)> over image i's mined neighbours j; the moments are
    (mean [H], second moments E_i[c_h(i) c_g(i)] [H, H], images N), or None without `moments`.
    """
    heads, num, _ = logits.shape
    k = np.shape(neighbors)[1]
    consistency_sum = torch.zeros(heads, dtype=torch.float64)
    prob_sum = torch.zeros(heads, logits.shape[2], dtype=torch.float64)
    total = torch.zeros(heads, dtype=torch.float64)
    second = torch.zeros(heads, heads, dtype=torch.float64)
    for anchors, partners in _anchor_chunks(logits, neighbors, chunk):
        _, consistency, _ = kernels.scan_loss(anchors.repeat_interleave(k, dim=1), partners, 0.0)
        consistency_sum += consistency.double() * partners.shape[1]
        p_anchors = torch.softmax(anchors, dim=-1)
        prob_sum += p_anchors.double().sum(dim=1)
        if moments:
            p_partners = torch.softmax(partners, dim=-1).view(heads, anchors.shape[1], k, -1)  # [H, n, k, C]
            dots = torch.matmul(p_partners, p_anchors.unsqueeze(-1)).squeeze(-1)  # [H, n, k]
            per_image = -torch.log(dots.clamp_min(eps)).double().mean(dim=2)  # [H, n]
            total += per_image.sum(dim=1)
            second += per_image @ per_image.T
    pbar = prob_sum / num
    entropy = -(pbar * torch.log(pbar.clamp_min(eps))).sum(dim=-1)
    losses = (consistency_sum / (num * k) - float(entropy_weight) * entropy).float()
    return losses, ((total / num).numpy(), (second / num).numpy(), num) if moments else None


def selection_losses(logits, neighbors, entropy_weight: float, chunk: int | None = None) -> torch.Tensor:
    """The per-head selection losses alone (`selection_statistics` without the moments): the loss rule's scores."""
    return selection_statistics(logits, neighbors, entropy_weight, chunk, moments=False)[0]


def consistency_moments(logits, neighbors, chunk: int | None = None) -> tuple[np.ndarray, np.ndarray, int]:
    """The per-image consistency terms' moments alone (`selection_statistics`'s second result)."""
    return selection_statistics(logits, neighbors, 0.0, chunk)[1]


def paired_standard_errors(moments: tuple[np.ndarray, np.ndarray, int], reference: int) -> np.ndarray:
    """[H] standard error of the mean per-image difference c_h - c_reference (0 for the reference itself): how far
    apart two heads' selection losses must lie before the evaluation images tell them apart. The entropy term is a
    property of the whole set, not a mean over images, so it adds no sampling error here."""
    mean, second, num = moments
    diff_mean = mean - mean[reference]
    variance = np.diag(second) - 2 * second[:, reference] + second[reference, reference] - diff_mean ** 2
    return np.sqrt(np.maximum(variance, 0.0) / num)


def load_mined_space(cfg, ctx, space) -> None:
    """Fill the mined-space module with the pretext weights and the mine stage's pixel PCA."""
    if space.encoder is not None:
        build.load_state(space.encoder, ctx.run_dir / "pretext" / "model.pt", key="model")
    if space.pca_dims:
        pca = load_torch(ctx.run_dir / "mine" / "pca.pt")
        mean, std = ctx.normalization
        space.set_pca(pca["mean"], pca["basis"], mean, std)


RANK_WORDS = {"agreement": "most agreeing", "loss": "lowest-loss", "tie": "tied"}  # scan.ensemble_rank, in the log


def run(cfg, ctx, config_hash: str) -> dict:
    s = cfg.scan
    model = ctx.prepare_model(build.cluster_model(cfg, ctx, s.num_heads))
    if s.features == "mined":
        load_mined_space(cfg, ctx, model.backbone)
    elif s.init == "pretext":
        build.load_backbone_from(model.backbone, ctx.run_dir / "pretext" / "model.pt")
    neighbors_path = ctx.run_dir / "mine" / "train_neighbors.npy"

    train = {"full": _train_full, "head": _train_heads, "cached": _train_cached}[s.mode]
    history = train(cfg, ctx, model, neighbors_path, config_hash)

    model.eval()
    eval_logits = infer(ctx, model, "eval", desc="scan select", out_path=ctx.stage_dir("scan") / EVAL_LOGITS)
    require_finite(np.load(ctx.stage_dir("scan") / EVAL_LOGITS, mmap_mode="r"), "scan: the heads' evaluation logits",
                   f"the SCAN training diverged: lower scan.lr={s.lr} and rerun")
    eval_neighbors = np.load(ctx.run_dir / "mine" / "eval_neighbors.npy", mmap_mode="r")
    losses, moments = selection_statistics(eval_logits, eval_neighbors, s.select_entropy_weight)
    loss_head = int(torch.argmin(losses))
    by_loss = s.ensemble_rank == "loss"
    assignments = head_consensus.hard_assignments(eval_logits)  # read once, for every rule below
    members, perms, agreement = head_consensus.ensemble(eval_logits, cfg.num_clusters, s.ensemble_size,
                                                        losses=losses.numpy() if by_loss else None,
                                                        assignments=assignments)
    consensus_head = int(np.argmax(agreement))  # the medoid: the head that agrees most with the others
    errors = paired_standard_errors(moments, loss_head)
    tie_head, tie = head_consensus.tie_break(losses.numpy(), errors, agreement, s.tie_z)
    if s.ensemble_rank == "tie":
        members, perms = head_consensus.tie_ensemble(assignments, cfg.num_clusters, tie, agreement)
    best = {"loss": loss_head, "consensus": consensus_head, "ensemble": members[0], "tie": tie_head}[s.select]
    handed_on = members if s.select == "ensemble" else [best]
    ctx.log.info("scan: head selection losses %s -> head %d; mean agreement with the other heads %s -> head %d "
                 "(ensemble of the %d %s: %s); tied with head %d within %g standard errors (%s): %s -> head %d; "
                 "scan.select=%s hands on %s",
                 [round(float(v), 4) for v in losses], loss_head, [round(float(v), 3) for v in agreement],
                 consensus_head, len(members), RANK_WORDS[s.ensemble_rank], members, loss_head, s.tie_z,
                 [round(float(v), 4) for v in errors], tie, tie_head, s.select, handed_on)
    out = ctx.stage_dir("scan") / "model.pt"
    if ctx.is_main:
        save_torch(out, {"model": model.state_dict(), "best_head": best, "selection_losses": losses.tolist(),
                         "loss_head": loss_head, "consensus_head": consensus_head, "tie_head": tie_head,
                         "select": s.select,
                         "ensemble": members, "ensemble_perms": perms.tolist()})
    metrics = {"best_head": best, "select": s.select, "loss_head": loss_head, "consensus_head": consensus_head,
               "tie_head": tie_head, "tie": tie, "ensemble": members, "selection_losses": [float(v) for v in losses],
               "selection_standard_errors": [float(v) for v in errors],
               "head_agreement": [float(v) for v in agreement]}
    if history:
        metrics.update({f"final_{k}": v for k, v in history[-1].items()})
    if s.candidate_heads:
        metrics["screen"] = json.loads((ctx.stage_dir("scan") / SCREEN_RECORD).read_text())
    return {"artifacts": {"model": str(out), "eval_logits": str(ctx.stage_dir("scan") / EVAL_LOGITS)},
            "metrics": metrics}


def _optimizer(cfg, model):
    s = cfg.scan
    groups = [{"params": model.heads.parameters(), "lr": s.lr}]
    if s.mode == "full":
        groups.append({"params": model.backbone.parameters(), "lr": s.backbone_lr or s.lr})
    optimizer = make_optimizer(s.optimizer, groups, s.weight_decay, s.momentum)
    return optimizer, [g["lr"] for g in groups]


def _scan_step(logits_fn, engine, entropy_weight, loss_backend):
    """One SCAN step; `logits_fn(batch)` returns the logits of anchors and partners, anchors first."""

    def step(batch):
        logits = logits_fn(batch)
        half = logits.shape[1] // 2
        # pbar is the mean over the global batch: every rank holds the global loss, built with the sum-backward
        # all-reduce, so DDP's gradient average already yields its gradient (kernels/_collectives.py: scale 1).
        loss, total, consistency, entropy = scan_objective(logits[:, :half], logits[:, half:],
                                                           entropy_weight, process_group=engine.process_group,
                                                           backend=loss_backend)
        engine.backward(loss)
        engine.step()
        return {"loss": total.detach().mean(), "consistency": consistency.detach().mean(),
                "entropy": entropy.detach().mean()}

    return step


def _train_full(cfg, ctx, model, neighbors_path, config_hash):
    s = cfg.scan
    specs = [ViewSpec(s.view, "scan", 0), ViewSpec(s.view, "scan", 1, rows="partner")]
    source = ctx.batches("train", specs, s.batch_size, "scan", partners=Partners(str(neighbors_path), "scan"))
    optimizer, lrs = _optimizer(cfg, model)
    epochs = scaled_epochs(s.epochs, s.min_steps, source.sampler.steps)
    schedule = Schedule(lrs, total_steps=epochs * source.sampler.steps)
    model.train()
    engine = ctx.engine(model, optimizer)
    step = _scan_step(lambda batch: engine(torch.cat(batch["views"])), engine, s.entropy_weight, s.loss_backend)
    return run_epochs(ctx, "scan", config_hash, {"engine": engine}, source, epochs, step, engine, schedule,
                      epoch_end=epoch_diagnostics(ctx, model, image_logits(ctx, model), neighbors_path))


def _train_heads(cfg, ctx, model, neighbors_path, config_hash):
    model.eval()  # frozen backbone: BatchNorm keeps its running statistics, as in the paper's head-only mode
    cache = build_cache(ctx, model.backbone, 0, "eval", ctx.stage_dir("scan") / "cache", dtype="float32")
    return train_on_features(cfg, ctx, model, neighbors_path, config_hash, cache.get, cache.num_items, views=0)


def _train_cached(cfg, ctx, model, neighbors_path, config_hash):
    s = cfg.scan
    model.eval()  # frozen backbone (BatchNorm with running statistics), as in mode=head
    cache = build_cache(ctx, model.backbone, s.cached_views, s.view, ctx.stage_dir("scan") / "cache")
    return train_on_features(cfg, ctx, model, neighbors_path, config_hash, cache.get, cache.num_items,
                             views=s.cached_views)


def train_on_features(cfg, ctx, model, neighbors_path, config_hash, features_fn, num_items: int, views: int):
    """Train `model.heads` (only) on frozen features: `features_fn(views, rows)` returns the float32 features of
    image rows[j] in view views[j] on the device."""
    s = cfg.scan
    sampler = EpochRequests(num_items, s.batch_size, cfg.run.seed, "scan", comm.rank(), comm.world_size())
    epochs = scaled_epochs(s.epochs, s.min_steps, sampler.steps)
    logits_for = feature_logits_for(features_fn, np.load(neighbors_path, mmap_mode="r"), cfg.run.seed, views)
    if s.candidate_heads:
        epochs -= screen_candidates(cfg, ctx, model, config_hash, IndexSource(sampler), epochs, logits_for)
    optimizer, lrs = _optimizer(cfg, model)
    schedule = Schedule(lrs, total_steps=epochs * sampler.steps)
    engine = ctx.engine(model.heads, optimizer)  # only the heads train: only they are wrapped
    step = _scan_step(logits_for(engine), engine, s.entropy_weight, s.loss_backend)
    zeros = lambda rows: torch.zeros(len(rows), dtype=torch.long)  # noqa: E731  (view 0: the plain image)
    return run_epochs(ctx, "scan", config_hash, {"engine": engine}, IndexSource(sampler), epochs, step, engine,
                      schedule, epoch_end=epoch_diagnostics(
                          ctx, model.heads, lambda rows: model.heads(features_fn(zeros(rows), torch.from_numpy(rows))),
                          neighbors_path))


def screen_candidates(cfg, ctx, model, config_hash: str, source, epochs: int, logits_for) -> int:
    """`scan.candidate_heads` heads (the model's own heads first, then new ones) train the first
    max(1, round(scan.screen_fraction * epochs)) epochs; the `scan.num_heads` with the lowest SCAN loss on the
    evaluation images (`selection_losses`, the select=loss rule: no label) are copied into `model.heads`, which then
    train the remaining epochs. Returns the epochs spent. Within a population of heads that loss ranks accuracy well
    (Spearman -0.86 over the demo's ten runs) and few heads land in a good clustering, so more starts reach lower
    losses; on the demo that did not raise the accuracy of the head kept (README, "Measured results"): off there.

    Heads train independently (the loss is a sum over heads, the optimiser's state is per parameter), so the
    candidates train in groups of `scan.num_heads`, one after another over the same batches: the screen's peak
    memory is the main loop's, whatever `scan.candidate_heads` is. On the demo (2 cores) the groups kept the same
    heads as all 90 at once (losses within 1e-6) in the same time (74 s against 72 s for the whole screen).

    The screen is not checkpointed: it reruns after a kill before its result is saved (`screen.json`, with the
    same draws, so the same heads). Once the main loop has a checkpoint, that holds the kept heads and the screen
    is skipped."""
    s, stage_dir = cfg.scan, ctx.stage_dir("scan")
    spent = max(1, min(epochs - 1, round(s.screen_fraction * epochs)))
    record_path = stage_dir / SCREEN_RECORD
    if load_checkpoint(stage_dir / "checkpoint.pt", config_hash) is not None and record_path.is_file():
        ctx.log.info("scan: candidate screen done before (%s); resuming the kept heads", record_path)
        return spent
    own = model.heads
    pool = ClusterHeads(own.weights[0].shape[1], own.num_clusters, s.candidate_heads, own.hidden)
    pool = pool.to(own.weights[0].device)
    pool.copy_heads_from(own, range(own.num_heads))
    eval_neighbors = np.load(ctx.run_dir / "mine" / "eval_neighbors.npy", mmap_mode="r")
    groups = [list(range(start, min(start + own.num_heads, s.candidate_heads)))
              for start in range(0, s.candidate_heads, own.num_heads)]
    losses = torch.cat([_screen_group(cfg, ctx, model, pool, group, spent, source, logits_for, eval_neighbors)
                        for group in groups])
    kept = sorted(int(h) for h in torch.argsort(losses)[:own.num_heads])
    own.copy_heads_from(pool, kept)
    if ctx.is_main:
        write_json(record_path, {"candidates": s.candidate_heads, "epochs": spent,
                                 "steps": spent * source.sampler.steps, "kept": kept,
                                 "losses": [round(float(v), 6) for v in losses]})
    ctx.log.info("scan: screened %d candidate heads after %d epoch(s) (%d steps); kept the %d of lowest SCAN loss "
                 "on the evaluation images: %s", s.candidate_heads, spent, spent * source.sampler.steps,
                 own.num_heads, kept)
    return spent


def _screen_group(cfg, ctx, model, pool, group: list[int], epochs: int, source, logits_for, eval_neighbors):
    """Train heads `group` of `pool` for `epochs` epochs (written back into `pool`); their selection losses."""
    s, stage_dir = cfg.scan, ctx.stage_dir("scan")
    heads = ClusterHeads(pool.weights[0].shape[1], pool.num_clusters, len(group), pool.hidden)
    heads = heads.to(pool.weights[0].device)
    heads.copy_heads_from(pool, group)
    optimizer = make_optimizer(s.optimizer, [{"params": heads.parameters(), "lr": s.lr}], s.weight_decay, s.momentum)
    engine = ctx.engine(heads, optimizer)
    step = _scan_step(logits_for(engine), engine, s.entropy_weight, s.loss_backend)
    label = f"scan screen heads {group[0]}-{group[-1]}"
    for epoch in range(epochs):
        for batch in tqdm(source.epoch(epoch), total=source.sampler.steps, desc=f"{label} epoch {epoch + 1}/{epochs}",
                          unit="step", leave=False, dynamic_ncols=True,
                          disable=not (ctx.cfg.run.progress and comm.is_main())):
            step(batch)
    heads.eval()
    pool.copy_heads_from(heads, range(len(group)), at=group)
    logits_path = stage_dir / "screen_logits.npy"
    logits = infer(ctx, lambda images: heads(model.backbone(images)), "eval", desc=label, out_path=logits_path)
    require_finite(logits, "scan: the candidate heads' evaluation logits",
                   f"the SCAN training diverged: lower scan.lr={s.lr} and rerun")
    losses = selection_losses(logits, eval_neighbors, s.select_entropy_weight)
    del logits
    comm.barrier()  # every rank has read the logits before rank 0 removes them
    if ctx.is_main:
        logits_path.unlink(missing_ok=True)
    return losses


def feature_logits_for(features_fn, neighbors, seed: int, views: int):
    """`engine -> logits_fn` for heads on stored features (the main loop and each screened group wrap their own)."""
    return lambda engine: feature_logits(engine, features_fn, neighbors, seed, views)


def feature_logits(engine, features_fn, neighbors, seed: int, views: int):
    """`logits_fn(batch)` for `_scan_step` on stored features: a partner per anchor and a view per row (all
    counter-based draws of (seed, "scan", epoch, anchor)), the rows' features gathered, the heads (wrapped by
    `engine`) applied to anchors and partners in one batch."""

    def logits(batch):
        anchors = batch["index"].numpy()
        key = sampling.stream_key(seed, "scan", batch["epoch"])
        partners = sample_partners(neighbors, key, anchors)
        chosen = torch.cat([draw_views(key, anchors, ANCHOR_VIEW_DRAW, views),
                            draw_views(key, anchors, PARTNER_VIEW_DRAW, views)])
        rows = torch.from_numpy(np.concatenate([anchors, partners]))
        return engine(features_fn(chosen, rows))

    return logits
