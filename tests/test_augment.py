"""Tests for scan_dist.data.augment (the image ops) and scan_dist.data.transforms (the parameter sampler and the
torch executor): shapes, limits that must equal simpler transforms, each op against PIL, and that a view depends
on its sample's draws only (not on the batch it shares or the process that computes it)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image, ImageEnhance, ImageOps

from scan_dist.data import augment as A
from scan_dist.data import sampling
from scan_dist.data import transforms as T
from scan_dist.data.augment import AugmentConfig, normalize

AUG_KINDS = ("simclr", "weak", "strong")
MEAN3, STD3 = (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)


def stats(c):
    return (MEAN3[:c], STD3[:c]) if c == 3 else ((0.5,), (0.25,))


def images(b, c, s, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (b, c, s, s), dtype=torch.uint8, generator=g)


def manual_normalize(x, mean, std):
    m = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
    return (x.float() / 255 - m) / s


def draws(n, seed=0, view=0, first=0):
    return sampling.draws(sampling.stream_key(seed, "test"), np.arange(first, first + n), view)


def make_transform(kind, cfg, mean, std, out_size=None, seed=0):
    """The view `kind` applied with the draws of samples 0..B-1 of a test stream (seed `seed`)."""
    view = T.make_transform(kind, cfg, mean, std, out_size)

    def apply(x):
        return view(x, draws(len(x), seed))

    apply.view = view
    return apply


def identity_cfg(**kw):
    base = dict(crop_scale_min=1.0, flip=False, jitter_prob=0.0, grayscale_prob=0.0, blur_prob=0.0)
    base.update(kw)
    return AugmentConfig(**base)


# --------------------------------------------------------------------------- shapes / API


@pytest.mark.parametrize("kind", A.KINDS)
@pytest.mark.parametrize("c", [1, 3])
@pytest.mark.parametrize("s, out", [(28, None), (33, None), (33, 24), (28, 32)])
def test_shapes_dtype_device(kind, c, s, out):
    mean, std = stats(c)
    cfg = AugmentConfig(blur_prob=0.5)
    y = make_transform(kind, cfg, mean, std, out_size=out)(images(6, c, s))
    side = s if out is None else out
    assert y.shape == (6, c, side, side)
    assert y.dtype == torch.float32
    assert y.device.type == "cpu"
    assert torch.isfinite(y).all()


def test_unknown_kind_and_bad_arguments():
    with pytest.raises(ValueError, match="kind"):
        make_transform("medium", AugmentConfig(), (0.5,), (0.25,))
    with pytest.raises(ValueError, match="channels"):
        make_transform("eval", AugmentConfig(), MEAN3, STD3)(images(2, 1, 8))
    with pytest.raises(ValueError):
        normalize(images(2, 3, 8), (0.5,), (0.25,))
    with pytest.raises(ValueError):
        make_transform("eval", AugmentConfig(), (0.5,), (0.25,), out_size=0)
    with pytest.raises(ValueError, match="crop_scale_min"):
        AugmentConfig(crop_scale_min=0.0)
    with pytest.raises(ValueError, match="jitter_prob"):
        AugmentConfig(jitter_prob=1.5)


@pytest.mark.parametrize("c", [1, 3])
def test_eval_is_exact_normalisation(c):
    mean, std = stats(c)
    x = images(4, c, 33)
    expected = manual_normalize(x, mean, std)
    assert torch.equal(normalize(x, mean, std), expected)
    assert torch.equal(make_transform("eval", AugmentConfig(), mean, std)(x), expected)


def test_eval_of_a_larger_image_is_the_centre_crop():
    x = images(3, 3, 33)
    y = make_transform("eval", AugmentConfig(), MEAN3, STD3, out_size=16)(x)
    assert torch.equal(y, manual_normalize(x[:, :, 8:24, 8:24], MEAN3, STD3))


def test_eval_of_a_smaller_image_enlarges_then_crops():
    x = images(2, 1, 12)
    y = make_transform("eval", AugmentConfig(), (0.5,), (0.25,), out_size=24)(x)
    ref = torch.nn.functional.interpolate(x.float(), size=(24, 24), mode="bilinear", antialias=True)
    assert torch.equal(y, manual_normalize(ref.round().clamp(0, 255), (0.5,), (0.25,)))


def test_transform_is_picklable():
    import pickle

    t = T.make_transform("strong", AugmentConfig(), (0.5,), (0.25,))
    t(images(2, 1, 8), draws(2))
    t2 = pickle.loads(pickle.dumps(t))
    x = images(4, 1, 12)
    assert torch.equal(t(x, draws(4, seed=3)), t2(x, draws(4, seed=3)))


# --------------------------------------------------------------------------- randomness


@pytest.mark.parametrize("kind", AUG_KINDS)
@pytest.mark.parametrize("c", [1, 3])
def test_views_are_functions_of_the_draws(kind, c):
    mean, std = stats(c)
    cfg = AugmentConfig(blur_prob=0.5, translate_frac=0.1)
    x = images(16, c, 28)
    a = make_transform(kind, cfg, mean, std, seed=123)(x)
    b = make_transform(kind, cfg, mean, std, seed=123)(x)
    d = make_transform(kind, cfg, mean, std, seed=124)(x)
    assert torch.equal(a, b)
    assert not torch.equal(a, d)


def test_eval_needs_no_draws_and_augmented_views_do():
    x = images(2, 1, 8)
    assert torch.equal(T.make_transform("eval", AugmentConfig(), (0.5,), (0.25,))(x), normalize(x, (0.5,), (0.25,)))
    with pytest.raises(ValueError, match="uniforms"):
        T.make_transform("simclr", AugmentConfig(), (0.5,), (0.25,))(x)


@pytest.mark.parametrize("kind", AUG_KINDS)
def test_per_sample_randomness(kind):
    x = images(1, 3, 28).expand(8, -1, -1, -1).contiguous()
    y = make_transform(kind, AugmentConfig(), MEAN3, STD3)(x)
    flat = y.flatten(1)
    distinct = {tuple(row.tolist()) for row in flat}
    assert len(distinct) >= 6  # 8 copies must not share one parameter draw


# --------------------------------------------------------------------------- simclr / weak


@pytest.mark.parametrize("kind", ["simclr", "weak"])
@pytest.mark.parametrize("c", [1, 3])
def test_identity_limit_equals_eval(kind, c):
    mean, std = stats(c)
    x = images(8, c, 33)
    torch.manual_seed(0)
    y = make_transform(kind, identity_cfg(), mean, std)(x)
    assert torch.allclose(y, manual_normalize(x, mean, std), atol=1e-5)


def test_identity_limit_with_out_size_is_a_resize():
    x = images(4, 1, 32)
    y = make_transform("simclr", identity_cfg(), (0.5,), (0.25,), out_size=16)(x)
    # Exact 2x downscale with align_corners=False samples midway: a 2x2 mean (rounded to uint8 by the base phase).
    ref = torch.nn.functional.avg_pool2d(x.float(), 2)
    assert torch.allclose(y, manual_normalize(ref, (0.5,), (0.25,)), atol=0.51 / 255 / 0.25 + 1e-5)


def test_flip_when_crop_is_identity():
    s = 9
    ramp = torch.arange(s * s, dtype=torch.uint8).view(1, 1, s, s) * 3
    x = ramp.expand(64, 3, s, s).contiguous()
    x[:, 1] = 255 - x[:, 1]
    torch.manual_seed(0)
    y = make_transform("simclr", identity_cfg(flip=True), MEAN3, STD3)(x)
    plain = manual_normalize(x[:1], MEAN3, STD3)
    flipped = plain.flip(-1)
    is_plain = (y - plain).abs().amax(dim=(1, 2, 3)) < 1e-5
    is_flipped = (y - flipped).abs().amax(dim=(1, 2, 3)) < 1e-5
    assert bool((is_plain ^ is_flipped).all())
    assert 10 < int(is_flipped.sum()) < 54


def test_crop_zooms_in_and_stays_inside():
    # A constant image stays constant under any inside crop; a ramp must not.
    x = torch.full((32, 1, 16, 16), 200, dtype=torch.uint8)
    cfg = AugmentConfig(crop_scale_min=0.05, jitter_prob=0.0)
    torch.manual_seed(0)
    y = make_transform("simclr", cfg, (0.0,), (1.0,))(x)
    assert torch.allclose(y, torch.full_like(y, 200 / 255), atol=1e-6)
    ramp = torch.arange(16, dtype=torch.uint8).mul(16).view(1, 1, 1, 16).expand(32, 1, 16, 16).contiguous()
    y = make_transform("simclr", cfg, (0.0,), (1.0,))(ramp)
    spans = y.amax(dim=(1, 2, 3)) - y.amin(dim=(1, 2, 3))
    assert (spans < 240 / 255 - 1e-3).sum() > 16  # most crops see only part of the ramp


@pytest.mark.parametrize("h, w", [(20, 20), (20, 31), (40, 12)])
def test_crop_boxes_respect_scale_and_ratio(h, w):
    n = 2000
    cx, cy, cw, ch = T.crop_boxes(draws(n), np.full(n, h), np.full(n, w), 0.3, (0.75, 4 / 3))
    area = cw * ch / (h * w)
    found = area >= 0.3 - 1e-9  # accepted attempts; the rest fall back to the centred, ratio-clamped crop
    assert found.mean() > 0.9 and area.max() <= 1 + 1e-9
    ratio = cw / ch
    assert ratio.min() >= 0.75 - 1e-9 and ratio.max() <= 4 / 3 + 1e-9
    # Boxes stay inside the image.
    assert (cx - cw / 2 >= -1e-9).all() and (cx + cw / 2 <= w + 1e-9).all()
    assert (cy - ch / 2 >= -1e-9).all() and (cy + ch / 2 <= h + 1e-9).all()


def test_jitter_on_gray_rgb_keeps_gray():
    # Saturation and hue act on chroma only: a gray RGB image must stay gray.
    g = images(8, 1, 12)
    x = g.expand(-1, 3, -1, -1).contiguous()
    cfg = identity_cfg(jitter_prob=1.0, brightness=0.0, contrast=0.0, saturation=0.9, hue=0.5)
    torch.manual_seed(0)
    y = make_transform("simclr", cfg, (0.0,) * 3, (1.0,) * 3)(x)
    assert torch.allclose(y, x.float() / 255, atol=1e-5)


def test_hue_rotation_changes_colour_but_keeps_luma():
    x = torch.rand(4, 3, 6, 6) * 0.5 + 0.25
    y = A.hue_rotate(x, torch.full((4,), 0.25))
    assert (y - x).abs().max() > 0.05
    assert torch.allclose(A._grayscale(y), A._grayscale(x), atol=1e-4)
    assert torch.allclose(A.hue_rotate(x, torch.zeros(4)), x, atol=1e-5)


def test_grayscale_prob_one_gives_equal_channels():
    cfg = identity_cfg(grayscale_prob=1.0)
    y = make_transform("simclr", cfg, (0.0,) * 3, (1.0,) * 3)(images(4, 3, 10))
    assert torch.equal(y[:, 0], y[:, 1]) and torch.equal(y[:, 1], y[:, 2])


def test_blur_smooths():
    x = images(4, 1, 30)
    cfg = identity_cfg(blur_prob=1.0)
    torch.manual_seed(0)
    y = make_transform("simclr", cfg, (0.0,), (1.0,))(x)
    ref = x.float() / 255
    assert y.diff(dim=-1).abs().mean() < 0.8 * ref.diff(dim=-1).abs().mean()
    assert torch.allclose(y.mean(), ref.mean(), atol=0.02)


def test_weak_translation_moves_content():
    x = torch.full((64, 1, 16, 16), 255, dtype=torch.uint8)
    cfg = identity_cfg(translate_frac=0.25)
    torch.manual_seed(0)
    y = make_transform("weak", cfg, (0.0,), (1.0,))(x)
    # Zero fill enters from the borders for shifted samples, never beyond 25%.
    dark = (y < 0.5).float().mean(dim=(1, 2, 3))
    assert dark.max() > 0.05 and dark.max() <= 1 - 0.75 * 0.75 + 0.07


# --------------------------------------------------------------------------- strong


@pytest.mark.parametrize("c", [1, 3])
def test_strong_identity_limit_equals_eval(c):
    mean, std = stats(c)
    x = images(4, c, 28)
    cfg = AugmentConfig(flip=False, strong_ops=0, cutout_frac=0.0)
    assert torch.equal(make_transform("strong", cfg, mean, std)(x), manual_normalize(x, mean, std))


@pytest.mark.parametrize("c", [1, 3])
def test_strong_values_finite_and_in_range(c):
    mean, std = stats(c)
    torch.manual_seed(0)
    y = make_transform("strong", AugmentConfig(strong_ops=6), mean, std)(images(64, c, 24))
    lo = ((0 - torch.tensor(mean)) / torch.tensor(std)).view(1, c, 1, 1)
    hi = ((1 - torch.tensor(mean)) / torch.tensor(std)).view(1, c, 1, 1)
    assert torch.isfinite(y).all()
    assert (y >= lo - 1e-5).all() and (y <= hi + 1e-5).all()


def test_strong_cutout_zeroes_expected_square():
    s, side = 33, round(0.5 * 33)
    x = torch.full((200, 1, s, s), 255, dtype=torch.uint8)
    cfg = AugmentConfig(flip=False, strong_ops=0, cutout_frac=0.5)
    torch.manual_seed(0)
    y = make_transform("strong", cfg, (0.5,), (0.25,))(x)
    zero = y[:, 0] == 0
    assert torch.all(y[~zero.unsqueeze(1)] == 2.0)
    rows, cols = zero.any(dim=2), zero.any(dim=1)
    h, w = rows.sum(1), cols.sum(1)
    # The zeroed set is a rectangle: the clipped square.
    assert torch.equal(zero.sum(dim=(1, 2)), h * w)
    assert (h <= side).all() and (w <= side).all()
    assert (h >= (side + 1) // 2).all() and (w >= (side + 1) // 2).all()
    assert (h * w == side * side).float().mean() > 0.2
    assert (h * w < side * side).any()


def test_cutout_zero_side_is_noop():
    x = torch.rand(3, 1, 8, 8)
    assert torch.equal(A.cutout(x, 0, torch.zeros(3, 2)), x)


def test_strong_op_table():
    assert set(A.STRONG_OPS) == {
        "identity", "autocontrast", "equalize", "rotate", "solarize", "color", "contrast",
        "brightness", "sharpness", "shear_x", "shear_y", "translate_x", "translate_y", "posterize",
    }  # fmt: skip
    ranges = {name: (lo, hi, signed) for name, _f, lo, hi, signed in A._STRONG_TABLE}
    assert ranges["rotate"] == (0.0, 30.0, True)
    assert ranges["solarize"] == (0.0, 256.0, False)
    assert ranges["shear_x"] == (0.0, 0.1, True)


PUBLIC_OPS = {
    "identity": lambda x, m: x,
    "autocontrast": lambda x, m: A.autocontrast(x),
    "equalize": lambda x, m: A.equalize(x),
    "rotate": A.rotate,
    "solarize": A.solarize,
    "color": A.adjust_color,
    "contrast": A.adjust_contrast,
    "brightness": A.adjust_brightness,
    "sharpness": A.adjust_sharpness,
    "shear_x": A.shear_x,
    "shear_y": A.shear_y,
    "translate_x": A.translate_x,
    "translate_y": A.translate_y,
    "posterize": lambda x, m: A.posterize(x, torch.floor(m).clamp(4, 8)),
}


def test_strong_slot_applies_drawn_op_per_sample():
    # Force the op ids (each op twice, one with a negated sign): every sample
    # must get exactly its own op at its own magnitude.
    n_ops = len(A.STRONG_OPS)
    x = torch.rand(2 * n_ops, 3, 10, 10)
    ids = torch.arange(n_ops).repeat(2)
    u = torch.rand(2 * n_ops)
    neg = torch.arange(2 * n_ops) >= n_ops
    lo = torch.tensor([entry[2] for entry in A._STRONG_TABLE])[ids]
    hi = torch.tensor([entry[3] for entry in A._STRONG_TABLE])[ids]
    signed = torch.tensor([entry[4] for entry in A._STRONG_TABLE])[ids]
    mags = torch.where(signed & neg, -(lo + (hi - lo) * u), lo + (hi - lo) * u)
    y = T.strong_slot(x, ids, mags)
    for i in range(2 * n_ops):
        name, _fn, lo, hi, signed = A._STRONG_TABLE[int(ids[i])]
        mag = lo + (hi - lo) * u[i : i + 1]
        if signed and neg[i]:
            mag = -mag
        expected = PUBLIC_OPS[name](x[i : i + 1], mag)
        assert torch.allclose(y[i : i + 1], expected, atol=1e-6), name


def test_strong_uses_every_op_and_signs():
    view = T.make_transform("strong", AugmentConfig(strong_ops=4), MEAN3, STD3)
    p = view.params(draws(512), np.tile([16, 16], (512, 1)))
    counts = torch.bincount(p["ops"].flatten(), minlength=len(A.STRONG_OPS))
    assert p["ops"].shape == (512, 4) and (counts > 0).all()
    rotate = p["ops"] == A.STRONG_OPS.index("rotate")
    assert (p["mags"][rotate] < 0).any() and (p["mags"][rotate] > 0).any()
    assert (p["mags"][rotate].abs() <= 30).all()


# --------------------------------------------------------------------------- individual ops


def unit(x_uint8):
    return x_uint8.float() / 255


def to_pil(x_uint8):
    a = x_uint8.permute(1, 2, 0).numpy()
    return Image.fromarray(a[..., 0] if a.shape[2] == 1 else a)


def from_pil(img):
    a = torch.from_numpy(np.asarray(img).copy())
    return (a.unsqueeze(0) if a.dim() == 2 else a.permute(2, 0, 1)).float() / 255


def test_solarize():
    x = images(2, 3, 9)
    assert torch.allclose(A.solarize(unit(x), 0.0), 1 - unit(x))
    assert torch.equal(A.solarize(unit(x), 256.0), unit(x))
    for t in (1, 100, 128, 255):
        ref = from_pil(ImageOps.solarize(to_pil(x[0]), t))
        assert torch.allclose(A.solarize(unit(x[:1]), float(t))[0], ref, atol=1e-6)


def test_posterize():
    x = images(2, 3, 9)
    y = A.posterize(unit(x), 4)
    assert torch.allclose(y, unit(x & 0xF0), atol=1e-6)
    assert torch.allclose(A.posterize(unit(x), 8), unit(x), atol=1e-6)
    per_sample = A.posterize(unit(x), torch.tensor([4.0, 6.0]))
    assert torch.allclose(per_sample[1], unit(x[1] & 0xFC), atol=1e-6)


def test_autocontrast():
    x = (images(3, 3, 9) // 4 + 60).float() / 255
    x[2, 1] = 0.3  # a constant channel must be left alone
    y = A.autocontrast(x)
    assert torch.allclose(y[:2].amin(dim=(2, 3)), torch.zeros(2, 3), atol=1e-6)
    assert torch.allclose(y[:2].amax(dim=(2, 3)), torch.ones(2, 3), atol=1e-6)
    assert torch.equal(y[2, 1], x[2, 1])
    xu = (x[0] * 255).round().to(torch.uint8)
    assert torch.allclose(y[0], from_pil(ImageOps.autocontrast(to_pil(xu))), atol=1.01 / 255)


@pytest.mark.parametrize("c", [1, 3])
def test_equalize_matches_pil(c):
    g = torch.Generator().manual_seed(1)
    # Skewed, low-range values so equalisation visibly changes the image; PIL
    # only equalises with more than 255 pixels, hence 40x40.
    x = (torch.rand(4, c, 40, 40, generator=g) ** 3 * 120).to(torch.uint8)
    x[3] = 7  # a single-level image is unchanged
    y = A.equalize(unit(x))
    for i in range(4):
        ref = from_pil(ImageOps.equalize(to_pil(x[i])))
        assert torch.allclose(y[i], ref, atol=1e-6), i
    assert not torch.allclose(y[0], unit(x[0]))


@pytest.mark.parametrize(
    "name, op, enhancer",
    [
        ("brightness", A.adjust_brightness, ImageEnhance.Brightness),
        ("contrast", A.adjust_contrast, ImageEnhance.Contrast),
        ("color", A.adjust_color, ImageEnhance.Color),
        ("sharpness", A.adjust_sharpness, ImageEnhance.Sharpness),
    ],
)
def test_enhance_ops_match_pil(name, op, enhancer):
    x = images(2, 3, 12, seed=5)
    factors = torch.tensor([0.05, 0.7])
    y = op(unit(x), factors)
    for i in range(2):
        ref = from_pil(enhancer(to_pil(x[i])).enhance(float(factors[i])))
        assert (y[i] - ref).abs().max() <= 2.01 / 255, name
    assert (y - unit(x)).abs().max() > 0.05


def test_color_is_noop_for_one_channel():
    x = unit(images(2, 1, 8))
    assert torch.equal(A.adjust_color(x, 0.1), x)


def test_geometric_ops_zero_magnitude_is_identity():
    x = torch.rand(3, 3, 9, 9)
    for op in (A.rotate, A.shear_x, A.shear_y, A.translate_x, A.translate_y):
        assert torch.allclose(op(x, 0.0), x, atol=1e-5), op.__name__


def test_rotate_is_counter_clockwise():
    x = torch.rand(2, 3, 8, 8)
    assert torch.allclose(A.rotate(x, 90.0), torch.rot90(x, 1, dims=(2, 3)), atol=1e-5)
    assert torch.allclose(A.rotate(x, torch.tensor([-90.0, 90.0]))[0], torch.rot90(x[0], -1, dims=(1, 2)), atol=1e-5)
    xu = (x[0] * 255).round().to(torch.uint8)
    assert torch.allclose(A.rotate(unit(xu[None]), 90.0)[0], from_pil(to_pil(xu).rotate(90)), atol=1e-5)


def test_rotate_small_angle_fills_corners_with_zero():
    x = torch.ones(1, 1, 16, 16)
    y = A.rotate(x, 30.0)
    assert y[0, 0, 0, 0] == 0 and y[0, 0, -1, -1] == 0
    assert torch.allclose(y[0, 0, 6:10, 6:10], torch.ones(4, 4))


def test_translate_shifts_by_fraction_of_size():
    x = torch.rand(1, 1, 8, 8)
    y = A.translate_x(x, 0.25)
    assert torch.allclose(y[..., :6], x[..., 2:], atol=1e-6)
    assert torch.all(y[..., 6:] == 0)
    y = A.translate_y(x, -0.25)
    assert torch.allclose(y[..., 2:, :], x[..., :6, :], atol=1e-6)
    assert torch.all(y[..., :2, :] == 0)


def test_shear_x_shifts_rows_about_centre():
    x = torch.zeros(1, 1, 9, 9)
    x[..., 4] = 1.0  # vertical line through the centre
    y = A.shear_x(x, 0.25)[0, 0]
    # Row y samples input column x + 0.25 * (y - 4).
    assert y[0].argmax() == 5 and y[4].argmax() == 4 and y[8].argmax() == 3
    assert torch.allclose(y[0].sum(), torch.tensor(1.0))
    yt = A.shear_y(x.transpose(2, 3), 0.25)[0, 0]
    assert torch.allclose(yt, y.T, atol=1e-6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("kind", A.KINDS)
def test_cuda(kind):
    x = images(8, 3, 20).cuda()
    y = make_transform(kind, AugmentConfig(blur_prob=0.5), MEAN3, STD3, out_size=16)(x)
    assert y.is_cuda and y.shape == (8, 3, 16, 16) and torch.isfinite(y).all()


@pytest.mark.parametrize("kind", ["simclr", "weak", "strong"])
@pytest.mark.parametrize("c", [1, 3])
def test_slices_of_a_batch_equal_the_whole_batch(kind, c):
    """Ranks (or workers) augmenting parts of a global batch with their samples' draws give bitwise the views one
    process gives the whole batch: every op is batch-composition invariant."""
    cfg = AugmentConfig(blur_prob=0.5, translate_frac=0.1, strong_ops=6)
    view = T.make_transform(kind, cfg, *stats(c))
    x = images(10, c, 16, seed=3)
    u = draws(10, seed=7)
    whole = view(x, u)
    parts = [view(x[rows], u[rows]) for rows in (slice(0, 4), slice(4, 5), slice(5, 10))]
    assert torch.equal(torch.cat(parts), whole)


@pytest.mark.parametrize("kind", A.KINDS)
def test_per_sample_base_equals_batched_base(kind):
    """Decoded files go through base_one image by image; arrays through the batched base: same bytes."""
    view = T.make_transform(kind, AugmentConfig(translate_frac=0.1), MEAN3, STD3, out_size=16)
    x = images(6, 3, 20)
    p = view.params(draws(6) if view.random else None, np.tile([20, 20], (6, 1)))
    batched = view.base(x, p)
    single = torch.stack([view.base_one(x[i], p, i) for i in range(6)])
    assert batched.dtype == torch.uint8 and torch.equal(batched, single)


def test_crops_of_non_square_images_cover_the_whole_image():
    """A random resized crop of a wide stored image (a decoded photo) samples from all of it, not a square centre."""
    wide = torch.zeros(1, 1, 10, 40, dtype=torch.uint8)
    wide[..., :10] = 255  # a bright band at the left edge only
    view = T.make_transform("simclr", identity_cfg(crop_scale_min=0.08), (0.0,), (1.0,), out_size=8)
    n = 64
    p = view.params(draws(n), np.tile([10, 40], (n, 1)))
    bright = torch.stack([view.base_one(wide[0], p, i) for i in range(n)]).float().mean(dim=(1, 2, 3))
    assert (bright > 128).any() and (bright < 1).any()
