"""SCAN's augmented views: one parameter sampler, executed in two phases by torch (here) or DALI (dali.py).

A view of sample i is decided entirely by the uniforms `sampling.draws(key, i, view)` ([NUM_DRAWS] per sample)
and the size of the stored image: `ViewTransform.params(u, hw)` turns them into explicit per-sample parameters
(crop box, flip, jitter factors, RandAugment ops and magnitudes, cutout centre). Executors apply given parameters
and never draw anything, so the torch and DALI backends, any number of ranks and any number of DataLoader workers
produce the same view of a sample.

Execution has two phases, so the expensive, size-dependent part runs in loader workers and the rest wherever is
fastest (the workers on CPU, the GPU after the host-to-device copy):

1. `base` (loader workers): the stored image (any size) -> uint8 [C, S, S] at the output size S. simclr/weak: the
   random resized crop (+ flip, + weak translation) as one bilinear resampling; eval: the centre crop; strong: a
   random S x S crop (the identity when the stored image is S x S). Batched for same-size arrays (`base`), per
   sample for decoded files of any size (`base_one`); both give the same bytes for the same input.
2. `finish` (workers or device): float [0, 1] -> colour jitter, grayscale, blur (simclr); flip, RandAugment ops,
   cutout (strong); normalisation. Batch-composition invariant (see augment.py).

Kinds: ``eval`` (no randomness), ``simclr`` (crop from `crop_scale_min` of the area, flip, colour jitter with
prob `jitter_prob`, grayscale, blur), ``weak`` (crop from max(crop_scale_min, 0.6), flip, optional translation),
``strong`` (SCAN's self-labelling view: flip, `strong_ops` RandAugment ops drawn uniformly with replacement,
normalise, cutout of `cutout_frac` of the side).

Crops follow torchvision's RandomResizedCrop: area uniform in [scale_min, 1] of the stored image, log-uniform
aspect ratio, 10 attempts, then the centred crop of the whole image with the ratio clamped into `crop_ratio`; boxes
are continuous (sub-pixel) and sampled bilinearly without antialiasing (a crop is at most 1/0.875 larger than the
output for the paper's 256 -> 224 chain, so there is nothing to alias).
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from . import augment as A
from .augment import AugmentConfig, check_kind, check_out_size, normalization_stats
from .sampling import NUM_DRAWS

__all__ = ["ViewTransform", "make_transform", "DRAW_LAYOUT", "CROP_ATTEMPTS"]

CROP_ATTEMPTS = 10
# Which of a sample's NUM_DRAWS uniforms decides what. Fixed for every kind, so a parameter never depends on
# which other parameters a kind uses (and the DALI executor reads the same numbers).
DRAW_LAYOUT = {
    "area": 0,  # CROP_ATTEMPTS draws
    "ratio": 10,  # CROP_ATTEMPTS draws
    "position": 20,  # x, y
    "flip": 22,
    "jitter": 23,
    "brightness": 24,
    "contrast": 25,
    "saturation": 26,
    "hue": 27,
    "grayscale": 28,
    "blur": 29,
    "sigma": 30,
    "translate": 31,  # x, y
    "strong": 33,  # 3 per op slot (op id, magnitude, sign), A.MAX_STRONG_OPS slots
    "cutout": 57,  # row, column
    "offset": 59,  # row, column of the strong view's crop inside a larger stored image
}
assert DRAW_LAYOUT["strong"] + 3 * A.MAX_STRONG_OPS <= DRAW_LAYOUT["cutout"] and DRAW_LAYOUT["offset"] + 2 <= NUM_DRAWS


def _fit_size(h: np.ndarray, w: np.ndarray, out: int) -> tuple[np.ndarray, np.ndarray]:
    """(h, w) after enlarging images whose shorter side is below `out` so it equals `out` (others unchanged)."""
    short = np.minimum(h, w)
    small = short < out
    scale = np.where(small, out / np.maximum(short, 1), 1.0)
    new_h = np.where(small, np.maximum(out, np.round(h * scale)), h).astype(np.int64)
    new_w = np.where(small, np.maximum(out, np.round(w * scale)), w).astype(np.int64)
    return new_h, new_w


def crop_boxes(u: np.ndarray, h: np.ndarray, w: np.ndarray, scale_min: float, ratio: tuple[float, float]):
    """RandomResizedCrop boxes (centre x, centre y, width, height) in float64 pixels of (h, w) images."""
    h, w = h.astype(np.float64), w.astype(np.float64)
    area = (h * w)[:, None]
    a0, r0 = DRAW_LAYOUT["area"], DRAW_LAYOUT["ratio"]
    target = area * (scale_min + (1.0 - scale_min) * u[:, a0:a0 + CROP_ATTEMPTS])
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    aspect = np.exp(log_lo + (log_hi - log_lo) * u[:, r0:r0 + CROP_ATTEMPTS])
    cw_all, ch_all = np.sqrt(target * aspect), np.sqrt(target / aspect)
    ok = (cw_all <= w[:, None]) & (ch_all <= h[:, None])
    first = ok.argmax(axis=1)  # the first accepted attempt
    found = ok.any(axis=1)
    rows = np.arange(len(u))
    in_ratio = w / h
    fallback_w = np.where(in_ratio > ratio[1], h * ratio[1], w)
    fallback_h = np.where(in_ratio < ratio[0], w / ratio[0], h)
    cw = np.where(found, cw_all[rows, first], fallback_w)
    ch = np.where(found, ch_all[rows, first], fallback_h)
    p0 = DRAW_LAYOUT["position"]
    pos = np.where(found[:, None], u[:, p0:p0 + 2], 0.5)  # fallback crops are centred
    return pos[:, 0] * (w - cw) + cw / 2, pos[:, 1] * (h - ch) + ch / 2, cw, ch


class ViewTransform:
    """Parameters and executors of one view kind; picklable (it travels to DataLoader workers)."""

    def __init__(self, kind: str, cfg: AugmentConfig, mean: Sequence[float], std: Sequence[float],
                 out_size: int | None = None):
        check_kind(kind)
        self.kind, self.cfg = kind, cfg
        self.mean, self.std = normalization_stats(mean, std)
        self.out_size = check_out_size(out_size)
        self._stats: dict = {}  # per (device, channels): normalisation tensors

    def __repr__(self) -> str:
        return f"ViewTransform(kind={self.kind!r}, out_size={self.out_size}, cfg={self.cfg})"

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_stats": {}}

    @property
    def random(self) -> bool:
        return self.kind != "eval"

    # ---- phase 0: parameters ---------------------------------------------------------------------------------

    def params(self, u: np.ndarray | None, hw) -> dict[str, Tensor]:
        """Per-sample parameters (CPU tensors) from uniforms u [B, NUM_DRAWS] and stored sizes hw [B, 2]."""
        hw = np.asarray(hw, dtype=np.int64).reshape(-1, 2)
        out = self.out_size
        if out is None:
            if not (hw == hw[0]).all() or hw[0, 0] != hw[0, 1]:
                raise ValueError("out_size=None needs square images of one size")
            out = int(hw[0, 0])
        b = len(hw)
        if self.random and (u is None or u.shape != (b, NUM_DRAWS)):
            raise ValueError(f"{self.kind} views need uniforms of shape [{b}, {NUM_DRAWS}]")
        h, w = _fit_size(hw[:, 0], hw[:, 1], out)
        p: dict[str, Tensor] = {"out": torch.tensor(out)}
        if self.kind in ("eval", "strong"):
            if self.kind == "eval":
                offset = np.stack([(h - out) // 2, (w - out) // 2], axis=1)
            else:
                o = DRAW_LAYOUT["offset"]
                offset = np.floor(u[:, o:o + 2] * np.stack([h - out + 1, w - out + 1], axis=1)).astype(np.int64)
            p["fit"] = torch.from_numpy(np.stack([h, w], axis=1))
            p["offset"] = torch.from_numpy(offset)
        if self.kind == "eval":
            return p
        cfg = self.cfg
        flip = (u[:, DRAW_LAYOUT["flip"]] < 0.5) & cfg.flip
        if self.kind in ("simclr", "weak"):
            scale_min = cfg.crop_scale_min if self.kind == "simclr" else max(cfg.crop_scale_min, A.WEAK_MIN_SCALE)
            cx, cy, cw, ch = crop_boxes(u, hw[:, 0], hw[:, 1], scale_min, cfg.crop_ratio)
            sx, sy = cw / hw[:, 1], ch / hw[:, 0]
            tx, ty = 2 * cx / hw[:, 1] - 1, 2 * cy / hw[:, 0] - 1
            if self.kind == "weak" and cfg.translate_frac > 0:
                t0 = DRAW_LAYOUT["translate"]
                shift = cfg.translate_frac * (2 * u[:, t0:t0 + 2] - 1)
                tx, ty = tx + 2 * shift[:, 0], ty + 2 * shift[:, 1]
            sx = np.where(flip, -sx, sx)
            zero = np.zeros_like(sx)
            p["lin"] = torch.from_numpy(np.stack([np.stack([sx, zero], -1), np.stack([zero, sy], -1)], -2)).float()
            p["shift"] = torch.from_numpy(np.stack([tx, ty], -1)).float()
        if self.kind == "simclr":
            def factor(name: str, spread: float) -> Tensor:
                lo, hi = max(0.0, 1 - spread), 1 + spread
                return torch.from_numpy(lo + (hi - lo) * u[:, DRAW_LAYOUT[name]]).float()

            p["jitter"] = torch.from_numpy(u[:, DRAW_LAYOUT["jitter"]] < cfg.jitter_prob)
            p["brightness"] = factor("brightness", cfg.brightness)
            p["contrast"] = factor("contrast", cfg.contrast)
            p["saturation"] = factor("saturation", cfg.saturation)
            p["hue"] = torch.from_numpy(cfg.hue * (2 * u[:, DRAW_LAYOUT["hue"]] - 1)).float()
            p["gray"] = torch.from_numpy(u[:, DRAW_LAYOUT["grayscale"]] < cfg.grayscale_prob)
            p["blur"] = torch.from_numpy(u[:, DRAW_LAYOUT["blur"]] < cfg.blur_prob)
            p["sigma"] = torch.from_numpy(0.1 + 1.9 * u[:, DRAW_LAYOUT["sigma"]]).float()
        if self.kind == "strong":
            k, s0 = cfg.strong_ops, DRAW_LAYOUT["strong"]
            slots = u[:, s0:s0 + 3 * k].reshape(b, k, 3) if k else np.zeros((b, 0, 3))
            table = A._STRONG_TABLE
            ops = np.minimum(np.floor(slots[:, :, 0] * len(table)), len(table) - 1).astype(np.int64)
            lo = np.array([entry[2] for entry in table])[ops]
            hi = np.array([entry[3] for entry in table])[ops]
            signed = np.array([entry[4] for entry in table])[ops]
            mags = lo + (hi - lo) * slots[:, :, 1]
            mags = np.where(signed & (slots[:, :, 2] < 0.5), -mags, mags)
            c0 = DRAW_LAYOUT["cutout"]
            p["flip"] = torch.from_numpy(flip)
            p["ops"] = torch.from_numpy(ops)
            p["mags"] = torch.from_numpy(mags).float()
            p["cutout"] = torch.from_numpy(np.floor(u[:, c0:c0 + 2] * out).astype(np.int64))
        return p

    # ---- phase 1: stored image -> uint8 output square -----------------------------------------------------------

    def base(self, x: Tensor, p: dict[str, Tensor]) -> Tensor:
        """uint8 [B, C, H, W] (one size) -> uint8 [B, C, S, S]."""
        if x.dtype != torch.uint8 or x.dim() != 4:
            raise ValueError(f"expected uint8 images [B, C, H, W], got {x.dtype} {tuple(x.shape)}")
        out = int(p["out"])
        if self.kind in ("simclr", "weak"):
            pad = "zeros" if self.fills_outside else "border"
            y = A.affine(x.float(), p["lin"].to(x.device), p["shift"].to(x.device), padding_mode=pad,
                         size=(out, out))
            return y.round_().clamp_(0, 255).to(torch.uint8)
        if tuple(x.shape[-2:]) == (out, out):
            return x
        return torch.stack([self._crop(x[i], p, i) for i in range(len(x))])

    def base_one(self, img: Tensor, p: dict[str, Tensor], row: int) -> Tensor:
        """One stored image uint8 [C, h, w] (any size) -> uint8 [C, S, S], with the parameters of row `row`."""
        if self.kind in ("simclr", "weak"):
            sub = {key: (value[row:row + 1] if value.dim() else value) for key, value in p.items()}
            return self.base(img.unsqueeze(0), sub)[0]
        return self._crop(img, p, row)

    def _crop(self, img: Tensor, p: dict[str, Tensor], row: int) -> Tensor:
        out = int(p["out"])
        fit_h, fit_w = (int(v) for v in p["fit"][row])
        if (fit_h, fit_w) != tuple(img.shape[-2:]):  # smaller than the output: enlarge first
            img = F.interpolate(img.unsqueeze(0).float(), size=(fit_h, fit_w), mode="bilinear",
                                align_corners=False, antialias=True)[0].round_().clamp_(0, 255).to(torch.uint8)
        top, left = (int(v) for v in p["offset"][row])
        return img[:, top:top + out, left:left + out]

    def source_map(self, p: dict[str, Tensor], hw) -> np.ndarray:
        """float32 [B, 2, 3]: the `base` phase of each sample as one affine map from output to stored pixel
        coordinates (pixel edges at integers, centres at +0.5), for executors that warp (DALI's warp_affine).
        simclr/weak: the crop box (+ flip, + translation); eval/strong: the enlargement of small images and the
        integer crop -- a pure translation, so sampling hits pixel centres and copies them exactly."""
        hw = np.asarray(hw, dtype=np.float64).reshape(-1, 2)
        h, w = hw[:, 0], hw[:, 1]
        out = float(p["out"])
        m = np.zeros((len(hw), 2, 3))
        if self.kind in ("simclr", "weak"):
            # grid_sample (align_corners=False): src = size/2 * (L (2 dst/out - 1) + t + 1), per axis.
            lin, shift = p["lin"].double().numpy(), p["shift"].double().numpy()
            half = np.stack([w, h], axis=1)[:, :, None] / 2
            m[:, :, :2] = half * lin * (2 / out)
            m[:, :, 2] = half[:, :, 0] * (shift + 1 - lin.sum(axis=2))
        else:
            fit, offset = p["fit"].double().numpy(), p["offset"].double().numpy()
            sy, sx = h / fit[:, 0], w / fit[:, 1]
            m[:, 0, 0], m[:, 0, 2] = sx, offset[:, 1] * sx
            m[:, 1, 1], m[:, 1, 2] = sy, offset[:, 0] * sy
        return m.astype(np.float32)

    @property
    def fills_outside(self) -> bool:
        """Whether `base` fills outside the stored image with 0 (weak translation) rather than repeating the border."""
        return self.kind == "weak" and self.cfg.translate_frac > 0

    # ---- phase 2: float ops and normalisation -------------------------------------------------------------------

    def finish(self, base: Tensor, p: dict[str, Tensor]) -> Tensor:
        """uint8 [B, C, S, S] on any device -> normalised float32, same device."""
        x = base.float() / 255
        c = x.shape[1]
        if len(self.mean) != c:
            raise ValueError(f"mean/std have {len(self.mean)} values but the images have {c} channels")
        dev = x.device
        if self.kind == "simclr":
            x = self._colour(x, {k: v.to(dev, non_blocking=True) for k, v in p.items()})
        elif self.kind == "strong":
            x = self._strong(x, {k: v.to(dev, non_blocking=True) for k, v in p.items()})
            return A.cutout(self._normalize(x), int(round(self.cfg.cutout_frac * x.shape[-1])), p["cutout"])
        return self._normalize(x)

    def __call__(self, x: Tensor, u: np.ndarray | None = None) -> Tensor:
        """Both phases on a same-size uint8 batch: the convenience path (tests, feature caches, benchmarks)."""
        hw = np.tile(np.array(x.shape[-2:], dtype=np.int64), (len(x), 1))
        p = self.params(u, hw)
        return self.finish(self.base(x, p), p)

    def _normalize(self, x: Tensor) -> Tensor:
        c = x.shape[1]
        key = (str(x.device), c)
        if key not in self._stats:
            mean = torch.tensor(self.mean, dtype=torch.float32, device=x.device).view(1, c, 1, 1)
            std = torch.tensor(self.std, dtype=torch.float32, device=x.device).view(1, c, 1, 1)
            self._stats[key] = (mean, std)
        mean, std = self._stats[key]
        return (x - mean) / std

    def _colour(self, x: Tensor, p: dict[str, Tensor]) -> Tensor:
        cfg, c = self.cfg, x.shape[1]
        if cfg.jitter_prob > 0:
            y = x
            if cfg.brightness > 0:
                y = A.adjust_brightness(y, p["brightness"])
            if cfg.contrast > 0:
                y = A.adjust_contrast(y, p["contrast"])
            if c == 3 and cfg.saturation > 0:
                y = A.adjust_color(y, p["saturation"])
            if c == 3 and cfg.hue > 0:
                y = A.hue_rotate(y, p["hue"])
            x = torch.where(p["jitter"].view(-1, 1, 1, 1), y, x)
        if c == 3 and cfg.grayscale_prob > 0:
            x = torch.where(p["gray"].view(-1, 1, 1, 1), A._grayscale(x).expand_as(x), x)
        if cfg.blur_prob > 0:
            chosen = p["blur"].nonzero().squeeze(1)
            if chosen.numel() > 0:
                x = x.index_copy(0, chosen, A.gaussian_blur(x[chosen], p["sigma"][chosen]))
        return x

    def _strong(self, x: Tensor, p: dict[str, Tensor]) -> Tensor:
        if self.cfg.flip:
            x = torch.where(p["flip"].view(-1, 1, 1, 1), x.flip(-1), x)
        for slot in range(p["ops"].shape[1]):
            x = strong_slot(x, p["ops"][:, slot], p["mags"][:, slot])
        return x


def strong_slot(x: Tensor, op_ids: Tensor, mags: Tensor) -> Tensor:
    """Apply op op_ids[j] with magnitude mags[j] to sample j (one RandAugment slot)."""
    # Grouping samples by op id turns 14 masked passes into contiguous slices (one host sync: the counts).
    sorted_ids, order = torch.sort(op_ids, stable=True)
    counts = torch.bincount(sorted_ids, minlength=len(A._STRONG_TABLE)).tolist()
    parts, part_mags = torch.split(x[order], counts), torch.split(mags[order].to(x.dtype), counts)
    n_colour = len(A._COLOUR_OPS)
    outs, geometric = [], []
    for op_id, (entry, part, mag) in enumerate(zip(A._STRONG_TABLE, parts, part_mags)):
        if part.shape[0] == 0:
            continue
        fn = entry[1]
        if op_id < n_colour:
            outs.append(fn(part, mag))
        else:
            geometric.append((part, *fn(mag, *x.shape[-2:])))
    if geometric:
        chunks, lins, shifts = zip(*geometric)
        outs.append(A.affine(torch.cat(chunks), torch.cat(lins), torch.cat(shifts)))
    y = torch.cat(outs)
    result = torch.empty_like(y)
    result[order] = y
    return result


def make_transform(kind: str, cfg: AugmentConfig, mean: Sequence[float], std: Sequence[float],
                   out_size: int | None = None) -> ViewTransform:
    """The view kind ``simclr | weak | strong | eval`` at output side ``out_size`` (None: the input's size)."""
    return ViewTransform(kind, cfg, mean, std, out_size)
