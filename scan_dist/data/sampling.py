"""Epoch order and per-sample randomness as pure functions of (run seed, stream, epoch, sample index, view).

Nothing here keeps state. A *stream* names one use of randomness ("pretext", "scan", "feature-cache/scan", ...);
`stream_key(seed, stream, epoch)` turns it into a 64-bit key, and every random number a view needs is

    u = splitmix64_output(key, counter),   counter = (index << 24) | (view << 16) | draw

a uniform in [0, 1): SplitMix64's `counter`-th output for the seed `key` (the generator Java's SplittableRandom
and numpy's seeding use; it passes BigCrush). The keys come from SHA-256, so streams of different seeds, stages or
epochs start at unrelated points of the 2^64 cycle. Because a view's numbers depend on (key, index, view, draw)
only, a sample gets the same augmentation whatever the world size, rank, DataLoader worker, batch it falls in,
resume point, device or backend -- and a checkpoint needs no RNG state at all: (epoch, step) is the whole position.

Draws are vectorised uint64 numpy arithmetic: a batch of 512 samples x 64 draws costs ~0.1 ms.

The epoch order is a seeded permutation per (seed, stream, epoch); each rank takes its contiguous slice of every
global batch (`rank_slice`), so N ranks together see exactly the batches one process sees.
"""
from __future__ import annotations

import hashlib

import numpy as np

__all__ = ["NUM_DRAWS", "MAX_VIEWS", "stream_key", "draws", "uniform", "epoch_order", "rank_slice", "steps_per_epoch"]

NUM_DRAWS = 64  # uniforms reserved per (sample, view); the transforms use fixed draw numbers below this
MAX_VIEWS = 256  # views per sample a stream can address
MAX_INDEX = 1 << 40  # sample indices addressable (10^12)

_GAMMA = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_S30, _S27, _S31 = np.uint64(30), np.uint64(27), np.uint64(31)


def stream_key(seed: int, stream: str, epoch: int = 0) -> int:
    """The 64-bit key of one stream in one epoch (SHA-256 of the three, so nearby seeds share nothing)."""
    blob = f"scan_dist/{int(seed)}/{stream}/{int(epoch)}".encode()
    return int.from_bytes(hashlib.sha256(blob).digest()[:8], "little")


def _mix64(z: np.ndarray) -> np.ndarray:
    """SplitMix64's output function (Stafford's variant 13): a bijection of uint64 with full avalanche."""
    z = (z ^ (z >> _S30)) * _M1
    z = (z ^ (z >> _S27)) * _M2
    return z ^ (z >> _S31)


def draws(key: int, index, view, count: int = NUM_DRAWS) -> np.ndarray:
    """float64 [B, count] uniforms in [0, 1): row b holds draws 0..count-1 of sample index[b] in view view[b].

    `index` is an int array (or int) of sample indices, `view` an int or an int array of the same length.
    """
    index = np.asarray(index, dtype=np.int64).reshape(-1)
    view = np.broadcast_to(np.asarray(view, dtype=np.int64), index.shape)
    if index.size and (index.min() < 0 or index.max() >= MAX_INDEX):
        raise ValueError(f"sample indices must lie in [0, 2^40); got {index.min()}..{index.max()}")
    if view.size and (view.min() < 0 or view.max() >= MAX_VIEWS):
        raise ValueError(f"views must lie in [0, {MAX_VIEWS}); got {view.min()}..{view.max()}")
    if not 0 < count <= 1 << 16:
        raise ValueError(f"count must be in [1, 65536]; got {count}")
    base = (index.astype(np.uint64) << np.uint64(24)) | (view.astype(np.uint64) << np.uint64(16))
    counter = base[:, None] + np.arange(count, dtype=np.uint64)[None, :]
    with np.errstate(over="ignore"):  # uint64 arithmetic wraps by design
        state = np.uint64(key) + (counter + np.uint64(1)) * _GAMMA
        bits = _mix64(state)
    # The top 53 bits give every double in [0, 1) on a 2^-53 grid.
    return (bits >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


def uniform(key: int, index, view: int = 0, draw: int = 0) -> np.ndarray:
    """float64 [B]: the single uniform `draw` of each sample (for one-number uses such as a neighbour pick)."""
    return draws(key, index, view, count=draw + 1)[:, draw]


def epoch_order(num_items: int, seed: int, stream: str, epoch: int) -> np.ndarray:
    """int64 [num_items]: the permutation of the sample indices for this (seed, stream, epoch)."""
    generator = np.random.Generator(np.random.Philox(key=stream_key(seed, f"{stream}/order", epoch)))
    return generator.permutation(num_items).astype(np.int64)


def steps_per_epoch(num_items: int, batch_size: int) -> int:
    """Full batches only (as the paper's loaders drop the last one); a set smaller than a batch is one step."""
    return max(1, num_items // batch_size)


def rank_slice(order: np.ndarray, step: int, batch: int, rank: int, world: int) -> np.ndarray:
    """This rank's contiguous rows of global batch `step` (batch must divide by world)."""
    local = batch // world
    start = step * batch + rank * local
    return order[start:start + local]
