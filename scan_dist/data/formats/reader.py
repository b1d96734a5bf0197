"""The reader contract: one split of a dataset as an index -> stored-image function, never the decoded dataset.

Two implementations: `ArrayReader` (array formats, a memory-mapped uint8 `.npy` that every process of a node shares
through the page cache; images stored at the output size) and `FileReader` (image files decoded one by one, at
their native aspect ratio, shorter side resized to `resize_size`). Readers are small and picklable: DataLoader
workers receive them and reopen their files lazily.
"""
from __future__ import annotations

import numpy as np
import torch


class BadImage(Exception):
    """A file that cannot be decoded completely; str() is '<path>: <reason>'."""


class Reader:
    """One split of a dataset. Subclasses set the attributes and implement `read` (and `read_batch` if fixed)."""

    fixed_size: bool = False  # every stored image is image_size x image_size (array formats)

    def __init__(self, *, num_items: int, channels: int, image_size: int, targets: np.ndarray | None,
                 class_names: list[str] | None, source: str):
        self.num_items = int(num_items)
        self.channels = int(channels)
        self.image_size = int(image_size)  # side of the square the network sees
        self.targets = targets  # int64 [N] (-1: unlabelled), or None
        self.class_names = class_names
        self.source = source  # short human description, for the log

    def __len__(self) -> int:
        return self.num_items

    @property
    def num_classes(self) -> int | None:
        return None if self.class_names is None else len(self.class_names)

    @property
    def names(self) -> np.ndarray | None:
        """Per-image identifiers for assignments.csv (file paths relative to the root), or None (use indices)."""
        return None

    def read(self, index: int) -> torch.Tensor:
        """Stored image `index` as uint8 [C, h, w]; raises BadImage for an unreadable file."""
        raise NotImplementedError

    def read_batch(self, indices: np.ndarray) -> torch.Tensor:
        """uint8 [B, C, S, S] of fixed-size readers (one copy of just these rows)."""
        return torch.stack([self.read(int(i)) for i in indices])

    def stored_hw(self) -> tuple[int, int] | None:
        """(h, w) of every stored image when fixed, else None (known per image after decoding)."""
        return (self.image_size, self.image_size) if self.fixed_size else None

    def resident_bytes_per_image(self) -> int:
        """Bytes this reader keeps in process memory per image (names, targets), for the memory plan."""
        return 8 if self.targets is not None else 0
