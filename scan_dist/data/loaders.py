"""Batches of augmented views, built off the training loop by DataLoader workers.

A stage describes what it needs as `ViewSpec`s (kind, randomness stream, view number, anchor or partner rows);
`BatchBuilder` (the map-style dataset the workers run) turns one request -- (epoch, step, this rank's sample
indices) -- into a batch: it reads the stored images (a memory-mapped slice for arrays, one decode per file),
draws every view's parameters from the counter-based streams of sampling.py, and runs the transforms' `base`
phase (and, on CPU, the `finish` phase). The main process only moves ready batches to the device and, on GPUs,
runs the `finish` phase there (`data.finish_on`).

Who decides what: the sampler (main process) fixes the order -- a permutation per (seed, stream, epoch), each rank
taking its slice of every global batch -- and the builder is a pure function of the request. Hence the same
batch whatever the number of workers (0 = in the main process), ranks or restarts; resuming mid-epoch simply
starts the sampler at the saved step.

Bad images (file formats): with data.on_bad_image=fail the first unreadable file stops the stage with one error
line naming it (workers return the message instead of raising, so it never turns into a worker traceback); with
skip the image is replaced by a black one and its index is reported with the batch, so `BatchSource` can count
skips across workers (and the stage across ranks).
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Sampler

from .. import preemption
from ..errors import DataError
from .formats.reader import BadImage, Reader
from .sampling import draws, epoch_order, rank_slice, steps_per_epoch, stream_key, uniform
from .transforms import ViewTransform

# View number whose first draw picks a SCAN partner among the k neighbours and the anchor itself; views of
# images use 0, 1, ... so this never collides.
PARTNER_VIEW = 255


@dataclass(frozen=True)
class ViewSpec:
    kind: str  # simclr | weak | strong | eval
    stream: str = ""  # randomness stream; keys are (run seed, stream, epoch)
    view: int = 0  # view number within the stream
    rows: str = "anchor"  # anchor: the requested samples; partner: their sampled neighbours


@dataclass(frozen=True)
class Request:
    epoch: int
    step: int
    indices: np.ndarray  # int64 sample indices of this rank's rows, in batch order


@dataclass
class Partners:
    """SCAN's neighbour sampling: partner of anchor i = neighbors[i, pick] or i itself (pick == k)."""

    path: str  # .npy [N, k] int64, memory-mapped
    stream: str
    _table: np.ndarray | None = field(default=None, repr=False)

    def __getstate__(self) -> dict:
        return {"path": self.path, "stream": self.stream, "_table": None}

    @property
    def table(self) -> np.ndarray:
        if self._table is None:
            self._table = np.load(self.path, mmap_mode="r")
        return self._table

    def pick(self, seed: int, epoch: int, anchors: np.ndarray) -> np.ndarray:
        return sample_partners(self.table, stream_key(seed, self.stream, epoch), anchors)


def sample_partners(neighbors: np.ndarray, key: int, anchors: np.ndarray) -> np.ndarray:
    """A partner per anchor, uniform over its k neighbours and itself (the paper samples the image itself too)."""
    k = neighbors.shape[1]
    pick = np.minimum(np.floor(uniform(key, anchors, PARTNER_VIEW) * (k + 1)).astype(np.int64), k)
    partners = np.asarray(neighbors[anchors, np.minimum(pick, k - 1)], dtype=np.int64)
    return np.where(pick == k, anchors, partners)


class BatchBuilder:
    """The map-style dataset of the loaders: `builder[request]` -> one batch (a dict of CPU tensors)."""

    def __init__(self, reader: Reader, specs: Sequence[ViewSpec], transforms: dict[str, ViewTransform], seed: int,
                 finish_in_loader: bool, on_bad_image: str = "fail", partners: Partners | None = None,
                 execute_base: bool = True):
        self.reader, self.specs, self.transforms = reader, tuple(specs), transforms
        self.seed, self.finish_in_loader, self.on_bad_image, self.partners = seed, finish_in_loader, on_bad_image, partners
        # False: leave the base phase to another executor (DALI): the batch carries the stored images (HWC) and
        # each view's source map instead of views.
        self.execute_base = execute_base
        if any(spec.rows == "partner" for spec in self.specs) and partners is None:
            raise ValueError("partner views need a Partners table")

    def __getitem__(self, request: Request) -> dict:
        try:
            return self.build(request)
        except (BadImage, DataError) as exc:  # a message, not a worker traceback: the main process raises it
            return {"error": str(exc)}

    def build(self, request: Request) -> dict:
        rows = {"anchor": np.asarray(request.indices, dtype=np.int64)}
        if self.partners is not None:
            rows["partner"] = self.partners.pick(self.seed, request.epoch, rows["anchor"])
        images, bad = {}, []
        for name in {spec.rows for spec in self.specs}:
            images[name] = self._read(rows[name], bad)
        batch = {"epoch": request.epoch, "index": torch.from_numpy(rows["anchor"]), "views": [], "params": [],
                 "bad": torch.tensor(sorted(set(bad)), dtype=torch.int64)}
        if "partner" in rows:
            batch["partner"] = torch.from_numpy(rows["partner"])
        if not self.execute_base:
            batch["stored"] = {name: _channels_last(stored) for name, stored in images.items()}
            batch["maps"] = []
        for spec in self.specs:
            transform = self.transforms[spec.kind]
            indices = rows[spec.rows]
            u = draws(stream_key(self.seed, spec.stream, request.epoch), indices, spec.view) if transform.random \
                else None
            stored = images[spec.rows]
            if isinstance(stored, torch.Tensor):  # one size: batched
                hw = np.tile(np.array(stored.shape[-2:], dtype=np.int64), (len(indices), 1))
            else:
                hw = np.array([img.shape[-2:] for img in stored], dtype=np.int64).reshape(-1, 2)
            params = transform.params(u, hw)
            if not self.execute_base:
                batch["maps"].append(torch.from_numpy(transform.source_map(params, hw)))
                batch["params"].append(params)
                continue
            if isinstance(stored, torch.Tensor):
                base = transform.base(stored, params)
            else:  # decoded files of any size
                base = torch.stack([transform.base_one(img, params, i) for i, img in enumerate(stored)])
            if self.finish_in_loader:
                batch["views"].append(transform.finish(base, params))
                batch["params"].append(None)
            else:
                batch["views"].append(base)
                batch["params"].append(params)
        return batch

    def _read(self, indices: np.ndarray, bad: list):
        reader = self.reader
        if reader.fixed_size:
            return reader.read_batch(indices)
        out = []
        for i in indices:
            try:
                out.append(reader.read(int(i)))
            except BadImage as exc:
                if self.on_bad_image == "fail":
                    raise DataError(f"{exc}; replace or delete it, or set data.on_bad_image=skip") from None
                bad.append(int(i))
                side = getattr(reader, "resize_size", reader.image_size)
                out.append(torch.zeros(reader.channels, side, side, dtype=torch.uint8))
        return out


def _channels_last(stored):
    """[B, C, H, W] -> [B, H, W, C], or a list of [C, h, w] -> a list of [h, w, C] (what DALI takes)."""
    if isinstance(stored, torch.Tensor):
        return stored.permute(0, 2, 3, 1).contiguous()
    return [img.permute(1, 2, 0).contiguous() for img in stored]


class EpochRequests(Sampler):
    """The requests of one epoch from a given step: this rank's slice of every global batch."""

    def __init__(self, num_items: int, batch_size: int, seed: int, stream: str, rank: int, world: int):
        self.num_items, self.batch = num_items, min(batch_size, num_items)
        self.seed, self.stream, self.rank, self.world = seed, stream, rank, world
        self.steps = steps_per_epoch(num_items, batch_size)
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        self.epoch, self.start = epoch, start_step

    def __len__(self) -> int:
        return self.steps - self.start

    def __iter__(self) -> Iterator[Request]:
        order = epoch_order(self.num_items, self.seed, self.stream, self.epoch)
        for step in range(self.start, self.steps):
            yield Request(self.epoch, step, rank_slice(order, step, self.batch, self.rank, self.world))


class RangeRequests(Sampler):
    """Consecutive chunks of rows [start, stop) (inference over this rank's shard), epoch 0."""

    def __init__(self, start: int, stop: int, batch_size: int):
        self.start, self.stop, self.batch = start, stop, max(1, batch_size)

    def __len__(self) -> int:
        return -(-(self.stop - self.start) // self.batch)

    def __iter__(self) -> Iterator[Request]:
        for step, first in enumerate(range(self.start, self.stop, self.batch)):
            yield Request(0, step, np.arange(first, min(first + self.batch, self.stop), dtype=np.int64))


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask, e.g. a SLURM allocation), not the machine's count."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


@dataclass
class LoaderSettings:
    workers: int = 0
    prefetch: int = 2
    pin_memory: bool = False
    device: torch.device = torch.device("cpu")
    memory_format: torch.memory_format = torch.contiguous_format


class BatchSource:
    """Iterates finished batches (views on the device) and keeps the time the consumer waited for them."""

    def __init__(self, builder: BatchBuilder, sampler: Sampler, settings: LoaderSettings):
        self.builder, self.sampler, self.settings = builder, sampler, settings
        workers = settings.workers
        self.loader = DataLoader(builder, batch_size=None, sampler=sampler, num_workers=workers,
                                 pin_memory=settings.pin_memory, prefetch_factor=settings.prefetch if workers else None,
                                 persistent_workers=workers > 0,
                                 worker_init_fn=preemption.ignore_in_data_worker if workers else None,
                                 generator=torch.Generator().manual_seed(0))  # leaves the global RNG alone
        self.wait_s = 0.0  # time spent waiting for (and finishing) batches in the consumer's thread
        self.bad: list[int] = []  # indices of skipped images (data.on_bad_image=skip) met so far

    def __len__(self) -> int:
        return len(self.sampler)

    def epoch(self, epoch: int, start_step: int = 0) -> Iterator[dict]:
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(epoch, start_step)
        return iter(self)

    def __iter__(self) -> Iterator[dict]:
        iterator = iter(self.loader)
        while True:
            start = time.perf_counter()
            try:
                batch = next(iterator)
            except StopIteration:
                return
            batch = self.finish(batch)
            self.wait_s += time.perf_counter() - start
            yield batch

    def build_now(self, indices: np.ndarray, epoch: int = 0) -> dict:
        """One finished batch of these rows, built in this process (no workers)."""
        return self.finish(self.builder[Request(epoch, 0, np.asarray(indices, dtype=np.int64))])

    @staticmethod
    def check(batch: dict) -> None:
        """Raise the one-line error a worker returned instead of a batch (an unreadable file)."""
        if "error" in batch:
            raise DataError(batch["error"])

    def finish(self, batch: dict) -> dict:
        self.check(batch)
        if batch["bad"].numel():
            self.bad.extend(batch["bad"].tolist())
        settings = self.settings
        views = []
        for spec, view, params in zip(self.builder.specs, batch["views"], batch["params"]):
            view = view.to(settings.device, non_blocking=True)
            if params is not None:
                view = self.builder.transforms[spec.kind].finish(view, params)
            views.append(view.contiguous(memory_format=settings.memory_format))
        return {**batch, "views": views}

    def close(self) -> None:
        """Stop the workers (persistent ones would otherwise live until the source is collected)."""
        iterator = getattr(self.loader, "_iterator", None)
        if iterator is not None and hasattr(iterator, "_shutdown_workers"):
            iterator._shutdown_workers()
        self.loader = None
