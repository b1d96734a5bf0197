"""Per-sample random draws that do not depend on how a global batch is split over processes.

Inside ``with global_batch(size, offset):`` every draw is made for the whole global batch of ``size`` samples and
rows ``[offset, offset + b)`` are kept.  Ranks share one RNG state (they are seeded alike and draw alike), so each
rank's slice gets exactly the random numbers one process gives those rows: N processes see the same augmented views
and sampled neighbours as one.  Drawing ``size`` numbers instead of ``b`` costs nothing next to the image ops.
Outside the context the draws are plain ``torch.rand`` / ``torch.randint`` of the local batch.
"""
from __future__ import annotations

import contextlib
import contextvars

import torch
from torch import Tensor

__all__ = ["global_batch", "rand", "randint"]

# (global batch size, this process's row offset), or None for a plain local batch.
_GLOBAL_BATCH: contextvars.ContextVar[tuple[int, int] | None] = contextvars.ContextVar("global_batch", default=None)


@contextlib.contextmanager
def global_batch(size: int, offset: int):
    """Make per-sample draws for a global batch of ``size`` and keep rows ``[offset, offset + b)``."""
    if size <= 0 or not 0 <= offset < size:
        raise ValueError(f"global_batch needs 0 <= offset < size, got size={size}, offset={offset}")
    token = _GLOBAL_BATCH.set((int(size), int(offset)))
    try:
        yield
    finally:
        _GLOBAL_BATCH.reset(token)


def _rows(b: int) -> tuple[int, int]:
    """(rows to draw, first row to keep) for a local batch of ``b``."""
    spec = _GLOBAL_BATCH.get()
    if spec is None:
        return b, 0
    size, offset = spec
    if offset + b > size:
        raise ValueError(f"a batch of {b} at offset {offset} does not fit the global batch of {size}")
    return size, offset


def rand(b: int, *rest: int, device: torch.device | str = "cpu") -> Tensor:
    """``torch.rand(b, *rest)`` for this process's rows of the global batch."""
    n, offset = _rows(b)
    return torch.rand(n, *rest, device=device)[offset:offset + b]


def randint(high: int, b: int, *rest: int, device: torch.device | str = "cpu") -> Tensor:
    """``torch.randint(0, high, (b, *rest))`` for this process's rows of the global batch."""
    n, offset = _rows(b)
    return torch.randint(0, high, (n, *rest), device=device)[offset:offset + b]
