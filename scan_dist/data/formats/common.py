"""What every dataset reader shares: the format names, layout detection, folder walking and setting checks.

Anything a user can fix (a missing folder, an unknown layout, a bad setting) is raised as a one-line `DataError` /
`ConfigError` naming the path or the setting.
"""
from __future__ import annotations

import numbers
import os
import re
from pathlib import Path

import numpy as np

from scan_dist.errors import ConfigError, DataError

FORMATS = ("idx", "imagefolder", "flat", "imagenet", "cifar10", "cifar100", "cifar20", "stl10")
ARRAY_FORMATS = ("idx", "cifar10", "cifar100", "cifar20", "stl10")
FILE_FORMATS = ("imagefolder", "flat", "imagenet")
SPLITS = ("train", "eval")
SUBSETS = ("imagenet50", "imagenet100", "imagenet200")
BAD_IMAGE_POLICIES = ("fail", "skip")
IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"})
DEFAULT_FILE_IMAGE_SIZE = 64
# Image files are resized so the shorter side is image_size * 256 / 224 before the crop (the paper's ImageNet chain).
RESIZE_RATIO = 256 / 224

WNID = re.compile(r"n\d{8}")
IMAGENET_TRAIN_DIRS = ("train", "ILSVRC2012_img_train")

_EXPECTED_LAYOUTS = (
    "IDX files (train-images-idx3-ubyte[.gz], t10k-...), CIFAR-10 (data_batch_1..5, test_batch"
    " or cifar-10-batches-py/), CIFAR-100 (train, test or cifar-100-python/), STL-10 (train_X.bin,"
    " test_X.bin or stl10_binary/), ImageNet (train/<wnid>/*.JPEG), class folders (<class>/*.png)"
    " or a folder of images"
)
_FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")


def fashion_mnist_dir() -> Path:
    """Where Debian's fashion-mnist package installs the dataset (used by the demo presets)."""
    return _FASHION_MNIST_DIR


def short_side_size(height: int, width: int, size: int) -> tuple[int, int]:
    """(height, width) after scaling so the shorter side equals `size`."""
    if height <= width:
        return size, max(size, round(width * size / height))
    return max(size, round(height * size / width)), size


def default_resize_size(image_size: int) -> int:
    """Shorter side of a decoded file before its crop: 256 for the paper's 224."""
    return int(round(image_size * RESIZE_RATIO))


# --------------------------------------------------------------------------------------------
# Format detection
# --------------------------------------------------------------------------------------------


def detect_format(path: str | Path) -> str:
    """Guess the dataset layout of `path` from the files present (see FORMATS)."""
    root = existing_dir(path)
    if _has_idx(root):
        return "idx"
    if _has_cifar10(root):
        return "cifar10"
    if _has_cifar100(root):
        return "cifar20"  # the SCAN paper evaluates CIFAR-100 on its 20 super-classes
    if _has_stl10(root):
        return "stl10"
    if _has_imagenet(root):
        return "imagenet"
    if _has_class_folders(root):
        return "imagefolder"
    if any(_is_image_file(entry) for entry in visible_entries(root)):
        return "flat"
    raise DataError(
        f"data.path {root}: no known dataset layout found; expected {_EXPECTED_LAYOUTS}"
        " (or set data.format)"
    )


def existing_dir(path: str | Path) -> Path:
    root = Path(path).expanduser()
    if not root.exists():
        raise DataError(f"data.path {root} does not exist; point data.path at the dataset folder")
    if not root.is_dir():
        raise DataError(f"data.path {root} is a file, not a folder; point data.path at the folder holding the dataset")
    if not any(visible_entries(root)):
        raise DataError(f"data.path {root} is an empty folder; put the dataset there or fix data.path")
    return root


def visible_entries(folder: Path) -> list[os.DirEntry]:
    # Dot-files (.DS_Store, macOS "._x.jpg" forks, .ipynb_checkpoints) are never data.
    with os.scandir(folder) as it:
        return [entry for entry in it if not entry.name.startswith(".")]


def visible_subdirs(folder: Path) -> list[Path]:
    return sorted(Path(e.path) for e in visible_entries(folder) if e.is_dir())


def is_image_name(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def _is_image_file(entry: os.DirEntry) -> bool:
    return is_image_name(entry.name) and entry.is_file()


def _has_idx(root: Path) -> bool:
    return any(
        (root / f"{prefix}-images-idx3-ubyte{gz}").is_file()
        for prefix in ("train", "t10k")
        for gz in ("", ".gz")
    )


def _has_cifar10(root: Path) -> bool:
    return (
        (root / "data_batch_1").is_file()
        or (root / "test_batch").is_file()
        or (root / "cifar-10-batches-py").is_dir()
    )


def _has_cifar100(root: Path) -> bool:
    # Checked with is_file: an image-folder dataset may well have a train/ *directory*.
    return (root / "train").is_file() or (root / "test").is_file() or (root / "cifar-100-python").is_dir()


def _has_stl10(root: Path) -> bool:
    return any((root / f"{part}_X.bin").is_file() for part in ("train", "test", "unlabeled")) or (
        root / "stl10_binary"
    ).is_dir()


def _has_imagenet(root: Path) -> bool:
    for name in IMAGENET_TRAIN_DIRS:
        if (root / name).is_dir():
            subdirs = visible_subdirs(root / name)
            if subdirs and all(WNID.fullmatch(d.name) for d in subdirs):
                return True
    return False


def _has_class_folders(root: Path) -> bool:
    base = root / "train" if (root / "train").is_dir() else root
    return any(_contains_image(d) for d in visible_subdirs(base))


def _contains_image(folder: Path) -> bool:
    """True as soon as one image is found below `folder` (stops early on big trees)."""
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        if any(not f.startswith(".") and is_image_name(f) for f in filenames):
            return True
    return False



def check_settings(split, fmt, image_size, channels, subset, on_bad_image, max_images, num_threads) -> None:
    if split not in SPLITS:
        raise ConfigError(f"split={split!r} is not supported; use 'train' or 'eval'")
    if fmt != "auto" and fmt not in FORMATS:
        raise ConfigError(f"data.format={fmt!r} is not supported; use 'auto' or one of: {', '.join(FORMATS)}")
    if subset is not None and subset not in SUBSETS:
        raise ConfigError(f"data.subset={subset!r} is not supported; use one of: {', '.join(SUBSETS)} (or leave it unset)")
    if on_bad_image not in BAD_IMAGE_POLICIES:
        raise ConfigError(f"data.on_bad_image={on_bad_image!r} is not supported; use 'fail' or 'skip'")
    if image_size is not None and not _is_positive_int(image_size):
        raise ConfigError(f"data.image_size={image_size!r} must be a positive number of pixels, or unset for the native size")
    if channels is not None and channels not in (1, 3):
        raise ConfigError(f"data.channels={channels!r} must be 1, 3, or unset for the native channel count")
    if max_images is not None and not _is_positive_int(max_images):
        raise ConfigError(f"data.max_images={max_images!r} must be a positive integer, or unset to use every image")
    if not _is_positive_int(num_threads):
        raise ConfigError(f"num_threads={num_threads!r} must be a positive integer")


def _is_positive_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool) and value > 0


def choose_indices(n: int, max_images: int | None, seed: int) -> np.ndarray | None:
    """Seeded random subset of range(n) in ascending order, or None to keep everything."""
    if max_images is None or max_images >= n:
        return None
    picked = np.random.default_rng(seed).choice(n, size=int(max_images), replace=False)
    return np.sort(picked)


def describe(source: str, details: list[str]) -> str:
    return f"{source} ({', '.join(details)})"


