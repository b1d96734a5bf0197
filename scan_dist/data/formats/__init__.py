"""Dataset formats: `open_dataset(path, split, ...)` returns a reader (index -> stored image) for any supported layout.

Array formats (IDX, CIFAR, STL) are decoded once into a memory-mapped uint8 cache (array_cache.py); file formats
(imagefolder, flat, ImageNet) are listed here and decoded per image by the loader workers (files.py). No process
ever holds the decoded dataset.
"""
from __future__ import annotations

from pathlib import Path

from scan_dist.errors import ConfigError, DataError

from .array_cache import ArrayReader, default_cache_dir, open_array_reader
from .common import (ARRAY_FORMATS, BAD_IMAGE_POLICIES, DEFAULT_FILE_IMAGE_SIZE, FILE_FORMATS, FORMATS, SPLITS,
                     SUBSETS, check_settings, choose_indices, default_resize_size, describe, detect_format,
                     existing_dir, fashion_mnist_dir)
from .files import FileReader, probe_channels
from .folders import FileListing, list_flat, list_imagefolder
from .imagenet import list_imagenet
from .reader import BadImage, Reader

__all__ = [
    "FORMATS", "ARRAY_FORMATS", "FILE_FORMATS", "SPLITS", "SUBSETS", "BAD_IMAGE_POLICIES", "Reader", "ArrayReader",
    "FileReader", "BadImage", "detect_format", "fashion_mnist_dir", "open_dataset", "list_files", "default_cache_dir",
]


def list_files(root: Path, split: str, fmt: str, subset: str | None, max_images: int | None, seed: int) -> FileListing:
    """The (possibly subsampled) listing of a file format; cheap to pickle and broadcast to other ranks."""
    if fmt == "imagenet":
        listing = list_imagenet(root, split, subset)
    else:
        listing = {"imagefolder": list_imagefolder, "flat": list_flat}[fmt](root, split)
    total = len(listing.names)
    keep = choose_indices(total, max_images, seed)
    if keep is not None:  # before anything reads a file, so a huge folder opens fast
        listing.names = [listing.names[i] for i in keep]
        listing.targets = None if listing.targets is None else listing.targets[keep]
        listing.details = [*listing.details, f"{len(keep)} of {total} images"]
    return listing


def open_dataset(
    path: str | Path,
    split: str,
    fmt: str = "auto",
    image_size: int | None = None,
    resize_size: int | None = None,
    channels: int | None = None,
    subset: str | None = None,
    on_bad_image: str = "fail",
    include_unlabeled: bool = False,
    max_images: int | None = None,
    seed: int = 0,
    cache_dir: str | Path | None = None,
    listing: FileListing | None = None,
    log=None,
) -> Reader:
    """A reader of one split ("train" or "eval") of the dataset at `path`.

    `image_size` is the side of the square the network sees: None keeps the native size of array formats (28 IDX,
    32 CIFAR, 96 STL) and uses 64 for image files. Array formats are stored at that size (resized once: shorter
    side, then centre crop); image files are decoded with the shorter side at `resize_size` (default
    image_size * 256/224) and cropped per view. `channels` None keeps the native channel count (files: 1 only if
    the probed headers are all grayscale). `max_images` keeps a seeded random subset, in original order.
    `include_unlabeled` only affects the STL-10 train split; `subset` only ImageNet. `listing`: a listing already
    made (by rank 0) for this split, so other ranks do not walk the folder again.
    """
    check_settings(split, fmt, image_size, channels, subset, on_bad_image, max_images, 1)
    if resize_size is not None and image_size is not None and resize_size < image_size:
        raise ConfigError(f"data.resize_size={resize_size} must be at least data.image_size={image_size}")
    root = existing_dir(path)
    if fmt == "auto":
        fmt = detect_format(root)
    if subset is not None and fmt != "imagenet":
        raise ConfigError(
            f"data.subset={subset!r} only applies to ImageNet but data.format is {fmt!r}; "
            "unset data.subset or point data.path at ImageNet"
        )
    if fmt in ARRAY_FORMATS:
        return open_array_reader(root, fmt, split, image_size, channels, include_unlabeled, max_images, seed,
                                 cache_dir, log=log)
    listing = listing or list_files(root, split, fmt, subset, max_images, seed)
    size = image_size or DEFAULT_FILE_IMAGE_SIZE
    if channels is None:
        try:
            channels = probe_channels(listing.root, listing.names, on_bad_image)
        except BadImage as exc:
            raise DataError(f"{exc}; replace or delete it, or set data.on_bad_image=skip") from None
    return FileReader(listing, size, resize_size or default_resize_size(size), channels,
                      source=describe(listing.source, listing.details))
