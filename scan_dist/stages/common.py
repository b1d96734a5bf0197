"""Pieces several stages share: optimiser construction and batched inference over an image set."""
from __future__ import annotations

import torch
from tqdm import tqdm


def make_optimizer(name: str, groups: list[dict], weight_decay: float, momentum: float) -> torch.optim.Optimizer:
    if name == "sgd":
        return torch.optim.SGD(groups, momentum=momentum, weight_decay=weight_decay)
    return torch.optim.Adam(groups, weight_decay=weight_decay)


@torch.no_grad()
def infer(ctx, fn, images: torch.Tensor, desc: str, transform_kind: str = "eval") -> torch.Tensor:
    """Apply `fn` to normalised batches of `images` (no augmentation) and concatenate the outputs on the CPU.

    Outputs are concatenated along the last-but-`batch_dim` axis: fn returns [B, ...] or [H, B, ...] (heads first);
    both come back in the same layout with all images.
    """
    view = ctx.transform(transform_kind)
    batch_size = ctx.cfg.run.eval_batch_size
    outputs = []
    for start in tqdm(range(0, len(images), batch_size), desc=desc, unit="batch", leave=False,
                      disable=not ctx.cfg.run.progress, dynamic_ncols=True):
        outputs.append(fn(view(images[start:start + batch_size])).float().cpu())
    heads_first = outputs[0].dim() == 3
    return torch.cat(outputs, dim=1 if heads_first else 0)
