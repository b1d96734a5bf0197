"""Frozen-backbone features computed once and stored as one fp16 memory-mapped array: `scan.mode=cached`.

Layout: ``<out_dir>/<key>/features.npy`` (a plain ``.npy``, open with ``np.load(path, mmap_mode="r")``) of shape
``[V + 1, N, D]`` float16, and ``meta.json`` beside it. Row ``i`` of view ``v`` is the backbone's output (eval mode,
no gradient) for training image ``i`` under

* view 0: the evaluation transform (no augmentation);
* views 1..V: the augmentation ``kind`` (e.g. ``scan.view``) drawn from a fixed seed.

Fixed views. The images are cut into chunks of ``chunk_rows`` consecutive rows; the augmentation of chunk ``c`` in
view ``v`` is one batched transform call on that chunk with the torch RNG of the compute device seeded with
``view_seed(run.seed, v, c)`` (the caller's RNG state is saved and restored, so building or reusing a cache never
changes what training draws afterwards). A view is thus a function of (seed, view, chunk, device type) only: the
same whichever process computes the chunk, in which order, and on how many processes. The cache always uses the
batched torch augmentations, also when `data.backend` resolves to DALI (whose per-sample randomness is not seeded
by torch): a cache that differed between ranks or runs would defeat its purpose.

Sharding. With N processes the chunks are split with `comm.shard_range` (so each rank owns a contiguous block of
rows); rank 0 creates the ``.npy`` file (header + full size), a barrier, every rank computes its rows for every
view and writes them with positioned file writes (not through a shared writable mapping, which is unsafe on
network filesystems when two ranks' rows share a page), fsyncs, a barrier. The run folder must be visible to all
ranks, as for every stage.

Atomic and reusable. Everything is written under ``<out_dir>/.tmp-<key>/``; when all ranks are done rank 0 writes
``meta.json`` and renames the folder to ``<out_dir>/<key>/``. The key hashes everything the features depend on:
the backbone's weights and buffers (their bytes), the images (count, shape, a sample of pixels, the data config),
the normalisation, augmentation config and kind, V, the seed, chunk size, device type, precision and memory
format. A complete folder with the same key is reused without computing anything; other folders under
``out_dir`` (stale keys, interrupted builds) are deleted when a new cache is built.

Reading. `FeatureCache.get(views, rows)` gathers ``table[views[j], rows[j]]`` as float32 on the cache's device.
On CUDA the whole table is copied to the GPU when it fits (about half the free memory; ImageNet-1k with 2048-d
features and V=4 is 26 GB), so a training step is one gather kernel; otherwise rows are gathered from the host
mapping and copied per step.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from ..config import section_hash
from ..dist import comm
from ..dist.engine import PRECISIONS
from ..errors import DataError

CACHE_VERSION = 1
CHUNK_ROWS = 1024  # rows per seeded augmentation call; part of the key (it defines the views)
FEATURES_FILE = "features.npy"
META_FILE = "meta.json"
DEVICE_MEMORY_FRACTION = 0.5  # load the table onto a GPU when it needs at most this share of the free memory


def view_seed(seed: int, view: int, chunk: int) -> int:
    """The RNG seed of the augmentation of chunk `chunk` in view `view` (view >= 1)."""
    return int(section_hash("feature-cache-view", int(seed), int(view), int(chunk)), 16) % (2**63)


@contextlib.contextmanager
def _seeded(device: torch.device, seed: int):
    """Fork the RNG of `device` (and the CPU's) and seed it; the caller's state comes back on exit."""
    devices = [device.index if device.index is not None else torch.cuda.current_device()] \
        if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.random.default_generator.manual_seed(seed)
        if device.type == "cuda":
            with torch.cuda.device(device):
                torch.cuda.manual_seed(seed)
        yield


@torch.no_grad()
def chunk_views(ctx, images: torch.Tensor, view: int, kind: str, chunk: int, chunk_rows: int | None = None,
                transform=None) -> torch.Tensor:
    """The fixed view `view` of the images of chunk `chunk` (rows [chunk*chunk_rows, ...)), normalised, on the
    device: the evaluation transform for view 0, the seeded augmentation `kind` otherwise."""
    chunk_rows = chunk_rows or CHUNK_ROWS
    start = chunk * chunk_rows
    batch = images[start:min(start + chunk_rows, len(images))]
    if view == 0:
        return (transform or ctx.torch_transform("eval"))(batch)
    with _seeded(ctx.device, view_seed(ctx.cfg.run.seed, view, chunk)):
        return (transform or ctx.torch_transform(kind))(batch)


def _state_digest(module: torch.nn.Module) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _images_digest(images: torch.Tensor, samples: int = 64) -> str:
    """Count, shape and the pixels of `samples` evenly spaced images (not all: ImageNet is ~190 GB of pixels)."""
    digest = hashlib.sha256(f"{tuple(images.shape)}:{images.dtype}".encode())
    for index in np.linspace(0, len(images) - 1, num=min(samples, len(images)), dtype=np.int64):
        digest.update(images[int(index)].contiguous().numpy().tobytes())
    return digest.hexdigest()


def cache_key(ctx, backbone: torch.nn.Module, images: torch.Tensor, views: int, kind: str, dim: int,
              chunk_rows: int) -> str:
    cfg = ctx.cfg
    return section_hash(
        "feature-cache", CACHE_VERSION, _state_digest(backbone), _images_digest(images),
        dataclasses.asdict(cfg.data), dataclasses.asdict(cfg.augment), list(ctx.normalization), kind, int(views),
        int(cfg.run.seed), int(chunk_rows), int(dim), ctx.device.type, cfg.dist.precision, cfg.model.channels_last,
    )


def _header_offset(path: Path) -> int:
    """Bytes before the first element of a .npy file."""
    return int(np.load(path, mmap_mode="r").offset)


def _is_complete(folder: Path, key: str) -> bool:
    meta_path = folder / META_FILE
    if not meta_path.is_file() or not (folder / FEATURES_FILE).is_file():
        return False
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError:
        return False
    return meta.get("key") == key and meta.get("complete") is True


def _forward(ctx, backbone, pixels: torch.Tensor) -> torch.Tensor:
    """Backbone features of normalised images in slices of run.eval_batch_size, at dist.precision."""
    precision = PRECISIONS[ctx.cfg.dist.precision]
    step = max(1, ctx.cfg.run.eval_batch_size)
    outputs = []
    for start in range(0, len(pixels), step):
        with contextlib.nullcontext() if precision is None else torch.autocast(ctx.device.type, dtype=precision):
            outputs.append(backbone(pixels[start:start + step]).float())
    return torch.cat(outputs)


@torch.no_grad()
def build_cache(ctx, backbone: torch.nn.Module, images: torch.Tensor, views: int, kind: str, out_dir,
                chunk_rows: int | None = None, device: torch.device | None = None) -> "FeatureCache":
    """Compute (or reuse) the cache of `backbone` on `images`: view 0 un-augmented, views 1..`views` augmented with
    `kind`; every rank calls this together. Returns the cache opened for reading, gathering onto `device`
    (default ctx.device)."""
    if views < 0:
        raise ValueError(f"views must be >= 0, got {views}")
    chunk_rows = chunk_rows or CHUNK_ROWS
    if len(images) == 0:
        raise DataError("feature cache: no images")
    out_dir = Path(out_dir)
    was_training = backbone.training
    backbone.eval()  # frozen: BatchNorm uses its running statistics, a row's features ignore its batch
    try:
        eval_view = ctx.torch_transform("eval")
        dim = int(_forward(ctx, backbone, eval_view(images[:1])).reshape(1, -1).shape[1])
        key = comm.broadcast_object(cache_key(ctx, backbone, images, views, kind, dim, chunk_rows))  # rank 0's
        final = out_dir / key
        reuse = comm.broadcast_object(_is_complete(final, key) if comm.is_main() else None)
        if reuse:
            ctx.log.info("feature cache: reusing %s", final)
            return FeatureCache.open(final, device=device or ctx.device, log=ctx.log)
        _build(ctx, backbone, images, views, kind, out_dir, key, dim, chunk_rows, eval_view)
    finally:
        backbone.train(was_training)
    return FeatureCache.open(final, device=device or ctx.device, log=ctx.log, built=True)


def _build(ctx, backbone, images, views, kind, out_dir: Path, key: str, dim: int, chunk_rows: int, eval_view):
    num, total_views = len(images), views + 1
    tmp, final = out_dir / f".tmp-{key}", out_dir / key
    path = tmp / FEATURES_FILE
    if comm.is_main():
        out_dir.mkdir(parents=True, exist_ok=True)
        for stale in out_dir.iterdir():  # other keys and interrupted builds: one cache per stage folder
            if stale.is_dir() and not stale.is_symlink():
                shutil.rmtree(stale)
            else:
                stale.unlink()
        tmp.mkdir()
        created = np.lib.format.open_memmap(path, mode="w+", dtype=np.float16, shape=(total_views, num, dim))
        del created  # header written and the file sized (sparse); the rows are filled below
    comm.barrier()
    offset = _header_offset(path)
    num_chunks = -(-num // chunk_rows)
    first, stop = comm.shard_range(num_chunks)
    ctx.log.info("feature cache: computing %d view(s) x %d images x %d dims (fp16, %.2f GB) into %s",
                 total_views, num, dim, total_views * num * dim * 2 / 1e9, final)
    augmented = ctx.torch_transform(kind) if views else None
    bar = tqdm(total=total_views * (stop - first), desc="scan feature cache", unit="chunk", leave=False,
               disable=not (ctx.cfg.run.progress and comm.is_main()), dynamic_ncols=True)
    with open(path, "r+b") as handle:
        for view in range(total_views):
            for chunk in range(first, stop):
                pixels = chunk_views(ctx, images, view, kind, chunk, chunk_rows,
                                     transform=eval_view if view == 0 else augmented)
                rows = _forward(ctx, backbone, pixels).reshape(len(pixels), -1).to(torch.float16).cpu()
                if not bool(torch.isfinite(rows).all()):
                    raise DataError(f"feature cache: backbone features of view {view}, rows from "
                                    f"{chunk * chunk_rows}, are not finite in fp16 (|x| > 65504 or NaN)")
                handle.seek(offset + (view * num + chunk * chunk_rows) * dim * 2)
                handle.write(rows.numpy().tobytes())
                bar.update(1)
        handle.flush()
        os.fsync(handle.fileno())
    bar.close()
    comm.barrier()  # every rank's rows are on disk
    if comm.is_main():
        meta = {"key": key, "complete": True, "version": CACHE_VERSION, "shape": [total_views, num, dim],
                "dtype": "float16", "views": views, "kind": kind, "chunk_rows": chunk_rows,
                "seed": int(ctx.cfg.run.seed), "device_type": ctx.device.type, "world_size": comm.world_size()}
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        os.replace(tmp, final)
        fd = os.open(out_dir, os.O_RDONLY)
        try:
            os.fsync(fd)  # the rename itself is durable
        finally:
            os.close(fd)
    comm.barrier()


class FeatureCache:
    """A [V + 1, N, D] fp16 feature table: a read-only memory map, or a copy of it on a GPU."""

    def __init__(self, table, device: torch.device | str = "cpu", path: Path | None = None, built: bool = False):
        if table.ndim != 3:
            raise ValueError(f"a feature table has shape [views, rows, dims]; got {tuple(table.shape)}")
        self.table = table  # np.ndarray / np.memmap, or torch.Tensor (already on `device`)
        self.device = torch.device(device)
        self.path = path
        self.built = built  # True when this call computed the features, False when it reused a complete cache

    @classmethod
    def open(cls, folder, device: torch.device | str = "cpu", log=None, built: bool = False,
             memory_fraction: float = DEVICE_MEMORY_FRACTION) -> "FeatureCache":
        folder = Path(folder)
        table = np.load(folder / FEATURES_FILE, mmap_mode="r")
        device = torch.device(device)
        if device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(device)
            if table.nbytes <= memory_fraction * free:
                table = _to_device(table, device)
            elif log is not None:
                log.warning("feature cache: %.1f GB does not fit in %.0f%% of the %.1f GB free on %s; gathering "
                            "rows from host memory every step", table.nbytes / 1e9, 100 * memory_fraction,
                            free / 1e9, device)
        return cls(table, device=device, path=folder / FEATURES_FILE, built=built)

    @property
    def num_views(self) -> int:
        """V + 1: the un-augmented view 0 and V augmented views."""
        return int(self.table.shape[0])

    @property
    def num_items(self) -> int:
        return int(self.table.shape[1])

    @property
    def dim(self) -> int:
        return int(self.table.shape[2])

    def get(self, views: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """float32 [B, D] on the cache's device: row j is the features of image rows[j] in view views[j]."""
        if isinstance(self.table, torch.Tensor):
            views = views.to(self.table.device, non_blocking=True)
            rows = rows.to(self.table.device, non_blocking=True)
            return self.table[views, rows].float()
        gathered = np.asarray(self.table[views.cpu().numpy(), rows.cpu().numpy()])
        return torch.from_numpy(gathered).to(self.device, non_blocking=True).float()


def _to_device(table: np.ndarray, device: torch.device, piece_bytes: int = 1 << 28) -> torch.Tensor:
    """Copy a memory-mapped table to the device in ~256 MB pieces (no full host copy)."""
    out = torch.empty(table.shape, dtype=torch.float16, device=device)
    rows_per_piece = max(1, piece_bytes // max(1, table.shape[2] * 2))
    for view in range(table.shape[0]):
        for start in range(0, table.shape[1], rows_per_piece):
            piece = np.array(table[view, start:start + rows_per_piece])  # a writable host copy
            out[view, start:start + len(piece)].copy_(torch.from_numpy(piece))
    return out
