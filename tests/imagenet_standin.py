"""A tiny ImageNet-layout stand-in built from real Fashion-MNIST images (helper for the ImageNet preset tests).

`build_imagenet_standin` writes real JPEG files in the layout the `imagenet` reader expects:

    ROOT/train/<wnid>/<wnid>_<n>.JPEG
    ROOT/val/<wnid>/ILSVRC2012_val_XXXXXXXX.JPEG          (flat_val=False)
    ROOT/val/ILSVRC2012_val_XXXXXXXX.JPEG + ROOT/LOC_val_solution.csv   (flat_val=True, Kaggle's layout)
    ROOT/LOC_synset_mapping.txt                            (Kaggle's "wnid name, synonyms" file)

The wnids are the real ones of the paper's subsets shipped in scan_dist/data/imagenet_subsets/. The package ships no
list of all 1000 ImageNet-1k wnids (and the 50/100/200 lists are nested, 200 distinct wnids in all), so "imagenet1k"
uses those 200 real wnids followed by 800 made-up but well-formed ones (`n9XXXXXXX`, a range no real WordNet noun
offset uses).

Class i of the subset gets Fashion-MNIST class i % 10, so the clusters are learnable (ten visual groups); every
image is a distinct Fashion-MNIST picture (train split for train/, test split for val/), upscaled, given a mild
colour tint and a photo-like non-square shape (landscape or portrait), so the reader's RGB decode, resize and
center-crop paths all run.
"""
from __future__ import annotations

import csv
import gzip
from pathlib import Path

import numpy as np
from PIL import Image

FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
SUBSET_DIR = Path(__file__).resolve().parents[1] / "scan_dist" / "data" / "imagenet_subsets"
SUBSETS = ("imagenet50", "imagenet100", "imagenet200", "imagenet1k")
IMAGENET1K_CLASSES = 1000
VAL_CSV = "LOC_val_solution.csv"
SYNSET_FILE = "LOC_synset_mapping.txt"

__all__ = ["build_imagenet_standin", "subset_classes", "SUBSETS"]


def _read_list(path: Path) -> list[tuple[str, str]]:
    rows = []
    for line in path.read_text().splitlines():
        if line.strip():
            wnid, _, name = line.strip().partition(" ")
            rows.append((wnid, name.strip() or wnid))
    return rows


def subset_classes(subset: str) -> list[tuple[str, str]]:
    """(wnid, name) of every class of `subset`, in the order of the package's list."""
    if subset not in SUBSETS:
        raise ValueError(f"subset must be one of {SUBSETS}, got {subset!r}")
    if subset != "imagenet1k":
        return _read_list(SUBSET_DIR / f"imagenet_{subset.removeprefix('imagenet')}.txt")
    seen: dict[str, str] = {}
    for name in ("imagenet_200.txt", "imagenet_100.txt", "imagenet_50.txt"):
        for wnid, text in _read_list(SUBSET_DIR / name):
            seen.setdefault(wnid, text)
    rows = sorted(seen.items())
    rows += [(f"n9{i:07d}", f"stand-in class {i}") for i in range(IMAGENET1K_CLASSES - len(rows))]
    return rows


def _read_idx(prefix: str) -> tuple[np.ndarray, np.ndarray]:
    with gzip.open(FASHION_MNIST / f"{prefix}-images-idx3-ubyte.gz", "rb") as f:
        raw = f.read()
    count, rows, cols = (int.from_bytes(raw[i:i + 4], "big") for i in (4, 8, 12))
    images = np.frombuffer(raw, np.uint8, offset=16).reshape(count, rows, cols)
    with gzip.open(FASHION_MNIST / f"{prefix}-labels-idx1-ubyte.gz", "rb") as f:
        labels = np.frombuffer(f.read(), np.uint8, offset=8).astype(np.int64)
    return images, labels


def _pick(labels: np.ndarray, wanted: list[int], rng: np.random.Generator) -> list[int]:
    """A distinct image index of Fashion-MNIST class `c` for each entry of `wanted`."""
    pools = {c: list(rng.permutation(np.flatnonzero(labels == c))) for c in set(wanted)}
    picked = []
    for c in wanted:
        if not pools[c]:
            raise ValueError(f"not enough Fashion-MNIST images of class {c} for this stand-in")
        picked.append(int(pools[c].pop()))
    return picked


def _photo(gray: np.ndarray, size: int, rng: np.random.Generator) -> Image.Image:
    """28x28 grayscale -> an RGB 'photo' whose shorter side is `size` (4:3 landscape or 3:4 portrait)."""
    long_side = max(size + 1, round(size * 4 / 3))
    width, height = (long_side, size) if rng.random() < 0.5 else (size, long_side)
    canvas = Image.new("L", (width, height), color=int(rng.integers(0, 40)))
    garment = Image.fromarray(gray, "L").resize((size, size), Image.Resampling.BILINEAR)
    canvas.paste(garment, ((width - size) // 2, (height - size) // 2))
    tint = 0.85 + 0.3 * rng.random(3)  # mild colour cast: a real 3-channel JPEG, not gray-as-RGB
    rgb = np.clip(np.asarray(canvas, np.float32)[..., None] * tint, 0, 255).astype(np.uint8)
    return Image.fromarray(rgb, "RGB")


def build_imagenet_standin(root, subset: str, per_class_train: int, per_class_val: int, flat_val: bool,
                           size: int = 32, seed: int = 0, extra_classes: int = 0) -> dict:
    """Write an ImageNet-layout folder at `root` for `subset` (imagenet50/100/200/1k); returns counts and paths.

    `size` is the shorter side of the written JPEGs. `extra_classes` adds that many classes from outside the subset
    (train and val images both, as the real ImageNet folder holds all 1000 classes) so the reader's subset filter
    is exercised; they are never part of the returned class list.
    """
    if per_class_train < 1 or per_class_val < 0:
        raise ValueError("per_class_train must be >= 1 and per_class_val >= 0")
    root = Path(root)
    classes = subset_classes(subset)
    extras: list[tuple[str, str]] = []
    if extra_classes:
        used = {w for w, _ in classes}
        pool = [row for row in subset_classes("imagenet1k") if row[0] not in used]
        extras = pool[:extra_classes]
        if len(extras) < extra_classes:
            raise ValueError(f"only {len(pool)} classes are left outside {subset}")
    every = classes + extras
    rng = np.random.default_rng(seed)

    train_images, train_labels = _read_idx("train")
    val_images, val_labels = _read_idx("t10k")
    fm_class = [i % 10 for i in range(len(every))]

    train_dir = root / "train"
    train_idx = _pick(train_labels, [c for c in fm_class for _ in range(per_class_train)], rng)
    counter = iter(train_idx)
    train_files, labels = [], {}
    for wnid, _ in every:
        folder = train_dir / wnid
        folder.mkdir(parents=True, exist_ok=True)
        for n in range(per_class_train):
            path = folder / f"{wnid}_{n + 1}.JPEG"
            _photo(train_images[next(counter)], size, rng).save(path, "JPEG", quality=90)
            train_files.append(path)
            labels[path.relative_to(root).as_posix()] = wnid

    # Val: like the real release, file numbers are not grouped by class.
    val_dir = root / "val"
    val_dir.mkdir(parents=True, exist_ok=True)
    val_wnid_index = [i for i in range(len(every)) for _ in range(per_class_val)]
    val_wnid_index = [val_wnid_index[j] for j in rng.permutation(len(val_wnid_index))]
    val_idx = _pick(val_labels, [fm_class[i] for i in val_wnid_index], rng)
    val_files, rows = [], []
    for number, (i, src) in enumerate(zip(val_wnid_index, val_idx), start=1):
        wnid = every[i][0]
        image_id = f"ILSVRC2012_val_{number:08d}"
        folder = val_dir if flat_val else val_dir / wnid
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{image_id}.JPEG"
        img = _photo(val_images[src], size, rng)
        img.save(path, "JPEG", quality=90)
        val_files.append(path)
        labels[path.relative_to(root).as_posix()] = wnid
        rows.append((image_id, _prediction_string(wnid, img.size, rng)))

    csv_path = None
    if flat_val:
        csv_path = root / VAL_CSV
        order = rng.permutation(len(rows))  # Kaggle's file is not sorted by ImageId either
        with open(csv_path, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["ImageId", "PredictionString"])
            writer.writerows(rows[j] for j in order)

    synsets = root / SYNSET_FILE
    synsets.write_text("".join(f"{wnid} {name}\n" for wnid, name in sorted(every)))

    return {
        "root": root,
        "subset": subset,
        "wnids": [w for w, _ in classes],
        "class_names": [n for _, n in classes],
        "extra_wnids": [w for w, _ in extras],
        "extra_class_names": [n for _, n in extras],
        "num_classes": len(classes),
        "num_train": len(classes) * per_class_train,
        "num_val": len(classes) * per_class_val,
        "num_train_files": len(train_files),
        "num_val_files": len(val_files),
        "train_dir": train_dir,
        "val_dir": val_dir,
        "val_csv": csv_path,
        "synset_mapping": synsets,
        "flat_val": flat_val,
        "labels": labels,  # every written file, relative to root (as ImageSet.names) -> its wnid
        "fashion_mnist_class": {w: fm_class[i] for i, (w, _) in enumerate(every)},
    }


def _prediction_string(wnid: str, image_size: tuple[int, int], rng: np.random.Generator) -> str:
    """Kaggle's PredictionString: one or two boxes "wnid x_min y_min x_max y_max" of the image's class."""
    width, height = image_size
    boxes = []
    for _ in range(1 + int(rng.random() < 0.3)):
        x0, y0 = int(rng.integers(0, width // 2)), int(rng.integers(0, height // 2))
        x1, y1 = int(rng.integers(x0 + 1, width)), int(rng.integers(y0 + 1, height))
        boxes.append(f"{wnid} {x0} {y0} {x1} {y1}")
    return " ".join(boxes) + " "  # the real file ends every PredictionString with a space
