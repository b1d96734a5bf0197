"""The one differentiable cross-rank sum of the project, and its backward rule.

`all_reduce_sum(x, group)`: forward, the SUM all-reduce of x over the group; backward, the SUM all-reduce of the
incoming gradients -- the exact adjoint of a sum (every rank's input feeds every rank's output). Consequence, the
rule every caller follows: a loss built from global sums is the *global* loss on every rank, and back-propagating
it on W ranks gives each rank W x d(global loss)/d(its rows); DDP's gradient *average* over ranks divides that W
out, so such a loss is back-propagated with `engine.backward(loss)` (scale 1). A loss that is only a rank's *share*
of the global loss (the shares sum to it) is back-propagated with `scale=world_size`.

It lives in kernels/ (not in scan_dist.distributed) because scan_loss needs it and the kernels must import without
the rest of the package (a bare GPU box runs them alone); the distributed engine imports it from here.
"""
from __future__ import annotations

import torch
from torch import Tensor


class _AllReduceSum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tensor: Tensor, group) -> Tensor:  # type: ignore[override]
        import torch.distributed as dist

        ctx.group = group
        out = tensor.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        import torch.distributed as dist

        grad = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        return grad, None


def all_reduce_sum(tensor: Tensor, group) -> Tensor:
    """Differentiable sum over the ranks of `group` (backward: the sum of the ranks' gradients)."""
    return _AllReduceSum.apply(tensor, group)
