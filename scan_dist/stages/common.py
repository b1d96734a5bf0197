"""Pieces several stages share: optimiser construction, batched inference over a split, the SCAN model with its
selected head, and the end-of-epoch head diagnostics (stages import this module, never each other)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from .. import diagnostics
from ..data.loaders import ViewSpec
from ..distributed import comm
from ..distributed.shared_rows import SharedRows
from ..errors import TrainingError
from ..io_utils import load_torch
from ..models import build


def make_optimizer(name: str, groups: list[dict], weight_decay: float, momentum: float) -> torch.optim.Optimizer:
    if name == "sgd":
        return torch.optim.SGD(groups, momentum=momentum, weight_decay=weight_decay)
    return torch.optim.Adam(groups, weight_decay=weight_decay)


@torch.no_grad()
def infer(ctx, fn, split: str, desc: str, out_path, spec: ViewSpec | None = None, dtype=np.float32,
          stage: str | None = None) -> np.ndarray:
    """Apply `fn` to every image of `split` (in view `spec`, default the un-augmented eval view) and return the
    outputs as a read-only memory map of `out_path` (a .npy written atomically): row i is image i.

    fn returns [B, ...] or [H, B, ...] (heads first); heads-first outputs are stored rows-first ([N, H, ...]) and
    returned as the [H, N, ...] view. With N processes each rank infers its contiguous shard and writes its rows
    into the shared file; nothing is gathered into memory (at ImageNet scale the outputs are GBs). Unreadable
    images met (data.on_bad_image=skip) are reported for `stage` (default: the first word of `desc`).
    """
    reader = ctx.reader(split)
    source = ctx.inference_batches(split, [spec] if spec else None)
    sample = fn(source.build_now(np.array([0]))["views"][0])  # the output shape, before any file exists
    heads_first = sample.dim() == 3
    row_shape = (sample.shape[0], *sample.shape[2:]) if heads_first else tuple(sample.shape[1:])
    out = SharedRows(Path(out_path), len(reader), row_shape, dtype)
    try:
        for batch in tqdm(source, desc=desc, unit="batch", leave=False, total=len(source),
                          disable=not (ctx.cfg.run.progress and comm.is_main()), dynamic_ncols=True):
            values = fn(batch["views"][0]).float()
            if heads_first:
                values = values.transpose(0, 1)
            out.write(int(batch["index"][0]), values.cpu().numpy())
    except BaseException:
        out.abort()
        raise
    finally:
        source.close()
    result = out.close()
    ctx.report_skips(stage or desc.split()[0], split, source.bad)
    return np.swapaxes(result, 0, 1) if heads_first else result


def load_rows(array: np.ndarray, rows=None) -> torch.Tensor:
    """A writable float32 tensor copy of (rows of) a memory-mapped array."""
    part = array if rows is None else array[rows]
    return torch.from_numpy(np.array(part, dtype=np.float32))


def require_finite(array, what: str, advice: str, chunk: int = 65536) -> None:
    """Raise TrainingError (one line: what, where, advice) when a (memory-mapped) array holds a NaN or inf."""
    for start in range(0, len(array), chunk):
        block = np.asarray(array[start:start + chunk])
        if not np.isfinite(block).all():
            row = start + int(np.flatnonzero(~np.isfinite(block.reshape(len(block), -1)).all(axis=1))[0])
            raise TrainingError(f"{what} are not finite (first at row {row}); {advice}")


EVAL_LOGITS = "eval_logits.npy"  # [N_eval, H, C] float32: every head on the un-augmented evaluation images


def load_scan_model(cfg, ctx):
    """The SCAN model reduced to what its selection rule hands on: one head, or (scan.select=ensemble) the aligned
    members averaged into one output."""
    saved = load_torch(ctx.run_dir / "scan" / "model.pt")
    full = build.cluster_model(cfg, ctx, cfg.scan.num_heads)
    full.load_state_dict(saved["model"])
    if saved.get("select") == "ensemble":
        full.heads = full.heads.keep_heads(saved["ensemble"], saved["ensemble_perms"])
    else:
        full.heads = full.heads.keep_head(saved["best_head"])
    return full


def image_logits(ctx, model):
    """`logits_fn(rows) -> [H, n, C]` of a whole model on the un-augmented training images `rows`, built in this
    process in batches of run.eval_batch_size (the diagnostics ask for 1,024 rows and their neighbours: in one batch
    that is 20k images, ~8 GB of activations at 224 px even for the smoke model)."""
    source = ctx.inference_batches("train")
    step = ctx.eval_batch_size

    @torch.no_grad()
    def logits(rows):
        rows = np.asarray(rows)
        return torch.cat([model(source.build_now(rows[i:i + step])["views"][0])
                          for i in range(0, len(rows), step)], dim=1)

    return logits


def epoch_diagnostics(ctx, model, logits_fn, neighbors_path):
    """The stage's `epoch_end`: label-free head diagnostics on a fixed sample of training rows (diagnostics.py)."""
    rows = diagnostics.sample_rows(len(ctx.train_set))
    targets = ctx.train_set.targets if ctx.cfg.run.monitor_labels else None

    def run():
        neighbors = np.load(neighbors_path, mmap_mode="r") if neighbors_path is not None else None
        return diagnostics.head_diagnostics(logits_fn, rows, neighbors, targets, model)

    return run
