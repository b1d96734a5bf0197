"""NVIDIA DALI backend for the batched augmentations of :mod:`scan_dist.data.augment`.

``data.backend=dali`` swaps :func:`scan_dist.data.augment.make_transform` for
:func:`make_dali_transform`, a callable with the same contract: a ``uint8 [B, C, S, S]``
tensor batch (C = 1 or 3) in, a normalised ``float32 [B, C, out, out]`` NCHW tensor out, on
``device``.  It runs DALI pipelines built with :func:`nvidia.dali.pipeline_def` and fed by
``fn.external_source`` with numpy HWC batches: on CUDA the operators run on the GPU
(``device_id`` = the CUDA index), otherwise DALI's CPU operators run with ``device_id=None``
(fine for tests, slow for training).  One pipeline is built per ``(C, H, W)`` input shape; its
``batch_size`` is the largest batch seen so far (smaller batches, e.g. the last partial one,
are fed as they are; a larger one rebuilds the pipeline).  :func:`jpeg_folder_pipeline` is
the throughput path: it reads, decodes (nvJPEG on GPU) and augments a folder of JPEGs, sharded
and epoch-exact.  DALI is imported lazily; without it every entry point raises a one-line
:class:`~scan_dist.errors.ConfigError`.

Randomness -- read this before using DALI for distributed or resumed runs
    Every pipeline draws its DALI ``seed`` from the torch CPU generator (one
    ``torch.randint`` per pipeline build), so a run is reproducible from the torch seed.
    DALI's per-sample random numbers are NOT the split-independent draws of
    :mod:`scan_dist.data.batch_rng`: ``global_batch`` has no effect here.  Consequences:
    N processes with DALI are *statistically*, not bitwise, equal to one process (each rank
    draws its own augmentations); restoring ``torch.get_rng_state()`` mid-epoch replays
    *different* augmentations (the pipeline keeps its own RNG state, and a rebuild reseeds
    it); and the torch and DALI backends never produce the same random views.  Exact
    resume and rank-count-invariant augmentation need ``data.backend=torchvision``.

Kinds (same names and meaning as :mod:`.augment`; differences listed per kind):

``"eval"``
    Optional resize (linear, antialiased, as torch's ``F.interpolate(antialias=True)``; kept in
    float) and ``(x / 255 - mean) / std`` via ``fn.crop_mirror_normalize``.  Without a resize,
    and when upscaling, it equals the torch backend up to float rounding (~1e-6); when
    downscaling, the interior is identical and the one-pixel border differs (the filters treat
    the image edge differently: up to ~0.1 in normalised units at 2x).
``"simclr"``
    ``fn.random_resized_crop`` (area in ``[crop_scale_min, 1]``, log-uniform ratio,
    10 attempts, bilinear without antialias like torch's ``grid_sample``; integer crop
    boxes and DALI's own fallback instead of torch's sub-pixel crops), horizontal flip (a
    per-sample ``mirror`` of ``fn.crop_mirror_normalize``), colour jitter with probability
    ``jitter_prob`` in torch's fixed order -- brightness (scale), contrast (blend towards the
    sample's mean luma), saturation (blend towards the ITU-R 601 luma), hue (``fn.hsv``, a
    rotation of the YIQ chroma plane like torch's, with DALI's rounded YIQ constants: within
    0.4 grey levels) -- random grayscale (luma, prob ``grayscale_prob``), optional ``fn.gaussian_blur``
    (prob ``blur_prob``, sigma in [0.1, 2], torch's kernel size, reflect-101 border like torch).
    The jitter runs on float pixels in [0, 255], clamped after every step as in torch.
``"weak"``
    The simclr crop with ``crop_scale_min`` raised to ``max(cfg.crop_scale_min, 0.6)`` and the
    flip.  With ``translate_frac > 0`` the crop window (``fn.random_crop_generator``) is shifted
    inside the input by up to ``translate_frac`` of its size and sampled by one
    ``fn.warp_affine`` that fills outside the image with 0 -- torch's construction.
``"strong"``
    Optional resize, ``cfg.strong_ops`` ops drawn uniformly with replacement per sample from
    the same 14-op table with the same magnitude ranges (``augment.STRONG_OPS``), flip,
    normalise, Cutout (``fn.erase``, square of ``round(cutout_frac * out)`` at a uniform
    integer centre, clipped at the border, filled with 0 after normalisation, as in torch).
    Per-sample op choice uses DALI conditional execution (``if`` on a per-sample op id), so
    each sample only runs its own op.  All 14 ops are covered:

    * identity, solarize, posterize, brightness, color (saturation), contrast, autocontrast:
      the same formulas as torch, as DALI arithmetic on float pixels (exact up to float
      rounding; posterize rounds half up where torch rounds half to even);
    * sharpness: PIL's SMOOTH kernel via ``fn.filter`` with the one-pixel border left
      unfiltered, as torch (exact up to rounding);
    * equalize: ``fn.equalize`` -- OpenCV's histogram equalisation, not PIL's LUT rule that
      torch reproduces (DALI has no histogram op to rebuild PIL's).  PIL's integer step makes it
      brighter and partly saturated on small images: on average ~23 grey levels apart on 32x32,
      ~11 on 96x96, ~8 on 224x224;
    * rotate, shear_x, shear_y, translate_x, translate_y: one ``fn.warp_affine`` with a
      per-sample matrix equal to torch's (about the image centre, bilinear, fill 0);
    * the flip is applied *after* the ops (free, inside ``crop_mirror_normalize``) instead of
      before: all geometric magnitudes are symmetric, so the distribution is the same.

Grayscale (C = 1) images skip the colour-only steps (saturation, hue, grayscale, color) as the
torch backend does.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Iterator, Sequence

import numpy as np
import torch
from torch import Tensor

from scan_dist.errors import ConfigError

from .augment import (_LUMA, STRONG_OPS, WEAK_MIN_SCALE, AugmentConfig, _blur_kernel_size, check_kind, check_out_size,
                      normalization_stats)

__all__ = [
    "BACKENDS",
    "DALI_MISSING",
    "dali_available",
    "resolve_backend",
    "make_dali_transform",
    "DaliTransform",
    "jpeg_folder_pipeline",
    "DaliJpegLoader",
]

BACKENDS = ("auto", "torchvision", "dali")
DALI_MISSING = (
    "data.backend=dali needs NVIDIA DALI: pip install -e .[dali] (nvidia-dali-cuda130), "
    "or use data.backend=torchvision"
)

# Identity blur: a Gaussian this narrow has all its weight on the centre tap.
_NO_BLUR_SIGMA = 1e-3
_CROP_ATTEMPTS = 10
# Leaf order of the strong-op dispatch: the 9 colour ops one by one, then all geometric ops as
# one leaf (they share a single warp_affine).  Ids are indices into augment.STRONG_OPS.
_GEOMETRIC = ("rotate", "shear_x", "shear_y", "translate_x", "translate_y")
_N_COLOUR = len(STRONG_OPS) - len(_GEOMETRIC)
assert STRONG_OPS[_N_COLOUR:] == _GEOMETRIC, "augment.STRONG_OPS changed: update dali._strong_leaf"


# ---------------------------------------------------------------------------
# availability


def _dali() -> SimpleNamespace:
    """Import DALI or raise the one-line ConfigError."""
    try:
        import nvidia.dali.fn as fn
        import nvidia.dali.math as dmath
        import nvidia.dali.types as types
        from nvidia.dali import pipeline_def
    except (ImportError, OSError) as exc:  # OSError: a wheel whose native libraries fail to load
        raise ConfigError(DALI_MISSING) from exc
    return SimpleNamespace(fn=fn, math=dmath, types=types, pipeline_def=pipeline_def)


def dali_available() -> bool:
    """True when NVIDIA DALI imports."""
    try:
        _dali()
    except ConfigError:
        return False
    return True


def resolve_backend(name: str, device: torch.device | str) -> str:
    """Map ``data.backend`` (``auto|torchvision|dali``) to ``"torchvision"`` or ``"dali"``.

    ``auto`` picks DALI only when it is installed *and* ``device`` is CUDA (on CPU the torch
    backend is much faster); ``dali`` insists (ConfigError without DALI).
    """
    if name not in BACKENDS:
        raise ConfigError(f"data.backend must be one of {', '.join(BACKENDS)}, got {name!r}")
    if name == "torchvision":
        return "torchvision"
    if name == "dali":
        _dali()
        return "dali"
    return "dali" if torch.device(device).type == "cuda" and dali_available() else "torchvision"


def _default_threads() -> int:
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return max(1, min(8, cores))


def _seed_from_torch() -> int:
    # One draw from the torch CPU generator per pipeline build: reproducible from the torch seed.
    return int(torch.randint(0, 2**31 - 1, (1,)).item())


def _device_id(device: torch.device) -> int | None:
    if device.type != "cuda":
        return None
    return device.index if device.index is not None else torch.cuda.current_device()


# ---------------------------------------------------------------------------
# graph pieces (called while a pipeline_def function is traced; x is an HWC DataNode)


@dataclass(frozen=True)
class _Spec:
    kind: str
    cfg: AugmentConfig
    mean: tuple[float, ...]
    std: tuple[float, ...]
    channels: int
    out_hw: tuple[int, int]


def _clamp(d, x):
    return d.math.clamp(x, 0.0, 255.0)


def _blend(d, x, degenerate, factor):
    return _clamp(d, degenerate + factor * (x - degenerate))


def _luma(x, c: int):
    if c == 1:
        return x
    return x[:, :, 0:1] * _LUMA[0] + x[:, :, 1:2] * _LUMA[1] + x[:, :, 2:3] * _LUMA[2]


def _mean_luma(d, x, c: int):
    m = d.fn.reductions.mean(x, axes=(0, 1))
    if c == 1:
        return m[0]
    return m[0] * _LUMA[0] + m[1] * _LUMA[1] + m[2] * _LUMA[2]


def _uniform(d, lo: float, hi: float):
    return d.fn.random.uniform(range=(float(lo), float(hi)))


def _coin(d, p: float):
    """Per-sample float 1.0 with probability ``p``, else 0.0."""
    return d.fn.cast(d.fn.random.coin_flip(probability=float(p)), dtype=d.types.FLOAT)


def _colour(d, x, cfg: AugmentConfig, c: int, out_hw: tuple[int, int]):
    """Colour jitter (prob ``jitter_prob``), grayscale and blur of float HWC pixels in [0, 255]."""
    if cfg.jitter_prob > 0:
        apply = _coin(d, cfg.jitter_prob)

        def factor(spread: float):
            # Samples without jitter get the identity factor 1.
            return 1.0 + apply * (_uniform(d, max(0.0, 1 - spread), 1 + spread) - 1.0)

        if cfg.brightness > 0:
            x = _clamp(d, x * factor(cfg.brightness))
        if cfg.contrast > 0:
            x = _blend(d, x, _mean_luma(d, x, c), factor(cfg.contrast))
        if c == 3 and cfg.saturation > 0:
            x = _blend(d, x, _luma(x, c), factor(cfg.saturation))
        if c == 3 and cfg.hue > 0:
            # DALI's hue turns the YIQ chroma plane the other way round from torch's _hue_rotate.
            shift = apply * _uniform(d, -cfg.hue, cfg.hue)
            x = _clamp(d, d.fn.hsv(x, hue=shift * -360.0, dtype=d.types.FLOAT))
    if c == 3 and cfg.grayscale_prob > 0:
        keep = 1.0 - _coin(d, cfg.grayscale_prob)
        gray = _luma(x, c)
        x = gray + keep * (x - gray)
    if cfg.blur_prob > 0:
        on = _coin(d, cfg.blur_prob)
        sigma = _NO_BLUR_SIGMA + on * (_uniform(d, 0.1, 2.0) - _NO_BLUR_SIGMA)
        window = _blur_kernel_size(min(out_hw))
        x = d.fn.gaussian_blur(x, sigma=sigma, window_size=window, dtype=d.types.FLOAT)
    return x


def _random_crop(d, x, spec: _Spec, scale_min: float):
    lo, hi = spec.cfg.crop_ratio
    return d.fn.random_resized_crop(
        x,
        size=list(spec.out_hw),
        random_area=[float(scale_min), 1.0],
        random_aspect_ratio=[float(lo), float(hi)],
        num_attempts=_CROP_ATTEMPTS,
        antialias=False,
        dtype=d.types.FLOAT,
    )


def _affine_matrix(d, l00, l01, l10, l11, tx, ty, h: int, w: int):
    """2x3 destination->source matrix in pixel-edge coordinates: src = L (dst - c) + c + t."""
    cx, cy = w / 2.0, h / 2.0
    m02 = cx + tx - (l00 * cx + l01 * cy)
    m12 = cy + ty - (l10 * cx + l11 * cy)
    return d.fn.reshape(d.fn.stack(l00, l01, m02, l10, l11, m12), shape=[2, 3])


def _crop_translate(d, x, spec: _Spec, scale_min: float, frac: float, shape):
    """Random resized crop whose window is shifted by up to ``frac`` of the input size (weak view).

    As torch's ``_crop_flip_affine``: the crop window moves inside the *input* (uniform shift in
    ``[-frac, frac] * W`` and ``* H``), and only the part that leaves the image is filled with 0.
    ``fn.random_crop_generator`` draws the window from ``shape`` (the HW[C] input shape, on the
    CPU) and one ``fn.warp_affine`` samples it (bilinear, no antialias, like ``grid_sample``).
    """
    oh, ow = spec.out_hw
    lo, hi = spec.cfg.crop_ratio
    anchor, size = d.fn.random_crop_generator(
        shape,
        random_area=[float(scale_min), 1.0],
        random_aspect_ratio=[float(lo), float(hi)],
        num_attempts=_CROP_ATTEMPTS,
    )
    anchor = d.fn.cast(anchor, dtype=d.types.FLOAT)
    size = d.fn.cast(size, dtype=d.types.FLOAT)
    in_h = d.fn.cast(shape[0], dtype=d.types.FLOAT)
    in_w = d.fn.cast(shape[1], dtype=d.types.FLOAT)
    tx = _uniform(d, -frac, frac) * in_w
    ty = _uniform(d, -frac, frac) * in_h
    zero = tx * 0.0  # a 0-D float per sample, like the other entries
    matrix = d.fn.reshape(
        d.fn.stack(size[1] / float(ow), zero, anchor[1] + tx, zero, size[0] / float(oh), anchor[0] + ty),
        shape=[2, 3],
    )
    x = d.fn.warp_affine(x, matrix=matrix, size=[float(oh), float(ow)], fill_value=0.0, dtype=d.types.FLOAT)
    return x


def _normalize(d, x, spec: _Spec, flip: bool, **crop):
    kwargs = {}
    if flip:
        kwargs["mirror"] = d.fn.random.coin_flip(probability=0.5)
    return d.fn.crop_mirror_normalize(
        x,
        dtype=d.types.FLOAT,
        output_layout="CHW",
        mean=[255.0 * m for m in spec.mean],
        std=[255.0 * s for s in spec.std],
        **kwargs,
        **crop,
    )


# -- strong ops: x is float HWC in [0, 255]; u uniform [0, 1); sign +-1; op the int32 op id


def _autocontrast(d, x):
    lo = d.fn.reductions.min(x, axes=(0, 1))
    hi = d.fn.reductions.max(x, axes=(0, 1))
    span = hi - lo
    varies = d.fn.cast(span > 0.0, dtype=d.types.FLOAT)
    # Constant channels are left alone, as in PIL / torch.
    scale = varies * (255.0 / d.math.max(span, 1e-6)) + (1.0 - varies)
    return _clamp(d, (x - lo * varies) * scale)


def _equalize(d, x):
    levels = d.fn.cast(_clamp(d, d.math.floor(x + 0.5)), dtype=d.types.UINT8)
    return d.fn.cast(d.fn.equalize(levels), dtype=d.types.FLOAT)


def _solarize(d, x, u):
    threshold = 256.0 * u
    above = d.fn.cast(x >= threshold, dtype=d.types.FLOAT)
    return x + above * (255.0 - 2.0 * x)


def _posterize(d, x, u):
    bits = d.math.clamp(d.math.floor(4.0 + 5.0 * u), 4.0, 8.0)
    step = d.math.pow(2.0, 8.0 - bits)
    return d.math.floor(d.math.floor(x + 0.5) / step) * step


def _sharpness(d, x, factor, border_mask):
    kernel = np.ones((3, 3), dtype=np.float32)
    kernel[1, 1] = 5.0
    # The filter is an operator input, so it must live on the device of x.
    smooth = d.fn.filter(x, d.types.Constant(kernel / 13.0, device=x.device), dtype=d.types.FLOAT)
    # PIL leaves the one-pixel border of the degenerate image unfiltered.
    degenerate = x + border_mask * (smooth - x)
    return _blend(d, x, degenerate, factor)


def _geometric(d, x, op, u, sign, h: int, w: int):
    """rotate / shear_x / shear_y / translate_x / translate_y as one per-sample warp_affine."""
    base = _N_COLOUR
    is_rot, is_shx, is_shy, is_tx, is_ty = (
        d.fn.cast(op == base + i, dtype=d.types.FLOAT) for i in range(len(_GEOMETRIC))
    )
    # Magnitude ranges of augment._GEOMETRIC_OPS: 30 degrees, 0.1 (shear), 0.1 of the size.
    angle = is_rot * u * sign * (30.0 * math.pi / 180.0)
    small = u * sign * 0.1
    cos, sin = d.math.cos(angle), d.math.sin(angle)
    matrix = _affine_matrix(
        d, cos, -sin + is_shx * small, sin + is_shy * small, cos,
        is_tx * small * float(w), is_ty * small * float(h), h, w,
    )
    return d.fn.warp_affine(x, matrix=matrix, fill_value=0.0)


def _strong_leaf(d, leaf: int, x, op, u, sign, c: int, hw: tuple[int, int], border_mask):
    factor = 0.05 + 0.9 * u  # color / contrast / brightness / sharpness magnitudes
    name = STRONG_OPS[leaf] if leaf < _N_COLOUR else "geometric"
    if name == "identity":
        return x
    if name == "autocontrast":
        return _autocontrast(d, x)
    if name == "equalize":
        return _equalize(d, x)
    if name == "solarize":
        return _solarize(d, x, u)
    if name == "posterize":
        return _posterize(d, x, u)
    if name == "color":
        return x if c == 1 else _blend(d, x, _luma(x, c), factor)
    if name == "contrast":
        return _blend(d, x, _mean_luma(d, x, c), factor)
    if name == "brightness":
        return _clamp(d, x * factor)
    if name == "sharpness":
        return _sharpness(d, x, factor, border_mask)
    return _geometric(d, x, op, u, sign, *hw)


def _strong_tree(d, leaves: tuple[int, ...], x, op, u, sign, c, hw, border_mask):
    """Binary tree of per-sample ``if``s over the leaves: every sample runs only its own op."""
    if len(leaves) == 1:
        return _strong_leaf(d, leaves[0], x, op, u, sign, c, hw, border_mask)
    mid = len(leaves) // 2
    if op < leaves[mid]:
        y = _strong_tree(d, leaves[:mid], x, op, u, sign, c, hw, border_mask)
    else:
        y = _strong_tree(d, leaves[mid:], x, op, u, sign, c, hw, border_mask)
    return y


def _strong(d, x, spec: _Spec):
    cfg, c, (h, w) = spec.cfg, spec.channels, spec.out_hw
    if cfg.strong_ops > 0:
        mask = np.zeros((h, w, 1), dtype=np.float32)
        mask[1:-1, 1:-1] = 1.0
        border_mask = d.types.Constant(mask, device=x.device)
        leaves = tuple(range(_N_COLOUR + 1))
        for _slot in range(cfg.strong_ops):
            op = d.fn.random.choice(len(STRONG_OPS))
            u = _uniform(d, 0.0, 1.0)
            sign = 1.0 - 2.0 * _coin(d, 0.5)
            x = _strong_tree(d, leaves, x, op, u, sign, c, (h, w), border_mask)
    x = _normalize(d, x, spec, flip=cfg.flip)
    side = int(round(cfg.cutout_frac * w))
    if side > 0:
        cy = d.fn.cast(d.fn.random.choice(h), dtype=d.types.FLOAT)
        cx = d.fn.cast(d.fn.random.choice(w), dtype=d.types.FLOAT)
        anchor = d.fn.stack(cy - float(side // 2), cx - float(side // 2))
        x = d.fn.erase(x, anchor=anchor, shape=[float(side), float(side)], axis_names="HW", fill_value=0.0)
    return x


def _square(d, x, spec: _Spec, in_hw: tuple[int, int] | None, dtype):
    """Bring ``x`` to the output square: resize a known square, or shorter side + centre crop."""
    oh, ow = spec.out_hw
    if in_hw is not None and tuple(in_hw) == (oh, ow):
        return x if dtype is None else d.fn.cast(x, dtype=dtype)
    # Resized pixels stay float (not re-quantised), as in torch.
    if in_hw is not None:
        return d.fn.resize(x, size=[oh, ow], antialias=True, dtype=d.types.FLOAT)
    x = d.fn.resize(x, resize_shorter=float(min(oh, ow)), antialias=True, dtype=d.types.FLOAT)
    return d.fn.crop(x, crop=[float(oh), float(ow)])


def _view(d, x, spec: _Spec, in_hw: tuple[int, int] | None, shape=None):
    """One augmented view of uint8 HWC ``x`` -> normalised float CHW.

    ``in_hw`` is the (fixed) input size of in-memory batches, or None for decoded files of any
    size (eval/strong then take the shorter-side resize + centre crop of ``datasets.py``;
    simclr/weak crop the whole decoded image, as torchvision's RandomResizedCrop does).
    ``shape``: the per-sample HW[C] shape of ``x`` as a CPU DataNode (used by the translated
    weak view only).
    """
    cfg = spec.cfg
    if spec.kind == "eval":
        return _normalize(d, _square(d, x, spec, in_hw, None), spec, flip=False)  # uint8 when no resize
    if spec.kind == "simclr":
        x = _colour(d, _random_crop(d, x, spec, cfg.crop_scale_min), cfg, spec.channels, spec.out_hw)
        return _normalize(d, x, spec, flip=cfg.flip)
    if spec.kind == "weak":
        scale_min = max(cfg.crop_scale_min, WEAK_MIN_SCALE)
        if cfg.translate_frac > 0:
            x = _crop_translate(d, x, spec, scale_min, cfg.translate_frac, shape)
        else:
            x = _random_crop(d, x, spec, scale_min)
        return _normalize(d, x, spec, flip=cfg.flip)
    return _strong(d, _square(d, x, spec, in_hw, d.types.FLOAT), spec)


def _needs_conditionals(specs: Sequence[_Spec]) -> bool:
    return any(s.kind == "strong" and s.cfg.strong_ops > 0 for s in specs)


# ---------------------------------------------------------------------------
# in-memory batches


class DaliTransform:
    """Callable ``uint8 [B,C,H,W] -> float32 [B,C,out,out]`` (normalised, on ``device``) for one kind.

    Batches are handed to DALI as numpy HWC arrays (a CUDA input is copied to the host first:
    pass CPU batches).  Pipelines are cached per ``(C, H, W)``.
    """

    def __init__(
        self,
        kind: str,
        cfg: AugmentConfig,
        mean: Sequence[float],
        std: Sequence[float],
        out_size: int | None,
        device: torch.device,
        num_threads: int | None = None,
    ) -> None:
        check_kind(kind)
        self.kind = kind
        self.cfg = cfg
        self.mean, self.std = normalization_stats(mean, std)
        self.out_size = out_size
        self.device = torch.device(device)
        self.num_threads = num_threads or _default_threads()
        self._dali = _dali()
        # (C, H, W) -> (pipeline, max batch size)
        self._pipes: dict[tuple[int, int, int], tuple[object, int]] = {}

    def __repr__(self) -> str:
        return f"DaliTransform(kind={self.kind!r}, out_size={self.out_size}, device={self.device}, cfg={self.cfg})"

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_pipes"] = {}
        state["_dali"] = None
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._dali = _dali()

    def _out_hw(self, h: int, w: int) -> tuple[int, int]:
        return (h, w) if self.out_size is None else (self.out_size, self.out_size)

    def _pipeline(self, c: int, h: int, w: int, b: int):
        key = (c, h, w)
        cached = self._pipes.get(key)
        if cached is not None and cached[1] >= b:
            return cached[0]
        d = self._dali
        spec = _Spec(self.kind, self.cfg, self.mean, self.std, c, self._out_hw(h, w))
        on_gpu = self.device.type == "cuda"

        @d.pipeline_def(enable_conditionals=_needs_conditionals([spec]))
        def graph():
            images = d.fn.external_source(name="images", layout="HWC", dtype=d.types.UINT8, device="cpu")
            shape = images.shape()
            if on_gpu:
                images = images.gpu()
            return _view(d, images, spec, (h, w), shape)

        pipe = graph(
            batch_size=b,
            num_threads=self.num_threads,
            device_id=_device_id(self.device),
            seed=_seed_from_torch(),
            # Synchronous: one feed_input, one run, one batch out.
            prefetch_queue_depth=1,
            exec_async=False,
            exec_pipelined=False,
        )
        pipe.build()
        self._pipes[key] = (pipe, b)
        return pipe

    def __call__(self, x: Tensor) -> Tensor:
        if x.dim() != 4:
            raise ValueError(f"expected a batch [B, C, H, W], got shape {tuple(x.shape)}")
        if x.dtype != torch.uint8:
            raise ValueError(f"the DALI backend takes uint8 images, got {x.dtype}")
        b, c, h, w = x.shape
        if len(self.mean) != c:
            raise ValueError(f"mean/std have {len(self.mean)} values but the images have {c} channels")
        if self.kind != "eval" and c not in (1, 3):
            raise ValueError(f"augmentations need 1 or 3 channels, got {c}")
        oh, ow = self._out_hw(h, w)
        if b == 0:
            return torch.empty((0, c, oh, ow), dtype=torch.float32, device=self.device)
        pipe = self._pipeline(c, h, w, b)
        batch = x.detach().permute(0, 2, 3, 1).contiguous().cpu().numpy()
        pipe.feed_input("images", batch, layout="HWC")
        (out,) = pipe.run()
        return _to_torch(out, (b, c, oh, ow), self.device)


def _to_torch(out, shape: tuple[int, ...], device: torch.device) -> Tensor:
    """Copy a dense DALI TensorList into a new torch tensor on ``device``."""
    if device.type == "cuda":
        from nvidia.dali.plugin.pytorch import feed_ndarray

        result = torch.empty(shape, dtype=torch.float32, device=device)
        feed_ndarray(out.as_tensor(), result, cuda_stream=torch.cuda.current_stream(device))
        return result
    array = np.array(out.as_tensor(), copy=True)  # DALI reuses its buffers on the next run
    return torch.from_numpy(array).reshape(shape)


def make_dali_transform(
    kind: str,
    cfg: AugmentConfig,
    mean: Sequence[float],
    std: Sequence[float],
    out_size: int | None = None,
    device: torch.device | str = "cpu",
    num_threads: int | None = None,
) -> DaliTransform:
    """DALI twin of :func:`scan_dist.data.augment.make_transform` (same arguments, same output).

    ``device``: where the output lives and where DALI runs (CUDA -> GPU operators on that
    device; anything else -> CPU operators).  ``num_threads``: DALI CPU worker threads
    (default: the usable cores, at most 8).  Raises ConfigError when DALI is not installed.
    """
    return DaliTransform(kind, cfg, mean, std, check_out_size(out_size), torch.device(device), num_threads)


# ---------------------------------------------------------------------------
# JPEG folders


class DaliJpegLoader:
    """Iterable over one shard of a file list: yields ``{"views": Tensor, "index": int64 Tensor}``.

    ``views`` is ``[B, C, out, out]`` for one kind, or the views of several kinds concatenated
    along the batch (``[V*B, C, out, out]``, kind-major, as the stages' ``torch.cat([v1, v2])``).
    ``index`` (CPU) holds the position of each image in ``files``.  Every ``for`` loop is one epoch
    of this shard; the last, partial batch is returned, never dropped or padded.
    """

    def __init__(self, pipe, iterator, n_views: int, shard_size: int, batch_size: int, device: torch.device):
        self.pipe = pipe
        self._iterator = iterator
        self._n_views = n_views
        self.shard_size = shard_size
        self.batch_size = batch_size
        self.device = device

    def __len__(self) -> int:
        return math.ceil(self.shard_size / self.batch_size)

    def __iter__(self) -> Iterator[dict]:
        for outputs in self._iterator:
            data = outputs[0]
            index = data["index"].reshape(-1).to(torch.int64)
            if index.numel() == 0:  # defensive: DALI iterators can emit an empty trailing batch
                continue
            views = [data[f"view{i}"] for i in range(self._n_views)]
            yield {"views": views[0] if len(views) == 1 else torch.cat(views), "index": index.cpu()}


def jpeg_folder_pipeline(
    files: Sequence[str | os.PathLike],
    kind: str | Sequence[str],
    cfg: AugmentConfig,
    mean: Sequence[float],
    std: Sequence[float],
    out_size: int,
    batch_size: int,
    device: torch.device | str = "cpu",
    shard_id: int = 0,
    num_shards: int = 1,
    num_threads: int | None = None,
    shuffle: bool = False,
    seed: int | None = None,
    prefetch: int = 2,
) -> DaliJpegLoader:
    """Read, decode and augment JPEG ``files`` with DALI; returns a :class:`DaliJpegLoader`.

    ``fn.readers.file`` splits ``files`` into ``num_shards`` contiguous shards (this process
    reads ``shard_id``) with ``pad_last_batch=True``, and the iterator runs with
    ``LastBatchPolicy.PARTIAL``, so each epoch every file is seen exactly once over all shards.
    ``fn.decoders.image`` decodes on the GPU (``"mixed"``, nvJPEG) when ``device`` is CUDA,
    else on the CPU; ``len(mean)`` picks RGB (3) or grayscale (1) decoding.  ``kind`` is one
    kind or a sequence of kinds (e.g. ``("simclr", "simclr")`` or ``("weak", "strong")``):
    each file is decoded once and augmented once per kind.  Geometry: simclr/weak crop the whole
    decoded image (torchvision's RandomResizedCrop); eval/strong first resize the shorter side to
    ``out_size`` and centre-crop it (the load-time geometry of ``datasets.py``).

    ``shuffle``: a new global permutation every epoch (``shuffle_after_epoch``; ``seed`` must
    be the same on every shard); without it shards are fixed (``stick_to_shard``).  ``seed``
    defaults to one ``torch.randint`` draw (same on ranks seeded alike); the augmentation seed
    is ``seed + shard_id`` so shards draw different augmentations.
    """
    d = _dali()
    kinds = (kind,) if isinstance(kind, str) else tuple(kind)
    if not kinds:
        raise ValueError("jpeg_folder_pipeline needs at least one kind")
    for k in kinds:
        check_kind(k)
    mean_t, std_t = normalization_stats(mean, std)
    channels = len(mean_t)
    if channels not in (1, 3):
        raise ValueError(f"JPEG decoding gives 1 or 3 channels, got mean/std for {channels}")
    files = [os.fspath(f) for f in files]
    if not files:
        raise ValueError("jpeg_folder_pipeline needs at least one file")
    if not 0 <= shard_id < num_shards:
        raise ValueError(f"need 0 <= shard_id < num_shards, got shard_id={shard_id}, num_shards={num_shards}")
    if batch_size <= 0 or out_size <= 0:
        raise ValueError(f"batch_size and out_size must be positive, got {batch_size}, {out_size}")
    device = torch.device(device)
    on_gpu = device.type == "cuda"
    seed = _seed_from_torch() if seed is None else int(seed)
    specs = [_Spec(k, cfg, mean_t, std_t, channels, (int(out_size), int(out_size))) for k in kinds]
    image_type = d.types.RGB if channels == 3 else d.types.GRAY

    @d.pipeline_def(enable_conditionals=_needs_conditionals(specs))
    def graph():
        reader_args = {"shuffle_after_epoch": True, "shuffle_after_epoch_seed": seed} if shuffle else {
            "stick_to_shard": True}
        jpegs, index = d.fn.readers.file(
            files=files,
            labels=list(range(len(files))),
            shard_id=shard_id,
            num_shards=num_shards,
            pad_last_batch=True,
            name="Reader",
            **reader_args,
        )
        images = d.fn.decoders.image(jpegs, device="mixed" if on_gpu else "cpu", output_type=image_type)
        shape = d.fn.peek_image_shape(jpegs)
        return tuple(_view(d, images, spec, None, shape) for spec in specs) + (index,)

    pipe = graph(
        batch_size=batch_size,
        num_threads=num_threads or _default_threads(),
        device_id=_device_id(device),
        seed=(seed + shard_id) % (2**31 - 1),
        prefetch_queue_depth=prefetch,
    )
    pipe.build()
    from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

    output_map = [f"view{i}" for i in range(len(kinds))] + ["index"]
    iterator = DALIGenericIterator(
        pipe, output_map, reader_name="Reader", last_batch_policy=LastBatchPolicy.PARTIAL, auto_reset=True
    )
    n = len(files)
    shard_size = n * (shard_id + 1) // num_shards - n * shard_id // num_shards
    return DaliJpegLoader(pipe, iterator, len(kinds), shard_size, batch_size, device)
