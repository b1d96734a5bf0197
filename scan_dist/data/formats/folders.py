"""File listings: labelled class folders (`imagefolder`) and plain folders of images (`flat`).

A listing is names relative to the dataset root (sorted, so results never depend on the order the filesystem
returns) plus labels and class names when the layout has them. Nothing is decoded here; `files.py` reads images.
Names are plain strings while listing and one numpy bytes array afterwards (ImageNet-1k: ~50 MB, and no per-name
Python objects that forked workers would copy by touching their reference counts).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from scan_dist.errors import DataError

from .common import IMAGE_EXTENSIONS, is_image_name, visible_subdirs


@dataclass
class FileListing:
    root: Path  # dataset root; names are relative to it
    names: list[str]
    targets: np.ndarray | None
    class_names: list[str] | None
    source: str  # "fmt:location"
    details: list[str]


def list_images(folder) -> list[str]:
    """Image files below `folder` (recursively, following symlinked folders) as path strings, sorted."""
    found = []
    for dirpath, dirnames, filenames in os.walk(str(folder), followlinks=True):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        found.extend(os.path.join(dirpath, f) for f in filenames if not f.startswith(".") and is_image_name(f))
    found.sort()
    return found


def relative_names(root: Path, paths: list[str]) -> list[str]:
    """Paths below `root` as names relative to it ('/'-separated)."""
    prefix = str(root).rstrip(os.sep) + os.sep
    return [p[len(prefix):] if p.startswith(prefix) else os.path.relpath(p, root) for p in paths]


def labelled_names(root: Path, entries: list[tuple[str, int]]) -> tuple[list[str], np.ndarray]:
    """Sort (path, target) pairs by the name relative to `root` so results never depend on class order."""
    names = relative_names(root, [path for path, _ in entries])
    order = sorted(range(len(names)), key=names.__getitem__)
    return [names[i] for i in order], np.array([entries[i][1] for i in order], dtype=np.int64)


def _class_folders(folder: Path) -> dict[str, list[str]]:
    """Class name -> images, for each visible subfolder holding at least one image."""
    classes = {}
    for sub in visible_subdirs(folder):
        images = list_images(sub)
        if images:
            classes[sub.name] = images
    return classes


def list_imagefolder(root: Path, split: str) -> FileListing:
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
    names, targets = labelled_names(root, entries)
    return FileListing(root, names, targets, class_names, f"imagefolder:{folder}", [split])


def _imagefolder_eval_dir(root: Path, train_dir: Path) -> Path:
    if train_dir == root:
        return root
    for name in ("val", "test"):
        if (root / name).is_dir():
            return root / name
    return train_dir  # no held-out split: eval reuses the training images (clustering is unsupervised)


def list_flat(root: Path, split: str) -> FileListing:
    paths = list_images(root)
    if not paths:
        raise DataError(f"{root}: no image files ({', '.join(sorted(IMAGE_EXTENSIONS))}) found; fix data.path")
    return FileListing(root, relative_names(root, paths), None, None, f"flat:{root}", [split])
