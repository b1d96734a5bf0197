"""Pieces several stages share: optimiser construction and batched inference over an image set."""
from __future__ import annotations

import torch
from tqdm import tqdm

from ..dist import comm


def make_optimizer(name: str, groups: list[dict], weight_decay: float, momentum: float) -> torch.optim.Optimizer:
    if name == "sgd":
        return torch.optim.SGD(groups, momentum=momentum, weight_decay=weight_decay)
    return torch.optim.Adam(groups, weight_decay=weight_decay)


@torch.no_grad()
def infer(ctx, fn, images: torch.Tensor, desc: str, transform_kind: str = "eval") -> torch.Tensor:
    """Apply `fn` to normalised batches of `images` (no augmentation) and concatenate the outputs on the CPU.

    fn returns [B, ...] or [H, B, ...] (heads first); both come back in the same layout with all images, row i
    being image i. With N processes each rank infers its contiguous shard and the shards are all-gathered in rank
    order, so every rank gets the whole result.
    """
    view = ctx.transform(transform_kind)
    batch_size = ctx.cfg.run.eval_batch_size
    first, stop = comm.shard_range(len(images))
    starts = range(first, stop, batch_size) if stop > first else [first]  # an empty shard still yields a shape
    outputs = []
    for start in tqdm(starts, desc=desc, unit="batch", leave=False,
                      disable=not (ctx.cfg.run.progress and comm.is_main()), dynamic_ncols=True):
        outputs.append(fn(view(images[start:min(start + batch_size, stop)])).float().cpu())
    heads_first = outputs[0].dim() == 3
    return comm.gather_rows(torch.cat(outputs, dim=1 if heads_first else 0), dim=1 if heads_first else 0)
