"""Batched, tensor-only image augmentations for SCAN.

Images live in memory as uint8 tensors ``[N, C, S, S]`` (C = 1 or 3).  Every
transform here takes a whole batch and draws *per-sample* random parameters,
so one call costs a handful of vectorised torch ops instead of a Python loop
over PIL images.  That is what makes CPU training of the demo presets fast,
and the same code runs unchanged on CUDA tensors.

All randomness comes from the torch global RNG of the input's device
(``torch.rand`` / ``torch.randint`` with ``device=x.device``): saving and
restoring ``torch.get_rng_state()`` (or the CUDA one) reproduces the
augmentations exactly, which checkpoint/resume relies on.

Distributed runs: every per-sample draw goes through :mod:`.batch_rng`, so
inside ``with global_batch(size, offset):`` a rank augments its slice of the
global batch exactly as one process augments those rows.

Kinds built by :func:`make_transform`:

``"eval"``
    ``x / 255``, optional bilinear (antialiased) resize, per-channel normalise.
``"simclr"``
    Random resized crop + horizontal flip as ONE ``grid_sample`` per batch,
    then colour jitter (prob ``jitter_prob``), random grayscale, optional
    Gaussian blur, normalise.  Jitter is applied in a FIXED order
    (brightness, contrast, saturation, hue) rather than torchvision's random
    order: a random order would need every op evaluated in every slot.
    Hue is a rotation of the chroma plane in YIQ space (no HSV round trip).
``"weak"``
    The simclr geometry with ``crop_scale_min`` raised to
    ``max(cfg.crop_scale_min, 0.6)`` plus an optional random translation of
    up to ``translate_frac`` of the size; no colour jitter, grayscale or blur.
``"strong"``
    SCAN's self-labelling augmentation: flip, ``strong_ops`` RandAugment-style
    ops drawn uniformly with replacement per sample, normalise, Cutout.

Deviations from the PIL/torchvision originals, all deliberate:

* crops have continuous (sub-pixel) sizes and offsets instead of integer
  ones; after 10 rejected tries a sample falls back to the centred crop of
  the whole image with the ratio clamped into ``crop_ratio`` (torchvision's
  rule), so ``crop_scale_min=1`` gives the identity crop.
* crop sampling uses ``padding_mode="border"`` (crops lie inside the image,
  so this only avoids darkening half-pixel edges); translations and the
  strong geometric ops fill with 0 (black), as PIL does by default.
* shears and rotations act about the image centre, not PIL's top-left
  corner, so sheared content stays centred.
* colour ops work on float ``[0, 1]``; equalize/posterize quantise to the 256
  uint8 levels first, others are not re-quantised after each op.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .batch_rng import global_batch
from .batch_rng import rand as _rand
from .batch_rng import randint as _randint

__all__ = [
    "global_batch",
    "AugmentConfig",
    "KINDS",
    "STRONG_OPS",
    "normalize",
    "make_transform",
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

_CROP_ATTEMPTS = 10

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
        if self.strong_ops < 0:
            raise ValueError(f"strong_ops must be >= 0, got {self.strong_ops}")


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


def _uniform(n: int, lo: float, hi: float, device: torch.device) -> Tensor:
    return lo + (hi - lo) * _rand(n, device=device)


def _affine(x: Tensor, lin: Tensor, shift: Tensor, padding_mode: str = "zeros", size: tuple[int, int] | None = None) -> Tensor:
    """Sample ``x`` at ``lin @ p + shift`` for every output point ``p``.

    ``lin`` [n,2,2] and ``shift`` [n,2] are in grid_sample's normalised
    coordinates (x right, y down, [-1, 1] spanning the image edges).
    """
    n, c, h, w = x.shape
    oh, ow = size if size is not None else (h, w)
    theta = torch.cat([lin, shift.unsqueeze(-1)], dim=2).to(x.dtype)
    grid = F.affine_grid(theta, [n, c, oh, ow], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode=padding_mode, align_corners=False)


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
    hist = torch.bincount((levels + offsets).view(-1), minlength=n * c * 256).view(n * c, 256)
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
    mean = _grayscale(x).mean(dim=(1, 2, 3), keepdim=True)
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
    kernel = torch.ones(3, 3, dtype=x.dtype, device=x.device)
    kernel[1, 1] = 5.0
    kernel = (kernel / 13).expand(c, 1, 3, 3)
    smooth = F.conv2d(x, kernel, groups=c)
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


def cutout(x: Tensor, side: int) -> Tensor:
    """Zero one ``side``-square per sample at a uniformly random centre, clipped at borders."""
    n, _, h, w = x.shape
    if side <= 0:
        return x
    cy = _randint(h, n, 1, device=x.device)
    cx = _randint(w, n, 1, device=x.device)
    y0, x0 = cy - side // 2, cx - side // 2
    rows = torch.arange(h, device=x.device).unsqueeze(0)
    cols = torch.arange(w, device=x.device).unsqueeze(0)
    in_rows = (rows >= y0) & (rows < y0 + side)
    in_cols = (cols >= x0) & (cols < x0 + side)
    mask = (in_rows.unsqueeze(2) & in_cols.unsqueeze(1)).unsqueeze(1)
    return x.masked_fill(mask, 0.0)


# ---------------------------------------------------------------------------
# simclr / weak pieces


def _crop_flip_affine(
    b: int,
    h: int,
    w: int,
    scale_min: float,
    ratio: tuple[float, float],
    flip: bool,
    translate_frac: float,
    device: torch.device,
) -> tuple[Tensor, Tensor]:
    """Per-sample affine (lin [b,2,2], shift [b,2]) of a random resized crop + flip."""
    area = float(h * w)
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    target = area * (scale_min + (1.0 - scale_min) * _rand(b, _CROP_ATTEMPTS, device=device))
    aspect = torch.exp(log_lo + (log_hi - log_lo) * _rand(b, _CROP_ATTEMPTS, device=device))
    cw_all = torch.sqrt(target * aspect)
    ch_all = torch.sqrt(target / aspect)
    ok = (cw_all <= w) & (ch_all <= h)
    # argmax returns the first maximal index, i.e. the first accepted attempt.
    first = ok.to(torch.int32).argmax(dim=1, keepdim=True)
    found = ok.any(dim=1)
    cw = cw_all.gather(1, first).squeeze(1)
    ch = ch_all.gather(1, first).squeeze(1)

    in_ratio = w / h
    if in_ratio < ratio[0]:
        fw, fh = float(w), w / ratio[0]
    elif in_ratio > ratio[1]:
        fw, fh = h * ratio[1], float(h)
    else:
        fw, fh = float(w), float(h)
    cw = torch.where(found, cw, torch.full_like(cw, fw))
    ch = torch.where(found, ch, torch.full_like(ch, fh))
    pos = _rand(b, 2, device=device)
    # Fallback crops are centred (pos = 0.5), accepted ones uniform inside.
    pos = torch.where(found.unsqueeze(1), pos, torch.full_like(pos, 0.5))
    cx = pos[:, 0] * (w - cw) + cw / 2
    cy = pos[:, 1] * (h - ch) + ch / 2

    sx = cw / w
    if flip:
        sx = torch.where(_rand(b, device=device) < 0.5, -sx, sx)
    sy = ch / h
    tx = 2 * cx / w - 1
    ty = 2 * cy / h - 1
    if translate_frac > 0:
        shift = translate_frac * (2 * _rand(b, 2, device=device) - 1)
        tx = tx + 2 * shift[:, 0]
        ty = ty + 2 * shift[:, 1]
    zero = torch.zeros_like(sx)
    lin = torch.stack([torch.stack([sx, zero], -1), torch.stack([zero, sy], -1)], -2)
    return lin, torch.stack([tx, ty], -1)


_TO_YIQ = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]], dtype=torch.float64)
# Exact numerical inverse (not the rounded textbook one) so a zero hue shift
# is the identity up to float rounding.
_FROM_YIQ = torch.linalg.inv(_TO_YIQ)


def _hue_rotate(x: Tensor, shift: Tensor) -> Tensor:
    """Shift hue by ``shift`` turns: rotate the (I, Q) chroma plane, keep luma Y."""
    to_yiq, from_yiq = _TO_YIQ.to(x.device, x.dtype), _FROM_YIQ.to(x.device, x.dtype)
    a = 2 * math.pi * shift
    cos, sin = torch.cos(a), torch.sin(a)
    one, zero = torch.ones_like(a), torch.zeros_like(a)
    rot = torch.stack(
        [
            torch.stack([one, zero, zero], -1),
            torch.stack([zero, cos, -sin], -1),
            torch.stack([zero, sin, cos], -1),
        ],
        -2,
    )
    m = from_yiq @ rot @ to_yiq
    return torch.einsum("bij,bjhw->bihw", m, x).clamp_(0.0, 1.0)


def _color_jitter(x: Tensor, cfg: AugmentConfig) -> Tensor:
    b, c = x.shape[:2]
    dev = x.device
    apply = _rand(b, device=dev) < cfg.jitter_prob
    y = x
    if cfg.brightness > 0:
        f = _uniform(b, max(0.0, 1 - cfg.brightness), 1 + cfg.brightness, dev)
        y = adjust_brightness(y, f)
    if cfg.contrast > 0:
        f = _uniform(b, max(0.0, 1 - cfg.contrast), 1 + cfg.contrast, dev)
        y = adjust_contrast(y, f)
    if c == 3 and cfg.saturation > 0:
        f = _uniform(b, max(0.0, 1 - cfg.saturation), 1 + cfg.saturation, dev)
        y = adjust_color(y, f)
    if c == 3 and cfg.hue > 0:
        y = _hue_rotate(y, _uniform(b, -cfg.hue, cfg.hue, dev))
    return torch.where(apply.view(-1, 1, 1, 1), y, x)


def _blur_kernel_size(size: int) -> int:
    k = int(0.1 * size)
    k += 1 - k % 2
    return max(3, k)


def _gaussian_blur(x: Tensor, sigma: Tensor) -> Tensor:
    n, c, h, w = x.shape
    k = _blur_kernel_size(min(h, w))
    half = k // 2
    ax = torch.arange(k, device=x.device, dtype=x.dtype) - half
    kern = torch.exp(-(ax.unsqueeze(0) ** 2) / (2 * sigma.unsqueeze(1) ** 2))
    kern = (kern / kern.sum(1, keepdim=True)).repeat_interleave(c, dim=0)
    # Folding the batch into channels lets one grouped conv use per-sample kernels.
    y = x.reshape(1, n * c, h, w)
    mode = "reflect" if half < min(h, w) else "replicate"
    y = F.conv2d(F.pad(y, (half, half, 0, 0), mode=mode), kern.view(n * c, 1, 1, k), groups=n * c)
    y = F.conv2d(F.pad(y, (0, 0, half, half), mode=mode), kern.view(n * c, 1, k, 1), groups=n * c)
    return y.view(n, c, h, w)


# ---------------------------------------------------------------------------
# transform objects


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


class _BatchTransform:
    """Picklable callable ``uint8 [B,C,S,S] -> float32 [B,C,out,out]`` for one kind."""

    def __init__(
        self,
        kind: str,
        cfg: AugmentConfig,
        mean: Sequence[float],
        std: Sequence[float],
        out_size: int | None,
    ) -> None:
        self.kind = kind
        self.cfg = cfg
        self.mean, self.std = normalization_stats(mean, std)
        self.out_size = out_size
        # Per-device cache so CUDA callers do not pay a host->device copy per batch.
        self._stats: dict[tuple[str, int], tuple[Tensor, Tensor]] = {}

    def __repr__(self) -> str:
        return f"BatchTransform(kind={self.kind!r}, out_size={self.out_size}, cfg={self.cfg})"

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_stats"] = {}
        return state

    def _normalize(self, x: Tensor) -> Tensor:
        c = x.shape[1]
        key = (str(x.device), c)
        stats = self._stats.get(key)
        if stats is None:
            stats = (_channel_param(self.mean, c, x, "mean"), _channel_param(self.std, c, x, "std"))
            self._stats[key] = stats
        return _normalize_unit(x, *stats)

    def _out_hw(self, h: int, w: int) -> tuple[int, int]:
        return (h, w) if self.out_size is None else (self.out_size, self.out_size)

    def __call__(self, x: Tensor) -> Tensor:
        x = _to_unit(x)
        c = x.shape[1]
        if len(self.mean) != c:
            raise ValueError(f"mean/std have {len(self.mean)} values but the images have {c} channels")
        if self.kind == "eval":
            return self._normalize(self._resize(x))
        if c not in (1, 3):
            raise ValueError(f"augmentations need 1 or 3 channels, got {c}")
        if self.kind == "simclr":
            return self._simclr(x, self.cfg.crop_scale_min, colour=True, translate=0.0)
        if self.kind == "weak":
            scale = max(self.cfg.crop_scale_min, WEAK_MIN_SCALE)
            return self._simclr(x, scale, colour=False, translate=self.cfg.translate_frac)
        return self._strong(x)

    def _resize(self, x: Tensor) -> Tensor:
        h, w = x.shape[-2:]
        oh, ow = self._out_hw(h, w)
        if (oh, ow) == (h, w):
            return x
        return F.interpolate(x, size=(oh, ow), mode="bilinear", align_corners=False, antialias=True)

    def _simclr(self, x: Tensor, scale_min: float, colour: bool, translate: float) -> Tensor:
        cfg = self.cfg
        b, c, h, w = x.shape
        lin, shift = _crop_flip_affine(b, h, w, scale_min, cfg.crop_ratio, cfg.flip, translate, x.device)
        # Pure crops stay inside the image, so "border" only removes the
        # half-pixel darkening at crop edges; translated views fill with 0.
        pad = "zeros" if translate > 0 else "border"
        x = _affine(x, lin, shift, padding_mode=pad, size=self._out_hw(h, w))
        if colour:
            if cfg.jitter_prob > 0:
                x = _color_jitter(x, cfg)
            if c == 3 and cfg.grayscale_prob > 0:
                gray = _rand(b, device=x.device) < cfg.grayscale_prob
                x = torch.where(gray.view(-1, 1, 1, 1), _grayscale(x).expand_as(x), x)
            if cfg.blur_prob > 0:
                sigma = _uniform(b, 0.1, 2.0, x.device)
                chosen = (_rand(b, device=x.device) < cfg.blur_prob).nonzero().squeeze(1)
                if chosen.numel() > 0:
                    x = x.index_copy(0, chosen, _gaussian_blur(x[chosen], sigma[chosen]))
        return self._normalize(x)

    def _strong(self, x: Tensor) -> Tensor:
        cfg = self.cfg
        x = self._resize(x)
        b = x.shape[0]
        dev = x.device
        if cfg.flip:
            flip = _rand(b, device=dev) < 0.5
            x = torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)
        k = cfg.strong_ops
        if k > 0:
            n_ops = len(_STRONG_TABLE)
            op_ids = _randint(n_ops, b, k, device=dev).T
            u = _rand(b, k, device=dev).T
            negate = _rand(b, k, device=dev).T < 0.5
            for slot in range(k):
                x = self._strong_slot(x, op_ids[slot], u[slot], negate[slot])
        x = self._normalize(x)
        side = int(round(cfg.cutout_frac * x.shape[-1]))
        return cutout(x, side)

    @staticmethod
    def _strong_slot(x: Tensor, op_ids: Tensor, u: Tensor, negate: Tensor) -> Tensor:
        # Grouping samples by op id turns 14 masked passes into contiguous
        # slices, with a single host sync (the counts) per slot.
        sorted_ids, order = torch.sort(op_ids, stable=True)
        counts = torch.bincount(sorted_ids, minlength=len(_STRONG_TABLE)).tolist()
        xs = torch.split(x[order], counts)
        us = torch.split(u[order].to(x.dtype), counts)
        negs = torch.split(negate[order], counts)
        n_col = len(_COLOUR_OPS)
        outs, geo = [], []
        for op_id, (entry, part, up, neg) in enumerate(zip(_STRONG_TABLE, xs, us, negs)):
            if part.shape[0] == 0:
                continue
            _name, fn, lo, hi, signed = entry
            mag = lo + (hi - lo) * up
            if signed:
                mag = torch.where(neg, -mag, mag)
            if op_id < n_col:
                outs.append(fn(part, mag))
            else:
                geo.append((part, *fn(mag, *x.shape[-2:])))
        if geo:
            parts, lins, shifts = zip(*geo)
            outs.append(_affine(torch.cat(parts), torch.cat(lins), torch.cat(shifts)))
        y = torch.cat(outs)
        result = torch.empty_like(y)
        result[order] = y
        return result


def make_transform(
    kind: str,
    cfg: AugmentConfig,
    mean: Sequence[float],
    std: Sequence[float],
    out_size: int | None = None,
) -> Callable[[Tensor], Tensor]:
    """Build a batched transform ``uint8 [B,C,S,S] -> float32 [B,C,out,out]``.

    ``kind`` is one of ``"simclr"``, ``"weak"``, ``"strong"``, ``"eval"``;
    ``mean``/``std`` have one value per channel; ``out_size`` (default: the
    input size) is the square output side.
    """
    check_kind(kind)
    return _BatchTransform(kind, cfg, mean, std, check_out_size(out_size))
