"""Array formats (MNIST/Fashion-MNIST IDX, CIFAR-10/100 pickles, STL-10 binaries): parse the files into uint8 arrays.

The parsers return an `ArraySource` (parts of [n, C, H, W] uint8 arrays, lazily memory-mapped where the file
allows, plus labels and class names). They run once per dataset and settings: `array_cache.py` turns the source
into one uint8 `.npy` that every process memory-maps.
"""
from __future__ import annotations

import gzip
import math
import pickle
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from scan_dist.errors import DataError

from .common import short_side_size

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

_CIFAR_SIDE = 32
_STL_SIDE = 96
_STL_IMAGE_BYTES = 3 * _STL_SIDE * _STL_SIDE


@dataclass
class ArrayPart:
    images: np.ndarray  # uint8 [n, C, H, W]; may be a lazy memmap view
    targets: np.ndarray  # int64 [n]


@dataclass
class ArraySource:
    parts: list[ArrayPart]
    class_names: list[str]
    source: str  # "fmt:location"
    details: list[str]  # split description for the reader's `source`


def check_targets(targets: np.ndarray, num_classes: int, source: str) -> None:
    labelled = targets[targets >= 0]  # -1 marks STL-10's unlabeled images
    if len(labelled) and labelled.max() >= num_classes:
        raise DataError(f"{source}: label {int(labelled.max())} is out of range for {num_classes} classes; the dataset files are inconsistent")




def rgb_to_luminance(images: np.ndarray, chunk: int = 1024) -> np.ndarray:
    """[N,3,H,W] -> [N,1,H,W] with PIL's fixed-point ITU-R 601-2 weights, so arrays match files."""
    out = np.empty((images.shape[0], 1) + images.shape[2:], np.uint8)
    for start in range(0, images.shape[0], chunk):
        rgb = images[start:start + chunk].astype(np.uint32)
        lum = (rgb[:, 0] * 19595 + rgb[:, 1] * 38470 + rgb[:, 2] * 7471 + 0x8000) >> 16
        out[start:start + chunk, 0] = lum
    return out


def resize_arrays(images: np.ndarray, size: int, chunk: int = 256) -> np.ndarray:
    """Shorter side to `size` (bilinear, antialiased), then center crop; chunked to bound memory."""
    n, c, height, width = images.shape
    if height == size and width == size:
        return images
    new_h, new_w = short_side_size(height, width, size)
    top, left = (new_h - size) // 2, (new_w - size) // 2
    out = np.empty((n, c, size, size), np.uint8)
    for start in range(0, n, chunk):
        batch = torch.from_numpy(np.array(images[start:start + chunk], dtype=np.float32))
        resized = F.interpolate(batch, size=(new_h, new_w), mode="bilinear", align_corners=False, antialias=True)
        cropped = resized[:, :, top:top + size, left:left + size]
        out[start:start + chunk] = cropped.round_().clamp_(0, 255).to(torch.uint8).numpy()
    return out


# ---- IDX (MNIST / Fashion-MNIST) -------------------------------------------------------------


def _load_idx(root: Path, split: str, include_unlabeled: bool) -> ArraySource:
    prefix = "train" if split == "train" else "t10k"
    image_file = _find_idx_file(root, f"{prefix}-images-idx3-ubyte")
    label_file = _find_idx_file(root, f"{prefix}-labels-idx1-ubyte")
    images = _read_idx(image_file, ndim=3)
    labels = _read_idx(label_file, ndim=1).astype(np.int64)
    if len(labels) != len(images):
        raise DataError(f"{label_file}: holds {len(labels)} labels but {image_file.name} holds {len(images)} images; re-download the dataset")
    return ArraySource(
        parts=[ArrayPart(images[:, None], labels)],
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


def _load_cifar10(root: Path, split: str, include_unlabeled: bool) -> ArraySource:
    folder = _cifar_dir(root, "cifar-10-batches-py", ("data_batch_1", "test_batch"))
    files = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
    parts = []
    for name in files:
        images, labels, _ = _cifar_batch(folder / name, "labels")
        parts.append(ArrayPart(images, labels))
    names = list(CIFAR10_CLASSES)
    meta_path = folder / "batches.meta"
    if meta_path.is_file():
        names = _decode_names(_pickle_get(_load_pickle(meta_path), "label_names", meta_path))
    return ArraySource(parts, names, f"cifar10:{folder}", [split])


def _load_cifar100(root: Path, split: str, include_unlabeled: bool) -> ArraySource:
    folder, images, fine = _cifar100_split(root, split)[:3]
    meta = _cifar100_meta(folder)
    names = [str(i) for i in range(100)]
    if meta is not None:
        names = _decode_names(_pickle_get(meta, "fine_label_names", folder / "meta"))
    return ArraySource([ArrayPart(images, fine)], names, f"cifar100:{folder}", [split])


def _load_cifar20(root: Path, split: str, include_unlabeled: bool) -> ArraySource:
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
    return ArraySource([ArrayPart(images, coarse)], names, f"cifar20:{folder}", [split])


def _cifar100_split(root: Path, split: str):
    folder = _cifar_dir(root, "cifar-100-python", ("train", "test"))
    path = folder / ("train" if split == "train" else "test")
    images, fine, batch = _cifar_batch(path, "fine_labels")
    return folder, images, fine, batch, path


def _cifar100_meta(folder: Path) -> dict | None:
    meta_path = folder / "meta"
    return _load_pickle(meta_path) if meta_path.is_file() else None


# ---- STL-10 binaries ----------------------------------------------------------------------------


def _load_stl10(root: Path, split: str, include_unlabeled: bool) -> ArraySource:
    folder = root if _has_stl10_files(root) else root / "stl10_binary"
    if not folder.is_dir():
        raise DataError(f"data.path {root}: no train_X.bin/test_X.bin nor stl10_binary/ folder found; point data.path at the extracted STL-10 binaries")
    prefix = "train" if split == "train" else "test"
    images = _stl_images(folder / f"{prefix}_X.bin")
    labels = _stl_labels(folder / f"{prefix}_y.bin", len(images))
    parts = [ArrayPart(images, labels)]
    details = [split]
    if include_unlabeled and split == "train":
        unlabeled = _stl_images(folder / "unlabeled_X.bin")
        parts.append(ArrayPart(unlabeled, np.full(len(unlabeled), -1, dtype=np.int64)))
        details = ["train+unlabeled"]
    return ArraySource(parts, _stl_class_names(folder), f"stl10:{folder}", details)


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


ARRAY_LOADERS = {
    "idx": _load_idx,
    "cifar10": _load_cifar10,
    "cifar100": _load_cifar100,
    "cifar20": _load_cifar20,
    "stl10": _load_stl10,
}


