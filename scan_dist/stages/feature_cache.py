"""Frozen-backbone features computed once and stored as one memory-mapped array: `scan.mode=cached|head`,
`selflabel.mode=cached`.

Layout: ``<out_dir>/<key>/features.npy`` (a plain ``.npy``, open with ``np.load(path, mmap_mode="r")``) of shape
``[N, V + 1, D]`` (fp16 by default; fp32 for scan.mode=head) and ``meta.json`` beside it. Row ``i``, view ``v`` is
the backbone's output (eval mode, no gradient) for training image ``i`` under

* view 0: the evaluation view (no augmentation);
* views 1..V: the augmentation ``kind`` with the counter-based parameters of (run seed, "feature-cache/<kind>",
  epoch 0, sample i, view v) -- the same numbers whoever computes the row, in whichever batch, on how many ranks.

Built by all ranks together: the loader workers of each rank produce its shard of rows in every view, the backbone
embeds them, and the rows go into one shared file (`dist.shared_rows`). Everything is written under
``<out_dir>/.tmp-<key>/`` and renamed into place by rank 0 when all ranks are done. The key hashes everything the
features depend on: the backbone's weights and buffers (their bytes), the data (config, count, a sample of stored
pixels), the normalisation, augmentation config and kind, V, the seed, dtype, device type, precision and memory
format. A complete folder with the same key is reused without computing anything; other folders under ``out_dir``
(stale keys, interrupted builds) are deleted when a new cache is built.

Reading. `FeatureCache.get(views, rows)` gathers ``table[rows[j], views[j]]`` as float32 on the cache's device.
On CUDA the whole table is copied to the GPU when it fits (about half the free memory; ImageNet-1k with 2048-d
fp16 features and V=4 is 26 GB), so a training step is one gather kernel; otherwise rows are gathered from the host
mapping (shared by the ranks of a node through the page cache) and copied per step.
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
from ..data import sampling
from ..data.formats import BadImage
from ..data.loaders import ViewSpec
from ..distributed import comm
from ..distributed.engine import PRECISIONS
from ..distributed.shared_rows import SharedRows
from ..errors import DataError

CACHE_VERSION = 2
FEATURES_FILE = "features.npy"
META_FILE = "meta.json"
DEVICE_MEMORY_FRACTION = 0.5  # load the table onto a GPU when it needs at most this share of the free memory
DTYPES = {"float16": np.float16, "float32": np.float32}


def view_stream(kind: str) -> str:
    """The randomness stream of the cache's fixed views of `kind` (epoch 0)."""
    return f"feature-cache/{kind}"


def _state_digest(module: torch.nn.Module) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _images_digest(reader, samples: int = 16) -> str:
    """Count, size and the stored pixels of `samples` evenly spaced images (not all: ImageNet is TBs of pixels)."""
    digest = hashlib.sha256(f"{len(reader)}:{reader.channels}:{reader.image_size}:{reader.source}".encode())
    for index in np.linspace(0, len(reader) - 1, num=min(samples, len(reader)), dtype=np.int64):
        try:
            digest.update(reader.read(int(index)).numpy().tobytes())
        except BadImage as exc:
            digest.update(str(exc).encode())
    return digest.hexdigest()


def cache_key(ctx, backbone: torch.nn.Module, views: int, kind: str, dim: int, dtype: str) -> str:
    cfg = ctx.cfg
    return section_hash(
        "feature-cache", CACHE_VERSION, _state_digest(backbone), _images_digest(ctx.train_set),
        dataclasses.asdict(cfg.data), dataclasses.asdict(cfg.augment), list(ctx.normalization), kind, int(views),
        int(cfg.run.seed), int(dim), dtype, ctx.device.type, cfg.dist.precision, cfg.model.channels_last,
    )


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
    """Backbone features of normalised images in slices of the inference batch size, at dist.precision."""
    precision = PRECISIONS[ctx.cfg.dist.precision]
    step = max(1, ctx.eval_batch_size)
    outputs = []
    for start in range(0, len(pixels), step):
        with contextlib.nullcontext() if precision is None else torch.autocast(ctx.device.type, dtype=precision):
            outputs.append(backbone(pixels[start:start + step]).float())
    return torch.cat(outputs)


@torch.no_grad()
def build_cache(ctx, backbone: torch.nn.Module, views: int, kind: str, out_dir, dtype: str = "float16",
                device: torch.device | None = None) -> "FeatureCache":
    """Compute (or reuse) the cache of `backbone` on the training images: view 0 un-augmented, views 1..`views`
    augmented with `kind`; every rank calls this together. Returns the cache opened for reading, gathering onto
    `device` (default ctx.device)."""
    if views < 0:
        raise ValueError(f"views must be >= 0, got {views}")
    if len(ctx.train_set) == 0:
        raise DataError("feature cache: no images")
    out_dir = Path(out_dir)
    was_training = backbone.training
    backbone.eval()  # frozen: BatchNorm uses its running statistics, a row's features ignore its batch
    try:
        probe = ctx.inference_batches("train")
        dim = int(_forward(ctx, backbone, probe.build_now(np.array([0]))["views"][0]).reshape(1, -1).shape[1])
        probe.close()
        key = comm.broadcast_object(cache_key(ctx, backbone, views, kind, dim, dtype))  # rank 0's
        final = out_dir / key
        reuse = comm.broadcast_object(_is_complete(final, key) if comm.is_main() else None)
        if reuse:
            ctx.log.info("feature cache: reusing %s", final)
            return FeatureCache.open(final, device=device or ctx.device, log=ctx.log)
        _build(ctx, backbone, views, kind, out_dir, key, dim, dtype)
    finally:
        backbone.train(was_training)
    return FeatureCache.open(final, device=device or ctx.device, log=ctx.log, built=True)


def _build(ctx, backbone, views: int, kind: str, out_dir: Path, key: str, dim: int, dtype: str):
    num, total_views = len(ctx.train_set), views + 1
    tmp, final = out_dir / f".tmp-{key}", out_dir / key
    if comm.is_main():
        out_dir.mkdir(parents=True, exist_ok=True)
        for stale in out_dir.iterdir():  # other keys and interrupted builds: one cache per stage folder
            if stale.is_dir() and not stale.is_symlink():
                shutil.rmtree(stale)
            else:
                stale.unlink()
        tmp.mkdir()
    comm.barrier()
    ctx.log.info("feature cache: computing %d view(s) x %d images x %d dims (%s, %.2f GB) into %s", total_views, num,
                 dim, dtype, total_views * num * dim * np.dtype(DTYPES[dtype]).itemsize / 1e9, final)
    table = SharedRows(tmp / FEATURES_FILE, num, (total_views, dim), DTYPES[dtype])
    specs = [ViewSpec("eval")] + [ViewSpec(kind, view_stream(kind), view) for view in range(1, total_views)]
    source = ctx.inference_batches("train", specs)
    try:
        for batch in tqdm(source, total=len(source), desc="feature cache", unit="batch", leave=False,
                          disable=not (ctx.cfg.run.progress and comm.is_main()), dynamic_ncols=True):
            rows = torch.stack([_forward(ctx, backbone, pixels).reshape(len(pixels), -1) for pixels in batch["views"]],
                               dim=1)  # [b, V + 1, D]
            bad = ~torch.isfinite(rows).all(dim=2).all(dim=0)
            if dtype == "float16":
                bad |= (rows.abs() > 65504).any(dim=2).any(dim=0)
            if bool(bad.any()):
                view = int(bad.nonzero()[0])
                raise DataError(f"feature cache: backbone features of view {view}, rows from "
                                f"{int(batch['index'][0])}, are not finite in {dtype} (NaN, inf or beyond its range)")
            table.write(int(batch["index"][0]), rows.cpu().numpy())
    except BaseException:
        table.abort()
        raise
    finally:
        source.close()
    table.close()
    if comm.is_main():
        meta = {"key": key, "complete": True, "version": CACHE_VERSION, "shape": [num, total_views, dim],
                "dtype": dtype, "views": views, "kind": kind, "seed": int(ctx.cfg.run.seed),
                "device_type": ctx.device.type, "world_size": comm.world_size()}
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        os.replace(tmp, final)
        fd = os.open(out_dir, os.O_RDONLY)
        try:
            os.fsync(fd)  # the rename itself is durable
        finally:
            os.close(fd)
    comm.barrier()


class FeatureCache:
    """An [N, V + 1, D] feature table: a read-only memory map, or a copy of it on a GPU."""

    def __init__(self, table, device: torch.device | str = "cpu", path: Path | None = None, built: bool = False):
        if table.ndim != 3:
            raise ValueError(f"a feature table has shape [rows, views, dims]; got {tuple(table.shape)}")
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
        return int(self.table.shape[1])

    @property
    def num_items(self) -> int:
        return int(self.table.shape[0])

    @property
    def dim(self) -> int:
        return int(self.table.shape[2])

    def get(self, views: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """float32 [B, D] on the cache's device: row j is the features of image rows[j] in view views[j]."""
        if isinstance(self.table, torch.Tensor):
            views = views.to(self.table.device, non_blocking=True)
            rows = rows.to(self.table.device, non_blocking=True)
            return self.table[rows, views].float()
        gathered = np.asarray(self.table[rows.cpu().numpy(), views.cpu().numpy()])
        return torch.from_numpy(gathered).to(self.device, non_blocking=True).float()


def _to_device(table: np.ndarray, device: torch.device, piece_bytes: int = 1 << 28) -> torch.Tensor:
    """Copy a memory-mapped table to the device in ~256 MB pieces (no full host copy)."""
    out = torch.empty(table.shape, dtype=torch.from_numpy(np.zeros(0, table.dtype)).dtype, device=device)
    rows_per_piece = max(1, piece_bytes // max(1, table.shape[1] * table.shape[2] * table.dtype.itemsize))
    for start in range(0, table.shape[0], rows_per_piece):
        piece = np.array(table[start:start + rows_per_piece])  # a writable host copy
        out[start:start + len(piece)].copy_(torch.from_numpy(piece))
    return out


# View numbers of the counter-based draws that pick a cached view for an anchor and for its partner.
ANCHOR_VIEW_DRAW, PARTNER_VIEW_DRAW = 250, 251


def draw_views(key: int, anchors: np.ndarray, slot: int, views: int) -> torch.Tensor:
    """A cached view per row: uniform over the augmented views 1..`views` (0 when `views` is 0), drawn from the
    counter-based stream `key` for the row's anchor and `slot` (ANCHOR_VIEW_DRAW or PARTNER_VIEW_DRAW)."""
    if views == 0:
        return torch.zeros(len(anchors), dtype=torch.long)
    u = sampling.uniform(key, anchors, slot)
    return torch.from_numpy(np.minimum(np.floor(u * views).astype(np.int64), views - 1) + 1)
