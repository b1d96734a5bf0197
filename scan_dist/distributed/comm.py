"""Collectives the stages use outside the training step: who am I, shard a range, gather rows, barrier.

Every function works unchanged in a single process (no process group: rank 0 of 1), so a stage is written once.
Tensors cross the process group on the device its backend needs (CPU for gloo, CUDA for NCCL) and come back on
the device they were given on.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if active():
        dist.barrier()


def group():
    """The default process group, or None in a single process (what scan_loss/knn_sharded take)."""
    return dist.group.WORLD if active() else None


def shard_range(num_items: int, of_rank: int | None = None, world: int | None = None) -> tuple[int, int]:
    """This rank's contiguous slice [start, stop) of `num_items`, sizes differing by at most one."""
    of_rank = rank() if of_rank is None else of_rank
    world = world_size() if world is None else world
    base, extra = divmod(num_items, world)
    start = of_rank * base + min(of_rank, extra)
    return start, start + base + (1 if of_rank < extra else 0)


def _comm_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def gather_rows(local: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """Concatenate every rank's `local` along `dim` in rank order (sizes along `dim` may differ), on every rank."""
    if not active():
        return local
    device = _comm_device()
    size = torch.tensor([local.shape[dim]], dtype=torch.int64, device=device)
    sizes = [torch.zeros_like(size) for _ in range(world_size())]
    dist.all_gather(sizes, size)
    sizes = [int(s) for s in sizes]
    longest = max(sizes)
    padded = local.to(device)
    if local.shape[dim] < longest:
        pad_shape = list(local.shape)
        pad_shape[dim] = longest - local.shape[dim]
        padded = torch.cat([padded, padded.new_zeros(pad_shape)], dim=dim)
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded.contiguous())
    return torch.cat([p.narrow(dim, 0, n) for p, n in zip(parts, sizes)], dim=dim).to(local.device)


def mean_over_ranks(values: dict[str, float | torch.Tensor]) -> dict[str, float]:
    """Average each scalar (a float or a 0-d tensor on any device) over ranks: one collective, one host sync.

    Returns Python floats, identical on every rank; in a single process, the values themselves.
    """
    if not values:
        return {}
    keys = sorted(values)
    device = _comm_device() if active() else next(
        (v.device for v in values.values() if isinstance(v, torch.Tensor)), torch.device("cpu"))
    packed = torch.stack([torch.as_tensor(values[k], dtype=torch.float64).to(device).reshape(()) for k in keys])
    if active():
        dist.all_reduce(packed)
        packed /= world_size()
    return dict(zip(keys, packed.tolist()))


def broadcast_object(obj: Any) -> Any:
    """Rank 0's `obj` on every rank."""
    if not active():
        return obj
    holder = [obj]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


def all_gather_object(obj: Any) -> list:
    """Every rank's `obj`, in rank order, on every rank (small objects: counts, short lists)."""
    if not active():
        return [obj]
    out = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out
