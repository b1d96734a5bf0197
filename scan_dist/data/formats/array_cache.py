"""Array formats decoded once into a uint8 `.npy` cache that every process memory-maps.

The first process to open a dataset with given settings parses the original files (`arrays.py`), converts channels
and resizes to the output size in chunks, and writes ``<cache_dir>/<format>-<split>-<key>/images.npy`` plus
``targets.npy`` and ``meta.json`` into a temporary folder that is renamed into place: a cache folder is complete or
absent, never half-written. A file lock makes the other processes of a node wait for that build instead of
repeating it; processes on other nodes (or without working locks) may build the same folder concurrently, and the
atomic rename keeps exactly one. The key hashes the format, split, output size, channels and the size and mtime
of every file of the dataset folder, so a changed dataset is decoded again.

Every rank then maps the same file read-only: the pages are shared through the page cache, so a node holds one
copy however many ranks and workers read it (Fashion-MNIST 47 MB, CIFAR 150 MB, STL-10 with unlabelled 3 GB).
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
import torch

from scan_dist.errors import DataError

from .arrays import ARRAY_LOADERS, ArraySource, check_targets, resize_arrays, rgb_to_luminance
from .common import choose_indices, describe
from .reader import Reader

CACHE_VERSION = 1
IMAGES_FILE, TARGETS_FILE, META_FILE = "images.npy", "targets.npy", "meta.json"
_CHUNK = 4096  # rows converted at a time while building (bounds the builder's memory)


def default_cache_dir() -> Path:
    """$SCAN_DIST_CACHE_DIR, else ~/.cache/scan_dist (data.cache_dir overrides both)."""
    env = os.environ.get("SCAN_DIST_CACHE_DIR")
    return Path(env) if env else Path.home() / ".cache" / "scan_dist"


class ArrayReader(Reader):
    """Rows of a memory-mapped uint8 [N, C, S, S] cache (optionally a subset `rows` of it)."""

    fixed_size = True

    def __init__(self, path: Path, rows: np.ndarray | None, **info):
        super().__init__(**info)
        self.path = Path(path)
        self.rows = rows  # int64 [num_items] into the cache, or None for all rows
        self._images = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_images": None}  # workers map the file themselves; never pickle its pages

    @property
    def images(self) -> np.ndarray:
        """The read-only map of the whole cache (all rows, not just a subset)."""
        if self._images is None:
            self._images = np.load(self.path, mmap_mode="r")
        return self._images

    def _rows(self, indices: np.ndarray) -> np.ndarray:
        indices = np.asarray(indices, dtype=np.int64)
        return indices if self.rows is None else self.rows[indices]

    def read(self, index: int) -> torch.Tensor:
        return torch.from_numpy(np.array(self.images[int(self._rows(np.array([index]))[0])]))

    def read_batch(self, indices: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(self.images[self._rows(indices)]))

    def resident_bytes_per_image(self) -> int:
        return 8 + (8 if self.rows is not None else 0)


def _fingerprint(root: Path) -> list:
    """(relative path, size, mtime) of the regular files in `root` and its direct subfolders."""
    entries = []
    for folder in [root] + sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        for item in sorted(folder.iterdir()):
            if item.is_file() and not item.name.startswith("."):
                stat = item.stat()
                entries.append([item.relative_to(root).as_posix(), stat.st_size, stat.st_mtime_ns])
    return entries


def cache_folder(cache_dir: Path, root: Path, fmt: str, split: str, image_size, channels, include_unlabeled) -> Path:
    blob = json.dumps([CACHE_VERSION, str(root.resolve()), fmt, split, image_size, channels,
                       bool(include_unlabeled and fmt == "stl10"), _fingerprint(root)])
    return Path(cache_dir) / f"{fmt}-{split}-{hashlib.sha256(blob.encode()).hexdigest()[:16]}"


def _complete(folder: Path) -> bool:
    return (folder / META_FILE).is_file() and (folder / IMAGES_FILE).is_file() and (folder / TARGETS_FILE).is_file()


@contextlib.contextmanager
def _locked(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX)
        except OSError:  # a filesystem without locks: the atomic rename still keeps one complete copy
            pass
        yield


def open_array_reader(root: Path, fmt: str, split: str, image_size: int | None, channels: int | None,
                      include_unlabeled: bool, max_images: int | None, seed: int, cache_dir: Path | None,
                      log=None) -> ArrayReader:
    cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
    folder = cache_folder(cache_dir, root, fmt, split, image_size, channels, include_unlabeled)
    if not _complete(folder):
        try:
            with _locked(cache_dir / f".lock-{folder.name}"):
                if not _complete(folder):
                    _build(folder, ARRAY_LOADERS[fmt](root, split, include_unlabeled), image_size, channels, log)
        except OSError as exc:
            raise DataError(f"data.cache_dir {cache_dir}: cannot write the decoded-array cache ({exc}); point "
                            "data.cache_dir (or $SCAN_DIST_CACHE_DIR) at a writable folder") from None
    meta = json.loads((folder / META_FILE).read_text())
    targets = np.load(folder / TARGETS_FILE)
    total = len(targets)
    rows = choose_indices(total, max_images, seed)
    details = list(meta["details"])
    if rows is not None:
        targets = targets[rows]
        details.append(f"{len(rows)} of {total} images")
    _, c, s, _ = meta["shape"]
    return ArrayReader(folder / IMAGES_FILE, rows, num_items=len(targets), channels=c, image_size=s,
                       targets=targets, class_names=meta["class_names"], source=describe(meta["source"], details))


def _build(folder: Path, src: ArraySource, image_size: int | None, channels: int | None, log) -> None:
    total = sum(len(part.targets) for part in src.parts)
    if total == 0:
        raise DataError(f"{src.source}: the dataset holds no images; re-download it")
    native_c, native_h, native_w = src.parts[0].images.shape[1:]
    out_c = channels or native_c
    side = image_size or native_h
    if image_size is None and native_h != native_w:
        raise DataError(f"{src.source}: images are {native_h}x{native_w}; set data.image_size for non-square arrays")
    tmp = folder.parent / f".tmp-{folder.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    if log is not None:
        log.info("decoding %s once into %s (%d images, %dx%dx%d uint8, %.2f GB)", src.source, folder, total, out_c,
                 side, side, total * out_c * side * side / 1e9)
    images = np.lib.format.open_memmap(tmp / IMAGES_FILE, mode="w+", dtype=np.uint8, shape=(total, out_c, side, side))
    targets = np.concatenate([np.asarray(part.targets, dtype=np.int64) for part in src.parts])
    check_targets(targets, len(src.class_names), src.source)
    offset = 0
    for part in src.parts:
        for start in range(0, len(part.targets), _CHUNK):
            chunk = np.asarray(part.images[start:start + _CHUNK])
            if out_c == 1 and chunk.shape[1] == 3:
                chunk = rgb_to_luminance(chunk)
            if chunk.shape[2:] != (side, side):
                chunk = resize_arrays(chunk, side)
            if out_c == 3 and chunk.shape[1] == 1:
                chunk = np.repeat(chunk, 3, axis=1)
            images[offset:offset + len(chunk)] = chunk
            offset += len(chunk)
    images.flush()
    del images
    np.save(tmp / TARGETS_FILE, targets)
    meta = {"version": CACHE_VERSION, "shape": [total, out_c, side, side], "class_names": list(src.class_names),
            "source": src.source, "details": list(src.details)}
    (tmp / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    for name in (IMAGES_FILE, TARGETS_FILE, META_FILE):
        with open(tmp / name, "rb") as handle:
            os.fsync(handle.fileno())
    try:
        os.rename(tmp, folder)
    except OSError:
        if not _complete(folder):  # not a concurrent builder's finished copy: a real failure
            raise
        shutil.rmtree(tmp, ignore_errors=True)
