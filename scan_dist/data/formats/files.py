"""Image files read one at a time: PIL decode at the native aspect ratio, shorter side resized to `resize_size`.

`FileReader` is the reader of the file formats (imagefolder, flat, ImageNet): it holds the names (one numpy bytes
array) and decodes image i when asked, in whichever process asks (a DataLoader worker, normally). The output size
is reached later by the view's crop (transforms.py): the paper's chain for ImageNet is shorter side 256, then a
random-resized 224 crop (training views) or the centre 224 crop (evaluation).

A file that cannot be decoded completely raises `BadImage` naming the path; the loaders apply data.on_bad_image.
"""
from __future__ import annotations

import math
import os

import numpy as np
import torch
from PIL import Image

from scan_dist.errors import DataError

from .common import short_side_size
from .folders import FileListing
from .reader import BadImage, Reader

_GRAY_MODES = frozenset({"1", "L", "LA", "La", "I", "F"})
CHANNEL_PROBE = 64  # files whose header decides the channel count when data.channels is unset


class FileReader(Reader):
    """Decodes file `names[i]` below `root` on demand."""

    def __init__(self, listing: FileListing, image_size: int, resize_size: int, channels: int, **info):
        super().__init__(num_items=len(listing.names), channels=channels, image_size=image_size,
                         targets=listing.targets, class_names=listing.class_names, **info)
        self.root = str(listing.root)
        self.resize_size = int(resize_size)
        self._names = np.array([name.encode() for name in listing.names], dtype=np.bytes_)

    @property
    def names(self) -> np.ndarray:
        return self._names

    def name(self, index: int) -> str:
        return self._names[index].decode()

    def path(self, index: int) -> str:
        return os.path.join(self.root, self.name(index))

    def read(self, index: int) -> torch.Tensor:
        return decode_file(self.path(index), self.resize_size, self.channels)

    def resident_bytes_per_image(self) -> int:
        return int(self._names.itemsize) + (8 if self.targets is not None else 0)


def probe_channels(root, names: list[str], on_bad_image: str) -> int:
    """1 when the headers of (up to CHANNEL_PROBE evenly spaced) files are all grayscale, else 3."""
    picks = np.unique(np.linspace(0, len(names) - 1, num=min(CHANNEL_PROBE, len(names))).astype(np.int64))
    seen = 0
    for i in picks:
        path = os.path.join(str(root), names[int(i)])
        try:
            with Image.open(path) as img:
                mode = img.mode
        except Exception as exc:  # unreadable header: the file itself fails (or is skipped) when read
            if on_bad_image == "fail":
                raise BadImage(f"{path}: {type(exc).__name__}: {exc}") from exc
            continue
        seen += 1
        if not _is_gray_mode(mode):
            return 3
    if not seen:
        raise DataError(f"{root}: none of the {len(picks)} images probed is readable; check the files or data.path")
    return 1


def decode_file(path: str, resize_size: int, channels: int) -> torch.Tensor:
    """uint8 [channels, h, w] with min(h, w) = resize_size (PIL bilinear, antialiased when shrinking)."""
    try:
        opened = Image.open(path)
    except Exception as exc:  # unidentifiable or unreadable file
        raise BadImage(f"{path}: {type(exc).__name__}: {exc}") from exc
    with opened:  # all work happens inside: PIL invalidates a closed image's pixels
        try:
            _request_draft(opened, resize_size)
            # load() raises on truncated data as long as ImageFile.LOAD_TRUNCATED_IMAGES is False,
            # which we never change; corrupt files raise many exception types, hence the broad catch.
            opened.load()
            img = _to_mode(opened, channels)
            width, height = img.size
            new_h, new_w = short_side_size(height, width, resize_size)
            if (new_w, new_h) != (width, height):
                img = img.resize((new_w, new_h), Image.Resampling.BILINEAR)
            pixels = np.array(img)  # a writable copy: torch tensors must own writable memory
        except Exception as exc:
            raise BadImage(f"{path}: {type(exc).__name__}: {exc}") from exc
    if pixels.ndim == 2:
        pixels = pixels[None]
    else:
        pixels = pixels.transpose(2, 0, 1)
    return torch.from_numpy(np.ascontiguousarray(pixels))


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


