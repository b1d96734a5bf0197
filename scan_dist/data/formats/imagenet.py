"""ImageNet listings: train/<wnid>/ folders, val/ as wnid folders or flat with LOC_val_solution.csv, Kaggle's
download layout (ILSVRC/Data/CLS-LOC), and the paper's ImageNet-50/100/200 subsets (class lists shipped here).
"""
from __future__ import annotations

import csv
from pathlib import Path

from scan_dist.errors import DataError

from .common import IMAGENET_TRAIN_DIRS, WNID, visible_subdirs
from .folders import FileListing, labelled_names, list_images

_SUBSET_DIR = Path(__file__).resolve().parent.parent / "imagenet_subsets"
_IMAGENET_VAL_DIRS = ("val", "ILSVRC2012_img_val")
_IMAGENET_VAL_CSV = "LOC_val_solution.csv"
_IMAGENET_SYNSETS = "LOC_synset_mapping.txt"
# ---- ImageNet --------------------------------------------------------------------------------


_KAGGLE_IMAGES = Path("ILSVRC") / "Data" / "CLS-LOC"


def list_imagenet(root: Path, split: str, subset: str | None) -> FileListing:
    # Kaggle's download keeps the images under ILSVRC/Data/CLS-LOC/{train,val} and the csv/mapping at its root.
    download_root = root
    if not any((root / name).is_dir() for name in IMAGENET_TRAIN_DIRS) and (root / _KAGGLE_IMAGES).is_dir():
        root = root / _KAGGLE_IMAGES
    train_dir = _first_dir(root, IMAGENET_TRAIN_DIRS, "train")
    wnids, class_names = _imagenet_classes(_with_file(root, download_root, _IMAGENET_SYNSETS), train_dir, subset)
    index = {wnid: i for i, wnid in enumerate(wnids)}
    if split == "train":
        folder = train_dir
        entries = [(p, index[w]) for w in wnids for p in list_images(train_dir / w)]
    else:
        folder = _first_dir(root, _IMAGENET_VAL_DIRS, "val")
        if any(WNID.fullmatch(d.name) for d in visible_subdirs(folder)):
            entries = _imagenet_val_folders(folder, index, subset)
        else:
            entries = _imagenet_val_flat(_with_file(root, download_root, _IMAGENET_VAL_CSV), folder, index, subset)
    if not entries:
        raise DataError(f"{folder}: no ImageNet images found for the selected classes; check data.path and data.subset")
    names, targets = labelled_names(root, entries)
    details = [split] + ([subset] if subset else [])
    return FileListing(root, names, targets, class_names, f"imagenet:{root}", details)


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
        wnids = [d.name for d in visible_subdirs(train_dir) if WNID.fullmatch(d.name)]
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


def _imagenet_val_folders(folder: Path, index: dict[str, int], subset: str | None) -> list[tuple[str, int]]:
    entries = []
    for sub in visible_subdirs(folder):
        wnid = sub.name
        if wnid not in index:
            if subset is None:
                raise DataError(f"{sub}: val class {wnid} has no train folder; eval classes must be a subset of train classes")
            continue  # outside the chosen subset
        entries.extend((path, index[wnid]) for path in list_images(sub))
    return entries


def _imagenet_val_flat(root: Path, folder: Path, index: dict[str, int], subset: str | None) -> list[tuple[str, int]]:
    labels = _read_val_solution(root / _IMAGENET_VAL_CSV, folder)
    entries = []
    for path in list_images(folder):
        stem = Path(path).stem
        wnid = labels.get(stem)
        if wnid is None:
            raise DataError(f"{path}: no row for {stem} in {root / _IMAGENET_VAL_CSV}; fix the csv or remove the image")
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
            if not tokens or not WNID.fullmatch(tokens[0]):
                raise DataError(f"{csv_path}: row for {row['ImageId']} does not start with a wnid; re-download the file")
            labels[row["ImageId"]] = tokens[0]
    return labels


