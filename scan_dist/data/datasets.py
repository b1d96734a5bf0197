"""Dataset readers: decode every supported on-disk layout into one in-memory uint8 tensor.

Every SCAN stage (pretext training, neighbour mining, clustering, self-labelling) works on a
fixed-size image tensor held in memory, so this module turns whatever `data.path` points at
(Fashion-MNIST/MNIST IDX files, CIFAR-10/100 pickles, STL-10 binaries, an ImageNet tree, labelled
class folders or a plain folder of images) into an `ImageSet`: images of one size and channel
count, plus labels and class names when the data has them.

Anything a user can fix (missing files, corrupt data, bad settings) is raised as a one-line
`DataError` / `ConfigError` naming the file or setting.
"""

from __future__ import annotations

import csv
import gzip
import math
import numbers
import os
import pickle
import re
import struct
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

from scan_dist.errors import ConfigError, DataError

__all__ = [
    "FORMATS",
    "ImageSet",
    "detect_format",
    "fashion_mnist_dir",
    "open_dataset",
]

FORMATS = ("idx", "imagefolder", "flat", "imagenet", "cifar10", "cifar100", "cifar20", "stl10")
SPLITS = ("train", "eval")
SUBSETS = ("imagenet50", "imagenet100", "imagenet200")
BAD_IMAGE_POLICIES = ("fail", "skip")
IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"})
DEFAULT_FILE_IMAGE_SIZE = 64

FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
CIFAR10_CLASSES = (
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
)
CIFAR20_CLASSES = (
    "aquatic_mammals", "fish", "flowers", "food_containers", "fruit_and_vegetables",
    "household_electrical_devices", "household_furniture", "insects", "large_carnivores",
    "large_man-made_outdoor_things", "large_natural_outdoor_scenes",
    "large_omnivores_and_herbivores", "medium_mammals", "non-insect_invertebrates", "people",
    "reptiles", "small_mammals", "trees", "vehicles_1", "vehicles_2",
)
STL10_CLASSES = (
    "airplane", "bird", "car", "cat", "deer", "dog", "horse", "monkey", "ship", "truck",
)
# CIFAR-100 fine label (0..99) -> CIFAR-20 super-class; SCAN evaluates CIFAR-100 on these 20.
CIFAR100_COARSE_OF_FINE = (
    4, 1, 14, 8, 0, 6, 7, 7, 18, 3, 3, 14, 9, 18, 7, 11, 3, 9, 7, 11,
    6, 11, 5, 10, 7, 6, 13, 15, 3, 15, 0, 11, 1, 10, 12, 14, 16, 9, 11, 5,
    5, 19, 8, 8, 15, 13, 14, 17, 18, 10, 16, 4, 17, 4, 2, 0, 17, 4, 18, 17,
    10, 3, 2, 12, 12, 16, 12, 1, 9, 19, 2, 10, 0, 1, 16, 12, 9, 13, 15, 13,
    16, 19, 2, 4, 6, 19, 5, 5, 8, 19, 18, 1, 2, 15, 6, 0, 17, 8, 14, 13,
)
assert len(CIFAR100_COARSE_OF_FINE) == 100 and set(CIFAR100_COARSE_OF_FINE) == set(range(20))

_FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
_SUBSET_DIR = Path(__file__).resolve().parent / "imagenet_subsets"
_WNID = re.compile(r"n\d{8}")
_IMAGENET_TRAIN_DIRS = ("train", "ILSVRC2012_img_train")
_IMAGENET_VAL_DIRS = ("val", "ILSVRC2012_img_val")
_IMAGENET_VAL_CSV = "LOC_val_solution.csv"
_IMAGENET_SYNSETS = "LOC_synset_mapping.txt"
_CIFAR_SIDE = 32
_STL_SIDE = 96
_STL_IMAGE_BYTES = 3 * _STL_SIDE * _STL_SIDE
_GRAY_MODES = frozenset({"1", "L", "LA", "La", "I", "F"})

_EXPECTED_LAYOUTS = (
    "IDX files (train-images-idx3-ubyte[.gz], t10k-...), CIFAR-10 (data_batch_1..5, test_batch"
    " or cifar-10-batches-py/), CIFAR-100 (train, test or cifar-100-python/), STL-10 (train_X.bin,"
    " test_X.bin or stl10_binary/), ImageNet (train/<wnid>/*.JPEG), class folders (<class>/*.png)"
    " or a folder of images"
)


@dataclass
class ImageSet:
    """One split of a dataset, decoded into memory at a fixed size."""

    images: torch.Tensor  # uint8 [N, C, S, S], C in {1, 3}, contiguous
    targets: np.ndarray | None  # int64 [N]; None when the data has no labels
    class_names: list[str] | None  # index -> name (None without labels)
    names: list[str] | None  # file-based data: path relative to the dataset root
    source: str  # short human description
    skipped: list[str] = field(default_factory=list)  # unreadable files (on_bad_image="skip")

    def __post_init__(self) -> None:
        # Cheap shape checks here catch loader bugs long before a training run trips on them.
        images = self.images
        if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] not in (1, 3):
            raise ValueError(f"ImageSet.images must be uint8 [N, 1|3, S, S], got {images.dtype} {tuple(images.shape)}")
        if images.shape[2] != images.shape[3]:
            raise ValueError(f"ImageSet.images must be square, got {tuple(images.shape)}")
        n = images.shape[0]
        if self.targets is not None and len(self.targets) != n:
            raise ValueError(f"ImageSet has {n} images but {len(self.targets)} targets")
        if self.names is not None and len(self.names) != n:
            raise ValueError(f"ImageSet has {n} images but {len(self.names)} names")

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def num_classes(self) -> int | None:
        return None if self.class_names is None else len(self.class_names)


def fashion_mnist_dir() -> Path:
    """Where Debian's fashion-mnist package installs the dataset (used by the demo presets)."""
    return _FASHION_MNIST_DIR


# --------------------------------------------------------------------------------------------
# Format detection
# --------------------------------------------------------------------------------------------


def detect_format(path: str | Path) -> str:
    """Guess the dataset layout of `path` from the files present (see FORMATS)."""
    root = _existing_dir(path)
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
    if any(_is_image_file(entry) for entry in _visible_entries(root)):
        return "flat"
    raise DataError(
        f"data.path {root}: no known dataset layout found; expected {_EXPECTED_LAYOUTS}"
        " (or set data.format)"
    )


def _existing_dir(path: str | Path) -> Path:
    root = Path(path).expanduser()
    if not root.exists():
        raise DataError(f"data.path {root} does not exist; point data.path at the dataset folder")
    if not root.is_dir():
        raise DataError(f"data.path {root} is a file, not a folder; point data.path at the folder holding the dataset")
    if not any(_visible_entries(root)):
        raise DataError(f"data.path {root} is an empty folder; put the dataset there or fix data.path")
    return root


def _visible_entries(folder: Path) -> list[os.DirEntry]:
    # Dot-files (.DS_Store, macOS "._x.jpg" forks, .ipynb_checkpoints) are never data.
    with os.scandir(folder) as it:
        return [entry for entry in it if not entry.name.startswith(".")]


def _visible_subdirs(folder: Path) -> list[Path]:
    return sorted(Path(e.path) for e in _visible_entries(folder) if e.is_dir())


def _is_image_name(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def _is_image_file(entry: os.DirEntry) -> bool:
    return _is_image_name(entry.name) and entry.is_file()


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
    for name in _IMAGENET_TRAIN_DIRS:
        if (root / name).is_dir():
            subdirs = _visible_subdirs(root / name)
            if subdirs and all(_WNID.fullmatch(d.name) for d in subdirs):
                return True
    return False


def _has_class_folders(root: Path) -> bool:
    base = root / "train" if (root / "train").is_dir() else root
    return any(_contains_image(d) for d in _visible_subdirs(base))


def _contains_image(folder: Path) -> bool:
    """True as soon as one image is found below `folder` (stops early on big trees)."""
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        if any(not f.startswith(".") and _is_image_name(f) for f in filenames):
            return True
    return False


# --------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------


def open_dataset(
    path: str | Path,
    split: str,
    fmt: str = "auto",
    image_size: int | None = None,
    channels: int | None = None,
    subset: str | None = None,
    on_bad_image: str = "fail",
    include_unlabeled: bool = False,
    max_images: int | None = None,
    seed: int = 0,
    num_threads: int = 4,
    progress: bool = True,
) -> ImageSet:
    """Read one split ("train" or "eval") of the dataset at `path` into memory.

    `image_size` None keeps the native size of array formats (28 IDX, 32 CIFAR, 96 STL) and
    uses 64 for image files; otherwise images are resized so the shorter side is `image_size`,
    then center-cropped square. `channels` None keeps the native channel count (files: 1 only
    if every image is grayscale). `max_images` keeps a seeded random subset, in original order.
    `include_unlabeled` only affects the STL-10 train split; `subset` only ImageNet.
    """
    _check_settings(split, fmt, image_size, channels, subset, on_bad_image, max_images, num_threads)
    root = _existing_dir(path)
    if fmt == "auto":
        fmt = detect_format(root)
    if subset is not None and fmt != "imagenet":
        raise ConfigError(
            f"data.subset={subset!r} only applies to ImageNet but data.format is {fmt!r}; "
            "unset data.subset or point data.path at ImageNet"
        )

    if fmt in _ARRAY_LOADERS:
        source = _ARRAY_LOADERS[fmt](root, split, include_unlabeled)
        return _finish_arrays(source, image_size, channels, max_images, seed)

    if fmt == "imagenet":
        files = _imagenet_files(root, split, subset)
    else:
        files = _FILE_LOADERS[fmt](root, split)
    return _finish_files(
        files, split, image_size or DEFAULT_FILE_IMAGE_SIZE, channels,
        on_bad_image, max_images, seed, num_threads, progress,
    )


def _check_settings(split, fmt, image_size, channels, subset, on_bad_image, max_images, num_threads) -> None:
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


def _choose_indices(n: int, max_images: int | None, seed: int) -> np.ndarray | None:
    """Seeded random subset of range(n) in ascending order, or None to keep everything."""
    if max_images is None or max_images >= n:
        return None
    picked = np.random.default_rng(seed).choice(n, size=int(max_images), replace=False)
    return np.sort(picked)


def _describe(source: str, details: list[str]) -> str:
    return f"{source} ({', '.join(details)})"


# --------------------------------------------------------------------------------------------
# Array formats (IDX, CIFAR, STL-10): labelled uint8 arrays at a native size
# --------------------------------------------------------------------------------------------


@dataclass
class _ArrayPart:
    images: np.ndarray  # uint8 [n, C, H, W]; may be a lazy memmap view
    targets: np.ndarray  # int64 [n]


@dataclass
class _ArraySource:
    parts: list[_ArrayPart]
    class_names: list[str]
    source: str  # "fmt:location"
    details: list[str]  # split description for ImageSet.source


def _finish_arrays(src: _ArraySource, image_size, channels, max_images, seed) -> ImageSet:
    total = sum(len(part.targets) for part in src.parts)
    keep = _choose_indices(total, max_images, seed)
    images, targets = _gather_parts(src.parts, keep)
    _check_targets(targets, len(src.class_names), src.source)
    if channels == 1 and images.shape[1] == 3:
        images = _rgb_to_luminance(images)
    if image_size is not None:
        images = _resize_arrays(images, image_size)
    if channels == 3 and images.shape[1] == 1:
        images = np.repeat(images, 3, axis=1)
    details = list(src.details)
    if keep is not None:
        details.append(f"{len(keep)} of {total} images")
    return ImageSet(
        images=_to_tensor(images),
        targets=targets,
        class_names=list(src.class_names),
        names=None,
        source=_describe(src.source, details),
    )


def _gather_parts(parts: list[_ArrayPart], keep: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """Concatenate the parts, reading only the kept rows (parts may be memmaps of GBs)."""
    images, targets = [], []
    offset = 0
    for part in parts:
        n = len(part.targets)
        if keep is None:
            rows = slice(None)
        else:
            rows = keep[(keep >= offset) & (keep < offset + n)] - offset
        images.append(np.asarray(part.images[rows]))
        targets.append(np.asarray(part.targets[rows], dtype=np.int64))
        offset += n
    return np.concatenate(images), np.concatenate(targets)


def _check_targets(targets: np.ndarray, num_classes: int, source: str) -> None:
    labelled = targets[targets >= 0]  # -1 marks STL-10's unlabeled images
    if len(labelled) and labelled.max() >= num_classes:
        raise DataError(f"{source}: label {int(labelled.max())} is out of range for {num_classes} classes; the dataset files are inconsistent")


def _to_tensor(images: np.ndarray) -> torch.Tensor:
    # np.require copies read-only buffers (frombuffer / memmap) that torch cannot share safely.
    return torch.from_numpy(np.require(images, np.uint8, ["C_CONTIGUOUS", "WRITEABLE"]))


def _rgb_to_luminance(images: np.ndarray, chunk: int = 1024) -> np.ndarray:
    """[N,3,H,W] -> [N,1,H,W] with PIL's fixed-point ITU-R 601-2 weights, so arrays match files."""
    out = np.empty((images.shape[0], 1) + images.shape[2:], np.uint8)
    for start in range(0, images.shape[0], chunk):
        rgb = images[start:start + chunk].astype(np.uint32)
        lum = (rgb[:, 0] * 19595 + rgb[:, 1] * 38470 + rgb[:, 2] * 7471 + 0x8000) >> 16
        out[start:start + chunk, 0] = lum
    return out


def _short_side_size(height: int, width: int, size: int) -> tuple[int, int]:
    """(height, width) after scaling so the shorter side equals `size`."""
    if height <= width:
        return size, max(size, round(width * size / height))
    return max(size, round(height * size / width)), size


def _resize_arrays(images: np.ndarray, size: int, chunk: int = 256) -> np.ndarray:
    """Shorter side to `size` (bilinear, antialiased), then center crop; chunked to bound memory."""
    n, c, height, width = images.shape
    if height == size and width == size:
        return images
    new_h, new_w = _short_side_size(height, width, size)
    top, left = (new_h - size) // 2, (new_w - size) // 2
    out = np.empty((n, c, size, size), np.uint8)
    for start in range(0, n, chunk):
        batch = torch.from_numpy(np.array(images[start:start + chunk], dtype=np.float32))
        resized = F.interpolate(batch, size=(new_h, new_w), mode="bilinear", align_corners=False, antialias=True)
        cropped = resized[:, :, top:top + size, left:left + size]
        out[start:start + chunk] = cropped.round_().clamp_(0, 255).to(torch.uint8).numpy()
    return out


# ---- IDX (MNIST / Fashion-MNIST) -------------------------------------------------------------


def _load_idx(root: Path, split: str, include_unlabeled: bool) -> _ArraySource:
    prefix = "train" if split == "train" else "t10k"
    image_file = _find_idx_file(root, f"{prefix}-images-idx3-ubyte")
    label_file = _find_idx_file(root, f"{prefix}-labels-idx1-ubyte")
    images = _read_idx(image_file, ndim=3)
    labels = _read_idx(label_file, ndim=1).astype(np.int64)
    if len(labels) != len(images):
        raise DataError(f"{label_file}: holds {len(labels)} labels but {image_file.name} holds {len(images)} images; re-download the dataset")
    return _ArraySource(
        parts=[_ArrayPart(images[:, None], labels)],
        class_names=_idx_class_names(root, labels),
        source=f"idx:{root}",
        details=[split],
    )


def _find_idx_file(root: Path, stem: str) -> Path:
    for candidate in (root / stem, root / f"{stem}.gz"):
        if candidate.is_file():
            return candidate
    raise DataError(f"{root / stem}[.gz]: file not found; an IDX dataset needs it (re-download the dataset)")


def _read_idx(path: Path, ndim: int) -> np.ndarray:
    """Parse an IDX file of unsigned bytes: 0x00 0x00 0x08 <ndim>, big-endian uint32 dims, data."""
    raw = _read_bytes(path)
    header_size = 4 + 4 * ndim
    if len(raw) < header_size or raw[:3] != b"\x00\x00\x08" or raw[3] != ndim:
        magic = raw[:4].hex() if len(raw) >= 4 else "missing"
        raise DataError(f"{path}: bad IDX magic number ({magic}, expected 00000803 for images / 00000801 for labels); the file is corrupt, re-download it")
    shape = struct.unpack(f">{ndim}I", raw[4:header_size])
    expected = math.prod(shape)
    if len(raw) - header_size != expected:
        raise DataError(f"{path}: IDX header promises {expected} bytes of data {shape} but the file holds {len(raw) - header_size}; the file is truncated or corrupt, re-download it")
    return np.frombuffer(raw, dtype=np.uint8, offset=header_size).reshape(shape)


def _read_bytes(path: Path) -> bytes:
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                return f.read()
        return path.read_bytes()
    except (OSError, EOFError) as exc:
        raise DataError(f"{path}: cannot read ({exc}); re-download the file") from exc


def _idx_class_names(root: Path, labels: np.ndarray) -> list[str]:
    names = [root.name, root.resolve().name]
    if any("fashion" in name.lower() for name in names):
        return list(FASHION_MNIST_CLASSES)
    # Plain IDX data may be EMNIST-like with more than 10 classes; name them by number.
    num_classes = max(10, int(labels.max()) + 1 if len(labels) else 0)
    return [str(i) for i in range(num_classes)]


# ---- CIFAR-10 / CIFAR-100 pickles --------------------------------------------------------------


try:  # numpy >= 2 moved the array pickle helpers; old pickles still name numpy.core
    from numpy._core import multiarray as _np_multiarray
except ImportError:  # pragma: no cover - numpy 1.x
    from numpy.core import multiarray as _np_multiarray


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickler that can only rebuild numpy arrays, so a crafted dataset file cannot run code."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),  # how protocol-2 pickles from Python 3 store bytes
    }

    def find_class(self, module: str, name: str):
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        if module.startswith("numpy."):
            return getattr(_np_multiarray, name)
        if module == "numpy":
            return getattr(np, name)
        return super().find_class(module, name)


def _load_pickle(path: Path) -> dict:
    if not path.is_file():
        raise DataError(f"{path}: file not found; re-download the dataset")
    try:
        with open(path, "rb") as f:
            obj = _ArrayUnpickler(f, encoding="bytes").load()
    except Exception as exc:  # corrupt pickles raise many exception types
        raise DataError(f"{path}: not a readable dataset pickle ({exc}); re-download the dataset") from exc
    if not isinstance(obj, dict):
        raise DataError(f"{path}: expected a pickled dict, found {type(obj).__name__}; re-download the dataset")
    return obj


def _pickle_get(batch: dict, key: str, path: Path, required: bool = True):
    # Original files (pickled by Python 2) have bytes keys; re-pickled copies may use str keys.
    for candidate in (key.encode(), key):
        if candidate in batch:
            return batch[candidate]
    if required:
        raise DataError(f"{path}: missing key {key!r}; this is not a CIFAR pickle, re-download the dataset")
    return None


def _decode_names(values) -> list[str]:
    return [v.decode() if isinstance(v, bytes) else str(v) for v in values]


def _cifar_dir(root: Path, inner: str, markers: tuple[str, ...]) -> Path:
    if any((root / name).is_file() for name in markers):
        return root
    if (root / inner).is_dir():
        return root / inner
    raise DataError(f"data.path {root}: no {', '.join(markers)} files nor {inner}/ folder found; point data.path at the extracted dataset")


def _cifar_batch(path: Path, label_key: str) -> tuple[np.ndarray, np.ndarray, dict]:
    batch = _load_pickle(path)
    data = np.asarray(_pickle_get(batch, "data", path))
    labels = np.asarray(_pickle_get(batch, label_key, path), dtype=np.int64)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * _CIFAR_SIDE * _CIFAR_SIDE:
        raise DataError(f"{path}: 'data' is {data.dtype} {data.shape}, expected uint8 [N, 3072]; re-download the dataset")
    if len(labels) != len(data):
        raise DataError(f"{path}: holds {len(data)} images but {len(labels)} labels; re-download the dataset")
    return data.reshape(-1, 3, _CIFAR_SIDE, _CIFAR_SIDE), labels, batch


def _load_cifar10(root: Path, split: str, include_unlabeled: bool) -> _ArraySource:
    folder = _cifar_dir(root, "cifar-10-batches-py", ("data_batch_1", "test_batch"))
    files = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
    parts = []
    for name in files:
        images, labels, _ = _cifar_batch(folder / name, "labels")
        parts.append(_ArrayPart(images, labels))
    names = list(CIFAR10_CLASSES)
    meta_path = folder / "batches.meta"
    if meta_path.is_file():
        names = _decode_names(_pickle_get(_load_pickle(meta_path), "label_names", meta_path))
    return _ArraySource(parts, names, f"cifar10:{folder}", [split])


def _load_cifar100(root: Path, split: str, include_unlabeled: bool) -> _ArraySource:
    folder, images, fine = _cifar100_split(root, split)[:3]
    meta = _cifar100_meta(folder)
    names = [str(i) for i in range(100)]
    if meta is not None:
        names = _decode_names(_pickle_get(meta, "fine_label_names", folder / "meta"))
    return _ArraySource([_ArrayPart(images, fine)], names, f"cifar100:{folder}", [split])


def _load_cifar20(root: Path, split: str, include_unlabeled: bool) -> _ArraySource:
    folder, images, fine, batch, path = _cifar100_split(root, split)
    if len(fine) and (fine.min() < 0 or fine.max() > 99):
        raise DataError(f"{path}: fine labels must lie in 0..99; re-download the dataset")
    coarse = np.asarray(CIFAR100_COARSE_OF_FINE, dtype=np.int64)[fine]
    stored = _pickle_get(batch, "coarse_labels", path, required=False)
    if stored is not None and not np.array_equal(np.asarray(stored, dtype=np.int64), coarse):
        raise DataError(f"{path}: coarse_labels disagree with the CIFAR-100 fine->coarse table; the file is corrupt, re-download it")
    names = list(CIFAR20_CLASSES)
    meta = _cifar100_meta(folder)
    if meta is not None:
        names = _decode_names(_pickle_get(meta, "coarse_label_names", folder / "meta"))
    return _ArraySource([_ArrayPart(images, coarse)], names, f"cifar20:{folder}", [split])


def _cifar100_split(root: Path, split: str):
    folder = _cifar_dir(root, "cifar-100-python", ("train", "test"))
    path = folder / ("train" if split == "train" else "test")
    images, fine, batch = _cifar_batch(path, "fine_labels")
    return folder, images, fine, batch, path


def _cifar100_meta(folder: Path) -> dict | None:
    meta_path = folder / "meta"
    return _load_pickle(meta_path) if meta_path.is_file() else None


# ---- STL-10 binaries ----------------------------------------------------------------------------


def _load_stl10(root: Path, split: str, include_unlabeled: bool) -> _ArraySource:
    folder = root if _has_stl10_files(root) else root / "stl10_binary"
    if not folder.is_dir():
        raise DataError(f"data.path {root}: no train_X.bin/test_X.bin nor stl10_binary/ folder found; point data.path at the extracted STL-10 binaries")
    prefix = "train" if split == "train" else "test"
    images = _stl_images(folder / f"{prefix}_X.bin")
    labels = _stl_labels(folder / f"{prefix}_y.bin", len(images))
    parts = [_ArrayPart(images, labels)]
    details = [split]
    if include_unlabeled and split == "train":
        unlabeled = _stl_images(folder / "unlabeled_X.bin")
        parts.append(_ArrayPart(unlabeled, np.full(len(unlabeled), -1, dtype=np.int64)))
        details = ["train+unlabeled"]
    return _ArraySource(parts, _stl_class_names(folder), f"stl10:{folder}", details)


def _has_stl10_files(folder: Path) -> bool:
    return any((folder / f"{part}_X.bin").is_file() for part in ("train", "test", "unlabeled"))


def _stl_images(path: Path) -> np.ndarray:
    """Lazy [N,3,96,96] view; the file stores each channel column-major, hence the transpose."""
    if not path.is_file():
        raise DataError(f"{path}: file not found; re-download the STL-10 binaries")
    size = path.stat().st_size
    if size == 0 or size % _STL_IMAGE_BYTES:
        raise DataError(f"{path}: size {size} bytes is not a whole number of 3x96x96 images; the file is truncated, re-download it")
    count = size // _STL_IMAGE_BYTES
    stored = np.memmap(path, dtype=np.uint8, mode="r", shape=(count, 3, _STL_SIDE, _STL_SIDE))
    return stored.transpose(0, 1, 3, 2)


def _stl_labels(path: Path, count: int) -> np.ndarray:
    if not path.is_file():
        raise DataError(f"{path}: file not found; re-download the STL-10 binaries")
    labels = np.fromfile(path, dtype=np.uint8).astype(np.int64)
    if len(labels) != count:
        raise DataError(f"{path}: holds {len(labels)} labels but the image file holds {count} images; re-download the dataset")
    if len(labels) and (labels.min() < 1 or labels.max() > 10):
        raise DataError(f"{path}: labels must lie in 1..10; the file is corrupt, re-download it")
    return labels - 1


def _stl_class_names(folder: Path) -> list[str]:
    path = folder / "class_names.txt"
    if not path.is_file():
        return list(STL10_CLASSES)
    names = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if len(names) != 10:
        raise DataError(f"{path}: expected 10 class names, found {len(names)}; fix or delete the file")
    return names


_ARRAY_LOADERS = {
    "idx": _load_idx,
    "cifar10": _load_cifar10,
    "cifar100": _load_cifar100,
    "cifar20": _load_cifar20,
    "stl10": _load_stl10,
}


# --------------------------------------------------------------------------------------------
# File formats (image folders, flat folders, ImageNet): lists of files decoded with PIL
# --------------------------------------------------------------------------------------------


@dataclass
class _FileSource:
    root: Path  # dataset root; names are relative to it
    files: list[Path]
    targets: np.ndarray | None
    class_names: list[str] | None
    source: str  # "fmt:location"
    details: list[str]


def _list_images(folder: Path) -> list[Path]:
    """Image files below `folder` (recursively, following symlinked folders), sorted by path."""
    found = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        found.extend(Path(dirpath, f) for f in filenames if not f.startswith(".") and _is_image_name(f))
    return sorted(found, key=lambda p: p.as_posix())


def _labelled_files(root: Path, entries: list[tuple[Path, int]]) -> tuple[list[Path], np.ndarray]:
    """Sort (file, target) pairs by path relative to `root` so results never depend on class order."""
    entries = sorted(entries, key=lambda e: e[0].relative_to(root).as_posix())
    files = [path for path, _ in entries]
    return files, np.array([target for _, target in entries], dtype=np.int64)


def _class_folders(folder: Path) -> dict[str, list[Path]]:
    """Class name -> images, for each visible subfolder holding at least one image."""
    classes = {}
    for sub in _visible_subdirs(folder):
        images = _list_images(sub)
        if images:
            classes[sub.name] = images
    return classes


def _load_imagefolder(root: Path, split: str) -> _FileSource:
    train_dir = root / "train" if (root / "train").is_dir() else root
    train_classes = _class_folders(train_dir)
    if not train_classes:
        raise DataError(f"{train_dir}: no class subfolders with images found; an image-folder dataset needs <class>/*.png (or use data.format=flat)")
    class_names = sorted(train_classes)
    folder, classes = train_dir, train_classes
    if split == "eval":
        folder = _imagefolder_eval_dir(root, train_dir)
        classes = train_classes if folder == train_dir else _class_folders(folder)
        if not classes:
            raise DataError(f"{folder}: no class subfolders with images found; put eval images in <class>/ folders")
        unknown = sorted(set(classes) - set(class_names))
        if unknown:
            raise DataError(f"{folder}: eval classes {', '.join(unknown[:5])} are not in the train folder {train_dir}; eval classes must be a subset of train classes")
    index = {name: i for i, name in enumerate(class_names)}
    entries = [(path, index[name]) for name, paths in classes.items() for path in paths]
    files, targets = _labelled_files(root, entries)
    return _FileSource(root, files, targets, class_names, f"imagefolder:{folder}", [split])


def _imagefolder_eval_dir(root: Path, train_dir: Path) -> Path:
    if train_dir == root:
        return root
    for name in ("val", "test"):
        if (root / name).is_dir():
            return root / name
    return train_dir  # no held-out split: eval reuses the training images (clustering is unsupervised)


def _load_flat(root: Path, split: str) -> _FileSource:
    files = _list_images(root)
    if not files:
        raise DataError(f"{root}: no image files ({', '.join(sorted(IMAGE_EXTENSIONS))}) found; fix data.path")
    return _FileSource(root, files, None, None, f"flat:{root}", [split])


_FILE_LOADERS = {"imagefolder": _load_imagefolder, "flat": _load_flat}


# ---- ImageNet --------------------------------------------------------------------------------


_KAGGLE_IMAGES = Path("ILSVRC") / "Data" / "CLS-LOC"


def _imagenet_files(root: Path, split: str, subset: str | None) -> _FileSource:
    # Kaggle's download keeps the images under ILSVRC/Data/CLS-LOC/{train,val} and the csv/mapping at its root.
    download_root = root
    if not any((root / name).is_dir() for name in _IMAGENET_TRAIN_DIRS) and (root / _KAGGLE_IMAGES).is_dir():
        root = root / _KAGGLE_IMAGES
    train_dir = _first_dir(root, _IMAGENET_TRAIN_DIRS, "train")
    wnids, class_names = _imagenet_classes(_with_file(root, download_root, _IMAGENET_SYNSETS), train_dir, subset)
    index = {wnid: i for i, wnid in enumerate(wnids)}
    if split == "train":
        folder = train_dir
        entries = [(p, index[w]) for w in wnids for p in _list_images(train_dir / w)]
    else:
        folder = _first_dir(root, _IMAGENET_VAL_DIRS, "val")
        if any(_WNID.fullmatch(d.name) for d in _visible_subdirs(folder)):
            entries = _imagenet_val_folders(folder, index, subset)
        else:
            entries = _imagenet_val_flat(_with_file(root, download_root, _IMAGENET_VAL_CSV), folder, index, subset)
    if not entries:
        raise DataError(f"{folder}: no ImageNet images found for the selected classes; check data.path and data.subset")
    files, targets = _labelled_files(root, entries)
    details = [split] + ([subset] if subset else [])
    return _FileSource(root, files, targets, class_names, f"imagenet:{root}", details)


def _with_file(root: Path, download_root: Path, name: str) -> Path:
    """The folder holding `name`: the image root, the download root, or up to three levels above the image root."""
    for folder in (root, download_root, *list(root.parents)[:3]):
        if (folder / name).is_file():
            return folder
    return root


def _first_dir(root: Path, names: tuple[str, ...], what: str) -> Path:
    for name in names:
        if (root / name).is_dir():
            return root / name
    raise DataError(f"data.path {root}: no ImageNet {what} folder ({' or '.join(names)}) found; fix data.path")


def _imagenet_classes(root: Path, train_dir: Path, subset: str | None) -> tuple[list[str], list[str]]:
    if subset is None:
        wnids = [d.name for d in _visible_subdirs(train_dir) if _WNID.fullmatch(d.name)]
        if not wnids:
            raise DataError(f"{train_dir}: no <wnid>/ class folders (like n01440764) found; fix data.path")
        synsets = _read_synset_names(root / _IMAGENET_SYNSETS)
        return wnids, [synsets.get(w, w) for w in wnids]
    wnids, names = _read_subset_list(subset)
    for wnid in wnids:
        if not (train_dir / wnid).is_dir():
            raise DataError(f"{train_dir}: class folder {wnid} of data.subset={subset} is missing; add it or choose another data.subset")
    return wnids, names


def _read_subset_list(subset: str) -> tuple[list[str], list[str]]:
    path = _SUBSET_DIR / f"imagenet_{subset.removeprefix('imagenet')}.txt"
    wnids, names = [], []
    for line in path.read_text().splitlines():
        if line.strip():
            wnid, _, name = line.strip().partition(" ")
            wnids.append(wnid)
            names.append(name.strip() or wnid)
    return wnids, names


def _read_synset_names(path: Path) -> dict[str, str]:
    """Kaggle's LOC_synset_mapping.txt ("n01440764 tench, Tinca tinca") -> {wnid: "tench"}."""
    if not path.is_file():
        return {}
    names = {}
    for line in path.read_text().splitlines():
        wnid, _, text = line.strip().partition(" ")
        if wnid:
            names[wnid] = text.split(",")[0].strip() or wnid
    return names


def _imagenet_val_folders(folder: Path, index: dict[str, int], subset: str | None) -> list[tuple[Path, int]]:
    entries = []
    for sub in _visible_subdirs(folder):
        wnid = sub.name
        if wnid not in index:
            if subset is None:
                raise DataError(f"{sub}: val class {wnid} has no train folder; eval classes must be a subset of train classes")
            continue  # outside the chosen subset
        entries.extend((path, index[wnid]) for path in _list_images(sub))
    return entries


def _imagenet_val_flat(root: Path, folder: Path, index: dict[str, int], subset: str | None) -> list[tuple[Path, int]]:
    labels = _read_val_solution(root / _IMAGENET_VAL_CSV, folder)
    entries = []
    for path in _list_images(folder):
        wnid = labels.get(path.stem)
        if wnid is None:
            raise DataError(f"{path}: no row for {path.stem} in {root / _IMAGENET_VAL_CSV}; fix the csv or remove the image")
        if wnid not in index:
            if subset is None:
                raise DataError(f"{path}: val class {wnid} has no train folder; eval classes must be a subset of train classes")
            continue
        entries.append((path, index[wnid]))
    return entries


def _read_val_solution(csv_path: Path, val_dir: Path) -> dict[str, str]:
    """LOC_val_solution.csv: ImageId -> wnid (the first token of PredictionString)."""
    if not csv_path.is_file():
        raise DataError(f"{csv_path}: not found; the flat ImageNet val folder {val_dir} needs it for labels (or use val/<wnid>/ folders)")
    with open(csv_path, newline="") as f:
        reader = csv.DictReader(f)
        if not {"ImageId", "PredictionString"} <= set(reader.fieldnames or ()):
            raise DataError(f"{csv_path}: expected the header ImageId,PredictionString; re-download the file")
        labels = {}
        for row in reader:
            tokens = (row["PredictionString"] or "").split()
            if not tokens or not _WNID.fullmatch(tokens[0]):
                raise DataError(f"{csv_path}: row for {row['ImageId']} does not start with a wnid; re-download the file")
            labels[row["ImageId"]] = tokens[0]
    return labels


# ---- Decoding --------------------------------------------------------------------------------


def _finish_files(
    src: _FileSource, split: str, size: int, channels: int | None, on_bad_image: str,
    max_images: int | None, seed: int, num_threads: int, progress: bool,
) -> ImageSet:
    total = len(src.files)
    keep = _choose_indices(total, max_images, seed)
    files, targets = src.files, src.targets
    if keep is not None:  # before decoding, so a huge folder opens fast
        files = [files[i] for i in keep]
        targets = None if targets is None else targets[keep]
    images, ok, bad = _decode_files(files, size, channels, on_bad_image, num_threads, progress, f"decoding {src.root.name} ({split})")
    names = [f.relative_to(src.root).as_posix() for f in files]
    skipped = [names[i] for i in sorted(bad)]
    if not ok.any():
        raise DataError(f"{src.root}: all {len(files)} images are unreadable; check the files or data.path")
    if bad:
        images = images[ok]
        names = [n for n, good in zip(names, ok) if good]
        targets = None if targets is None else targets[ok]
    details = list(src.details)
    if keep is not None:
        details.append(f"{len(keep)} of {total} images")
    if skipped:
        details.append(f"{len(skipped)} unreadable skipped")
    return ImageSet(
        images=_to_tensor(images),
        targets=targets,
        class_names=None if src.class_names is None else list(src.class_names),
        names=names,
        source=_describe(src.source, details),
        skipped=skipped,
    )


def _decode_files(
    files: list[Path], size: int, channels: int | None, on_bad_image: str,
    num_threads: int, progress: bool, desc: str,
) -> tuple[np.ndarray, np.ndarray, dict[int, str]]:
    """Decode files into [N, C, size, size] on a thread pool (PIL releases the GIL while decoding).

    Returns (images, ok mask, {index: reason} for unreadable files). With channels=None each image
    keeps its own channel count during decoding; the set is 1-channel only if all were grayscale.
    """
    n = len(files)
    buf = np.zeros((n, channels or 3, size, size), np.uint8)
    gray = np.zeros(n, dtype=bool)
    bad: dict[int, str] = {}
    stop_on_error = on_bad_image == "fail"
    pool = ThreadPoolExecutor(max_workers=num_threads)
    try:
        futures = [
            pool.submit(_decode_range, files, start, stop, size, channels, buf, gray, stop_on_error)
            for start, stop in _chunk_ranges(n, num_threads)
        ]
        with tqdm(total=n, desc=desc, unit="img", disable=not progress) as bar:
            for future in as_completed(futures):
                count, failures = future.result()
                if failures and stop_on_error:
                    index = min(failures)
                    raise DataError(f"{files[index]}: unreadable image ({failures[index]}); replace or delete it, or set data.on_bad_image=skip")
                bad.update(failures)
                bar.update(count)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    ok = np.ones(n, dtype=bool)
    ok[list(bad)] = False
    if channels is None:
        buf = _unify_channels(buf, gray, ok)
    return buf, ok, bad


def _chunk_ranges(n: int, num_threads: int) -> list[tuple[int, int]]:
    # Chunks keep the number of futures small on million-image folders yet spread small sets.
    chunk = max(1, min(64, math.ceil(n / (num_threads * 4))))
    return [(start, min(start + chunk, n)) for start in range(0, n, chunk)]


def _decode_range(files, start, stop, size, channels, buf, gray, stop_on_error) -> tuple[int, dict[int, str]]:
    failures: dict[int, str] = {}
    for i in range(start, stop):
        try:
            pixels, is_gray = _decode_image(files[i], size, channels)
        except _BadImage as exc:
            failures[i] = str(exc)
            if stop_on_error:
                break
            continue
        gray[i] = is_gray
        if pixels.ndim == 2:
            buf[i, 0] = pixels
        else:
            buf[i] = pixels.transpose(2, 0, 1)
    return stop - start, failures


def _unify_channels(buf: np.ndarray, gray: np.ndarray, ok: np.ndarray) -> np.ndarray:
    """[N,3,S,S] with grayscale images only in channel 0 -> 1 channel if all gray, else replicate."""
    if gray[ok].all():
        return np.ascontiguousarray(buf[:, :1])
    gray_rows = np.flatnonzero(gray & ok)
    buf[gray_rows, 1] = buf[gray_rows, 0]
    buf[gray_rows, 2] = buf[gray_rows, 0]
    return buf


class _BadImage(Exception):
    """A file PIL cannot decode completely."""


def _decode_image(path: Path, size: int, channels: int | None) -> tuple[np.ndarray, bool]:
    """Decode one file to uint8 [S,S] (1 channel) or [S,S,3], and whether its mode was grayscale."""
    try:
        opened = Image.open(path)
    except Exception as exc:  # unidentifiable or unreadable file
        raise _BadImage(f"{type(exc).__name__}: {exc}") from exc
    with opened:  # all work happens inside: PIL invalidates a closed image's pixels
        try:
            _request_draft(opened, size)
            # load() raises on truncated data as long as ImageFile.LOAD_TRUNCATED_IMAGES is False,
            # which we never change; corrupt files raise many exception types, hence the broad catch.
            opened.load()
        except Exception as exc:
            raise _BadImage(f"{type(exc).__name__}: {exc}") from exc
        is_gray = _is_gray_mode(opened.mode)
        img = _to_mode(opened, channels or (1 if is_gray else 3))
        return np.asarray(_resize_center_crop(img, size)), is_gray


def _request_draft(img: Image.Image, size: int) -> None:
    # JPEG can decode at 1/2, 1/4 or 1/8 scale almost for free; ask for the smallest scale that
    # keeps the shorter side >= size, which makes big photos (ImageNet) decode several times faster.
    width, height = img.size
    if img.format == "JPEG" and min(width, height) > size:
        scale = size / min(width, height)
        img.draft(None, (math.ceil(width * scale), math.ceil(height * scale)))


def _is_gray_mode(mode: str) -> bool:
    return mode in _GRAY_MODES or mode.startswith("I;16")


def _to_mode(img: Image.Image, channels: int) -> Image.Image:
    """Return an "L" (channels=1) or "RGB" (channels=3) version of the image."""
    if img.mode in ("P", "PA"):
        img = img.convert("RGBA")  # avoids PIL's warning about palette transparency
    if img.mode.startswith("I"):
        img = _wide_gray_to_l(img)
    elif _is_gray_mode(img.mode):
        img = img.convert("L")  # drops alpha of "LA"; "1" becomes 0/255
    elif img.mode != "RGB":
        img = img.convert("RGB")  # drops alpha of "RGBA"; CMYK, YCbCr, ... to RGB
    target = "L" if channels == 1 else "RGB"
    return img if img.mode == target else img.convert(target)


def _wide_gray_to_l(img: Image.Image) -> Image.Image:
    # PIL's convert("L") clips 16-bit values at 255 (turning most of a 16-bit image white);
    # scale them down instead. Mode "I" is 16-bit data when a value exceeds the 8-bit range.
    values = np.asarray(img).astype(np.int64)
    if img.mode.startswith("I;16") or (values.size and values.max() > 255):
        values = np.clip(values, 0, 65535) >> 8
    return Image.fromarray(np.clip(values, 0, 255).astype(np.uint8), mode="L")


def _resize_center_crop(img: Image.Image, size: int) -> Image.Image:
    """Shorter side to `size` (PIL bilinear, antialiased when shrinking), then center crop."""
    width, height = img.size
    new_h, new_w = _short_side_size(height, width, size)
    if (new_w, new_h) != (width, height):
        img = img.resize((new_w, new_h), Image.Resampling.BILINEAR)
    if (new_w, new_h) != (size, size):
        left, top = (new_w - size) // 2, (new_h - size) // 2
        img = img.crop((left, top, left + size, top + size))
    return img
