"""Image operations of SCAN's augmentations on batches of tensors, and the augmentation settings.

This module holds *what* each operation does; which operations a view applies, with which parameters, is decided
by :mod:`.transforms` from the counter-based draws of :mod:`.sampling`. Nothing here draws a random number: every
operation takes its per-sample magnitudes as tensors.

Images are float ``[B, C, H, W]`` in ``[0, 1]`` (C = 1 or 3). Every operation is *batch-composition invariant*:
a sample's result does not depend on which other samples share its batch (element-wise arithmetic, explicit
shifted-slice filters instead of convolutions whose algorithm may change with the batch size, exact integer or
min/max reductions, means accumulated in float64). That is what makes a view bitwise the same whether one process
augments a global batch or N ranks augment their slices of it, with or without DataLoader workers.

Deviations from the PIL/torchvision originals, all deliberate:

* crops and geometric ops sample bilinearly at continuous (sub-pixel) positions;
* shears and rotations act about the image centre, not PIL's top-left corner, so sheared content stays centred;
* colour ops work on float ``[0, 1]``; equalize/posterize quantise to the 256 uint8 levels first, others are not
  re-quantised after each op;
* colour jitter runs in a fixed order (brightness, contrast, saturation, hue) rather than torchvision's random
  order; hue is a rotation of the chroma plane in YIQ space.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "AugmentConfig",
    "KINDS",
    "STRONG_OPS",
    "normalize",
    "affine",
    "gaussian_blur",
    "hue_rotate",
    "check_kind",
    "check_out_size",
    "normalization_stats",
    "autocontrast",
    "equalize",
    "solarize",
    "posterize",
    "adjust_brightness",
    "adjust_contrast",
    "adjust_color",
    "adjust_sharpness",
    "rotate",
    "shear_x",
    "shear_y",
    "translate_x",
    "translate_y",
    "cutout",
]

KINDS = ("simclr", "weak", "strong", "eval")

# The weak view must keep most of the image so anchors and their neighbours
# stay recognisable; 0.6 is the floor the SCAN stages were tuned for.
WEAK_MIN_SCALE = 0.6

MAX_STRONG_OPS = 8  # RandAugment ops per sample the draw layout of transforms.py has room for

# ITU-R 601 luma, the weights PIL's convert("L") and torchvision use.
_LUMA = (0.299, 0.587, 0.114)


@dataclass
class AugmentConfig:
    """Augmentation hyper-parameters shared by all transform kinds."""

    # RandomResizedCrop: crop area is uniform in [crop_scale_min, 1] of the image.
    crop_scale_min: float = 0.2
    # RandomResizedCrop: aspect ratio (w/h) is log-uniform in this range.
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    # Horizontal flip with probability 0.5 (simclr, weak and strong).
    flip: bool = True
    # Colour jitter is applied to a sample with this probability.
    jitter_prob: float = 0.8
    # Brightness factor uniform in [max(0, 1-b), 1+b].
    brightness: float = 0.4
    # Contrast factor uniform in [max(0, 1-c), 1+c].
    contrast: float = 0.4
    # Saturation factor uniform in [max(0, 1-s), 1+s]; ignored for 1 channel.
    saturation: float = 0.4
    # Hue shift uniform in [-hue, hue] of a full turn; ignored for 1 channel.
    hue: float = 0.1
    # Probability of converting a sample to grayscale; ignored for 1 channel.
    grayscale_prob: float = 0.2
    # Probability of Gaussian blur (kernel ~10% of size, sigma in [0.1, 2.0]).
    blur_prob: float = 0.0
    # Number of RandAugment-style ops applied per sample in the strong view.
    strong_ops: int = 4
    # Cutout square side = round(cutout_frac * S) (SCAN: 16/32, 32/96, 75/224).
    cutout_frac: float = 0.5
    # Extra random translation of the weak view, as a fraction of the size.
    translate_frac: float = 0.0

    def __post_init__(self) -> None:
        if not 0.0 < self.crop_scale_min <= 1.0:
            raise ValueError(f"crop_scale_min must be in (0, 1], got {self.crop_scale_min}")
        lo, hi = self.crop_ratio
        if not 0.0 < lo <= hi:
            raise ValueError(f"crop_ratio must satisfy 0 < min <= max, got {self.crop_ratio}")
        for name in ("jitter_prob", "grayscale_prob", "blur_prob", "cutout_frac"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {value}")
        for name in ("brightness", "contrast", "saturation", "translate_frac"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not 0.0 <= self.hue <= 0.5:
            raise ValueError(f"hue must be in [0, 0.5], got {self.hue}")
        if not 0 <= self.strong_ops <= MAX_STRONG_OPS:
            raise ValueError(f"strong_ops must be in [0, {MAX_STRONG_OPS}], got {self.strong_ops}")


# ---------------------------------------------------------------------------
# argument checks (shared with transforms.py and the DALI backend)


def check_kind(kind: str) -> None:
    """Raise ValueError unless ``kind`` is one of :data:`KINDS` (shared with the DALI backend)."""
    if kind not in KINDS:
        raise ValueError(f"unknown augmentation kind {kind!r}; expected one of {', '.join(KINDS)}")


def check_out_size(out_size) -> int | None:
    """``out_size`` as an int (None stays None); ValueError unless it is a positive integer."""
    if out_size is not None and (isinstance(out_size, bool) or int(out_size) != out_size or out_size <= 0):
        raise ValueError(f"out_size must be a positive integer or None, got {out_size!r}")
    return None if out_size is None else int(out_size)


def normalization_stats(mean, std) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel ``(mean, std)`` as float tuples; ValueError on a length mismatch or a non-positive std."""
    m = tuple(float(v) for v in torch.as_tensor(mean).flatten().tolist())
    s = tuple(float(v) for v in torch.as_tensor(std).flatten().tolist())
    if any(v <= 0 for v in s):
        raise ValueError(f"std must be positive, got {s}")
    if len(m) != len(s):
        raise ValueError(f"mean has {len(m)} values but std has {len(s)}")
    return m, s



# ---------------------------------------------------------------------------
# helpers


def _to_unit(x: Tensor) -> Tensor:
    if x.dim() != 4:
        raise ValueError(f"expected a batch [B, C, H, W], got shape {tuple(x.shape)}")
    if x.dtype == torch.uint8:
        return x.float() / 255
    if x.is_floating_point():
        # Already-scaled float images are accepted so callers can chain transforms.
        return x.float()
    raise ValueError(f"expected uint8 (or float in [0, 1]) images, got {x.dtype}")


def _channel_param(values: Sequence[float] | Tensor, c: int, like: Tensor, name: str) -> Tensor:
    t = torch.as_tensor(values, dtype=torch.float32, device=like.device).flatten()
    if t.numel() != c:
        raise ValueError(f"{name} has {t.numel()} values but the images have {c} channels")
    return t.view(1, c, 1, 1)


def _normalize_unit(x: Tensor, mean: Tensor, std: Tensor) -> Tensor:
    return (x - mean) / std


def normalize(x_uint8: Tensor, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """Return ``(x / 255 - mean) / std`` per channel as float32."""
    x = _to_unit(x_uint8)
    c = x.shape[1]
    return _normalize_unit(x, _channel_param(mean, c, x, "mean"), _channel_param(std, c, x, "std"))


def _per_sample(v: Tensor | float, x: Tensor) -> Tensor:
    t = torch.as_tensor(v, dtype=x.dtype, device=x.device)
    if t.dim() == 0:
        t = t.expand(x.shape[0])
    return t.view(-1, 1, 1, 1)


def _grayscale(x: Tensor) -> Tensor:
    if x.shape[1] == 1:
        return x
    r, g, b = x[:, 0:1], x[:, 1:2], x[:, 2:3]
    return _LUMA[0] * r + _LUMA[1] * g + _LUMA[2] * b


def _blend(x: Tensor, degenerate: Tensor, factor: Tensor) -> Tensor:
    return (degenerate + factor * (x - degenerate)).clamp_(0.0, 1.0)


def _grid(lin: Tensor, shift: Tensor, oh: int, ow: int) -> Tensor:
    """grid_sample's sampling grid [n, oh, ow, 2] for ``p_in = lin @ p_out + shift`` (normalised coordinates,
    align_corners=False), computed element-wise so each sample's grid is independent of its batch."""
    dtype, device = lin.dtype, lin.device
    xs = ((torch.arange(ow, device=device, dtype=dtype) * 2 + 1) / ow - 1).view(1, 1, ow)
    ys = ((torch.arange(oh, device=device, dtype=dtype) * 2 + 1) / oh - 1).view(1, oh, 1)
    coef = [lin[:, i, j].view(-1, 1, 1) for i in range(2) for j in range(2)]
    gx = coef[0] * xs + coef[1] * ys + shift[:, 0].view(-1, 1, 1)
    gy = coef[2] * xs + coef[3] * ys + shift[:, 1].view(-1, 1, 1)
    return torch.stack([gx, gy], dim=-1)


def affine(x: Tensor, lin: Tensor, shift: Tensor, padding_mode: str = "zeros", size: tuple[int, int] | None = None) -> Tensor:
    """Sample ``x`` bilinearly at ``lin @ p + shift`` for every output point ``p``.

    ``lin`` [n,2,2] and ``shift`` [n,2] are in grid_sample's normalised coordinates (x right, y down, [-1, 1]
    spanning the image edges); ``size`` (default: the input's) is the output (height, width).
    """
    n, c, h, w = x.shape
    oh, ow = size if size is not None else (h, w)
    grid = _grid(lin.to(x.dtype), shift.to(x.dtype), oh, ow)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode=padding_mode, align_corners=False)


_affine = affine  # the name the op table and older callers use


def _shifted_sum(padded: Tensor, weights: Sequence[Tensor | float], h: int, w: int, vertical: bool) -> Tensor:
    """sum_t weights[t] * padded shifted by t along one axis: a 1-D filter as element-wise multiply-adds."""
    out = None
    for t, weight in enumerate(weights):
        part = padded[:, :, t:t + h, :w] if vertical else padded[:, :, :h, t:t + w]
        out = part * weight if out is None else out + part * weight
    return out


# ---------------------------------------------------------------------------
# strong (RandAugment-style) ops; each takes float [n,C,H,W] in [0,1] and a
# per-sample magnitude (tensor [n] or scalar) and returns the same shape.


def autocontrast(x: Tensor) -> Tensor:
    """Stretch each sample's channel linearly so its min is 0 and max is 1."""
    lo = x.amin(dim=(2, 3), keepdim=True)
    hi = x.amax(dim=(2, 3), keepdim=True)
    span = hi - lo
    flat = span <= 0
    # Constant channels are left alone, as in PIL.
    scale = torch.where(flat, torch.ones_like(span), 1.0 / span.clamp_min(1e-12))
    lo = torch.where(flat, torch.zeros_like(lo), lo)
    return ((x - lo) * scale).clamp_(0.0, 1.0)


def equalize(x: Tensor) -> Tensor:
    """Histogram-equalise each sample's channel with PIL's integer algorithm."""
    n, c, h, w = x.shape
    levels = (x * 255).round_().clamp_(0, 255).long().reshape(n * c, h * w)
    # One bincount over disjoint 256-bin ranges = a batched histogram.
    offsets = torch.arange(n * c, device=x.device).mul_(256).unsqueeze(1)
    hist = torch.bincount((levels + offsets).reshape(-1), minlength=n * c * 256).view(n * c, 256)
    last_bin = 255 - (hist.flip(1) > 0).long().argmax(dim=1, keepdim=True)
    step = (h * w - hist.gather(1, last_bin)) // 255
    before = hist.cumsum(1) - hist
    lut = ((before + step // 2) // step.clamp_min(1)).clamp_(max=255)
    identity = torch.arange(256, device=x.device).expand_as(lut)
    lut = torch.where(step > 0, lut, identity)
    return lut.gather(1, levels).view(n, c, h, w).to(x.dtype) / 255


def solarize(x: Tensor, threshold: Tensor | float) -> Tensor:
    """Invert pixels whose uint8 value is >= ``threshold`` (0..256)."""
    t = _per_sample(threshold, x) / 255
    return torch.where(x >= t, 1.0 - x, x)


def posterize(x: Tensor, bits: Tensor | int) -> Tensor:
    """Keep the top ``bits`` (1..8) bits of each uint8 level."""
    b = _per_sample(bits, x).round()
    q = torch.pow(2.0, 8.0 - b)
    levels = (x * 255).round_().clamp_(0, 255)
    return torch.floor(levels / q) * q / 255


def adjust_brightness(x: Tensor, factor: Tensor | float) -> Tensor:
    """Blend towards black (PIL ImageEnhance.Brightness)."""
    return (x * _per_sample(factor, x)).clamp_(0.0, 1.0)


def adjust_contrast(x: Tensor, factor: Tensor | float) -> Tensor:
    """Blend towards the sample's mean gray level (PIL ImageEnhance.Contrast)."""
    # float64 accumulation: the mean then rounds to the same float32 however the reduction is split.
    mean = _grayscale(x).double().mean(dim=(1, 2, 3), keepdim=True).to(x.dtype)
    return _blend(x, mean, _per_sample(factor, x))


def adjust_color(x: Tensor, factor: Tensor | float) -> Tensor:
    """Blend towards the grayscale image (PIL ImageEnhance.Color); no-op for 1 channel."""
    if x.shape[1] == 1:
        return x
    return _blend(x, _grayscale(x), _per_sample(factor, x))


def adjust_sharpness(x: Tensor, factor: Tensor | float) -> Tensor:
    """Blend towards PIL's SMOOTH-filtered image (PIL ImageEnhance.Sharpness)."""
    n, c, h, w = x.shape
    if h < 3 or w < 3:
        return x
    # SMOOTH = [[1,1,1],[1,5,1],[1,1,1]] / 13 over the interior, as nine shifted multiply-adds.
    smooth = None
    for dy in range(3):
        for dx in range(3):
            weight = (5.0 if (dy, dx) == (1, 1) else 1.0) / 13.0
            part = x[:, :, dy:dy + h - 2, dx:dx + w - 2] * weight
            smooth = part if smooth is None else smooth + part
    # PIL leaves the one-pixel border of the degenerate image unfiltered.
    degenerate = x.clone()
    degenerate[:, :, 1:-1, 1:-1] = smooth
    return _blend(x, degenerate, _per_sample(factor, x))


def _rotation(deg: Tensor, h: int, w: int) -> Tensor:
    a = deg * (math.pi / 180)
    cos, sin = torch.cos(a), torch.sin(a)
    # Normalised coords scale x by 2/W and y by 2/H; the off-diagonal terms
    # carry the aspect ratio so non-square images rotate rigidly.
    return torch.stack([torch.stack([cos, -sin * (h / w)], -1), torch.stack([sin * (w / h), cos], -1)], -2)


def _mag(v: Tensor | float, like: Tensor) -> Tensor:
    t = torch.as_tensor(v, dtype=like.dtype, device=like.device)
    return t.expand(like.shape[0]) if t.dim() == 0 else t


# Geometric ops are expressed as (lin [n,2,2], shift [n,2]) in normalised
# coordinates so the strong view can run all of them in one grid_sample.


def _rotate_params(deg: Tensor, h: int, w: int) -> tuple[Tensor, Tensor]:
    return _rotation(deg, h, w), torch.zeros(deg.shape[0], 2, dtype=deg.dtype, device=deg.device)


def _shear_params(v: Tensor, h: int, w: int, horizontal: bool) -> tuple[Tensor, Tensor]:
    one, zero = torch.ones_like(v), torch.zeros_like(v)
    # Pixel-space shear x' = x + v*y becomes x_n' = x_n + v*(H/W)*y_n.
    if horizontal:
        lin = torch.stack([torch.stack([one, v * (h / w)], -1), torch.stack([zero, one], -1)], -2)
    else:
        lin = torch.stack([torch.stack([one, zero], -1), torch.stack([v * (w / h), one], -1)], -2)
    return lin, torch.zeros(v.shape[0], 2, dtype=v.dtype, device=v.device)


def _translate_params(frac: Tensor, horizontal: bool) -> tuple[Tensor, Tensor]:
    n = frac.shape[0]
    eye = torch.eye(2, dtype=frac.dtype, device=frac.device).expand(n, 2, 2)
    zero = torch.zeros_like(frac)
    # The full size spans 2 normalised units.
    shift = torch.stack([2 * frac, zero] if horizontal else [zero, 2 * frac], -1)
    return eye, shift


def rotate(x: Tensor, degrees: Tensor | float) -> Tensor:
    """Rotate counter-clockwise (as PIL) about the centre; corners fill with 0."""
    return _affine(x, *_rotate_params(_mag(degrees, x), *x.shape[-2:]))


def shear_x(x: Tensor, v: Tensor | float) -> Tensor:
    """Output pixel (x, y) samples input (x + v*y, y), y measured from the centre."""
    return _affine(x, *_shear_params(_mag(v, x), *x.shape[-2:], horizontal=True))


def shear_y(x: Tensor, v: Tensor | float) -> Tensor:
    """Output pixel (x, y) samples input (x, y + v*x), x measured from the centre."""
    return _affine(x, *_shear_params(_mag(v, x), *x.shape[-2:], horizontal=False))


def translate_x(x: Tensor, frac: Tensor | float) -> Tensor:
    """Output pixel x samples input x + frac*W (PIL's convention: content moves left)."""
    return _affine(x, *_translate_params(_mag(frac, x), horizontal=True))


def translate_y(x: Tensor, frac: Tensor | float) -> Tensor:
    """Output pixel y samples input y + frac*H (content moves up)."""
    return _affine(x, *_translate_params(_mag(frac, x), horizontal=False))


def _identity(x: Tensor, _m: Tensor) -> Tensor:
    return x


_ColourOp = Callable[[Tensor, Tensor], Tensor]
_GeomOp = Callable[[Tensor, int, int], "tuple[Tensor, Tensor]"]

# (name, op, low, high, random sign).  Magnitudes are uniform in [low, high];
# signed ops then flip the sign with probability 0.5.  Colour ops map
# (x, magnitude) -> x; geometric ops map (magnitude, H, W) -> affine params
# and must stay LAST and contiguous (one grid_sample covers all of them).
_COLOUR_OPS: tuple[tuple[str, _ColourOp, float, float, bool], ...] = (
    ("identity", _identity, 0.0, 0.0, False),
    ("autocontrast", lambda x, m: autocontrast(x), 0.0, 0.0, False),
    ("equalize", lambda x, m: equalize(x), 0.0, 0.0, False),
    ("solarize", solarize, 0.0, 256.0, False),
    # floor(4 + 5u) makes each of 4..8 equally likely.
    ("posterize", lambda x, m: posterize(x, torch.floor(m).clamp_(4, 8)), 4.0, 9.0, False),
    ("color", adjust_color, 0.05, 0.95, False),
    ("contrast", adjust_contrast, 0.05, 0.95, False),
    ("brightness", adjust_brightness, 0.05, 0.95, False),
    ("sharpness", adjust_sharpness, 0.05, 0.95, False),
)
_GEOMETRIC_OPS: tuple[tuple[str, _GeomOp, float, float, bool], ...] = (
    ("rotate", _rotate_params, 0.0, 30.0, True),
    ("shear_x", lambda m, h, w: _shear_params(m, h, w, True), 0.0, 0.1, True),
    ("shear_y", lambda m, h, w: _shear_params(m, h, w, False), 0.0, 0.1, True),
    ("translate_x", lambda m, h, w: _translate_params(m, True), 0.0, 0.1, True),
    ("translate_y", lambda m, h, w: _translate_params(m, False), 0.0, 0.1, True),
)
_STRONG_TABLE = _COLOUR_OPS + _GEOMETRIC_OPS

STRONG_OPS: tuple[str, ...] = tuple(entry[0] for entry in _STRONG_TABLE)


def cutout(x: Tensor, side: int, centres: Tensor) -> Tensor:
    """Zero one ``side``-square per sample centred at ``centres`` [n, 2] (row, column), clipped at borders."""
    n, _, h, w = x.shape
    if side <= 0:
        return x
    centres = centres.to(x.device).long()
    y0 = centres[:, 0:1] - side // 2
    x0 = centres[:, 1:2] - side // 2
    rows = torch.arange(h, device=x.device).unsqueeze(0)
    cols = torch.arange(w, device=x.device).unsqueeze(0)
    in_rows = (rows >= y0) & (rows < y0 + side)
    in_cols = (cols >= x0) & (cols < x0 + side)
    mask = (in_rows.unsqueeze(2) & in_cols.unsqueeze(1)).unsqueeze(1)
    return x.masked_fill(mask, 0.0)


_TO_YIQ = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]], dtype=torch.float64)
# Exact numerical inverse (not the rounded textbook one) so a zero hue shift is the identity up to float rounding.
_FROM_YIQ = torch.linalg.inv(_TO_YIQ)


def hue_rotate(x: Tensor, shift: Tensor) -> Tensor:
    """Shift hue by ``shift`` [n] turns: rotate the (I, Q) chroma plane, keep luma Y."""
    to_yiq, from_yiq = _TO_YIQ.to(x.device, x.dtype), _FROM_YIQ.to(x.device, x.dtype)
    a = 2 * math.pi * shift.to(x.device, x.dtype)
    cos, sin = torch.cos(a), torch.sin(a)
    one, zero = torch.ones_like(a), torch.zeros_like(a)
    rot = torch.stack([torch.stack([one, zero, zero], -1), torch.stack([zero, cos, -sin], -1),
                       torch.stack([zero, sin, cos], -1)], -2)
    m = from_yiq @ rot @ to_yiq  # [n, 3, 3]
    # Three multiply-adds per output channel instead of a batched matmul (whose blocking may follow the batch).
    channels = [sum(m[:, i, j].view(-1, 1, 1) * x[:, j] for j in range(3)) for i in range(3)]
    return torch.stack(channels, dim=1).clamp_(0.0, 1.0)


def blur_kernel_size(size: int) -> int:
    """Gaussian blur window: ~10% of the image side, odd, at least 3 (SimCLR's rule)."""
    k = int(0.1 * size)
    k += 1 - k % 2
    return max(3, k)


_blur_kernel_size = blur_kernel_size


def gaussian_blur(x: Tensor, sigma: Tensor) -> Tensor:
    """Separable Gaussian blur with a per-sample ``sigma`` [n], reflect padding."""
    n, c, h, w = x.shape
    k = blur_kernel_size(min(h, w))
    half = k // 2
    taps = torch.arange(k, device=x.device, dtype=x.dtype) - half
    kernel = torch.exp(-(taps.unsqueeze(0) ** 2) / (2 * sigma.to(x.device, x.dtype).unsqueeze(1) ** 2))
    kernel = kernel / kernel.double().sum(1, keepdim=True).to(x.dtype)
    weights = [kernel[:, t].view(-1, 1, 1, 1) for t in range(k)]
    mode = "reflect" if half < min(h, w) else "replicate"
    y = _shifted_sum(F.pad(x, (half, half, 0, 0), mode=mode), weights, h, w, vertical=False)
    return _shifted_sum(F.pad(y, (0, 0, half, half), mode=mode), weights, h, w, vertical=True)
