"""scan.mode=cached: the fp16 feature cache (fixed counter-based views, sharded build, reuse) and head training on it.

The reference for cached training is SCAN on the fly: the same fixed augmented images, the frozen backbone run on
every step's rows, the same per-row view draws. The cache stores fp16, so the two agree to fp16 rounding of the
features (relative 2**-11 ~ 4.9e-4), not bit for bit; the tolerances below are stated against that.
"""
import json
import logging
import subprocess
import sys
import time
from pathlib import Path
import struct

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from gloo import free_port, gloo_group
from scan_dist.config import load_config
from scan_dist.context import RunContext
from scan_dist.models import build
from scan_dist.data.loaders import ViewSpec
from scan_dist.stages import feature_cache, scan
from scan_dist.stages.feature_cache import FeatureCache, build_cache

NUM, VIEWS = 256, 3
BASE = ("data.format=idx", "data.max_images=null", "data.max_eval_images=null","run.progress=false", "run.device=cpu", "data.mean=[0.5]", "data.std=[0.25]", "model.channels_last=false",
        "model.width=8", "scan.mode=cached", "scan.features=backbone", "scan.batch_size=64", "scan.epochs=2",
        "scan.num_heads=2", f"scan.cached_views={VIEWS}", "scan.view=simclr", "run.eval_batch_size=64",
        "run.checkpoint_every_steps=1000")


def fake_images(num: int = NUM) -> torch.Tensor:
    """Fashion-MNIST-like (grey, uint8, a bright blob in one of 9 places per image), 16x16 to keep the tests fast."""
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 60, (num, 1, 16, 16), generator=gen, dtype=torch.uint8)
    for i in range(num):
        row, col = divmod(i % 9, 3)
        images[i, 0, 1 + 5 * row:5 + 5 * row, 1 + 5 * col:5 + 5 * col] = 200
    return images


def write_idx(root: Path, images: torch.Tensor) -> Path:
    """The images as an IDX dataset (train and t10k), so the context reads them like any array dataset."""
    root.mkdir(parents=True, exist_ok=True)
    pixels = images[:, 0].numpy()
    for prefix in ("train", "t10k"):
        header = bytes([0, 0, 8, 3]) + struct.pack(">3I", *pixels.shape)
        (root / f"{prefix}-images-idx3-ubyte").write_bytes(header + pixels.tobytes())
        labels = (np.arange(len(pixels)) % 9).astype(np.uint8)
        (root / f"{prefix}-labels-idx1-ubyte").write_bytes(bytes([0, 0, 8, 1]) + struct.pack(">I", len(labels))
                                                           + labels.tobytes())
    return root


def make_ctx(run_dir: Path, *overrides: str) -> RunContext:
    data = run_dir.parent / "fake-idx"
    if not data.is_dir():
        write_idx(data, fake_images())
    cfg = load_config("smoke", [*BASE, f"data.path={data}", *overrides])
    return RunContext(cfg, run_dir, logging.getLogger("test_feature_cache"))


def fixed_views(ctx: RunContext, view: int, kind: str) -> torch.Tensor:
    """The normalised pixels of every training image in cache view `view` (0: un-augmented)."""
    spec = ViewSpec("eval") if view == 0 else ViewSpec(kind, feature_cache.view_stream(kind), view)
    source = ctx.inference_batches("train", [spec], start=0, stop=NUM)
    return source.build_now(np.arange(NUM))["views"][0]


def make_model(ctx: RunContext, seed: int = 0):
    """A cluster model whose frozen backbone has BatchNorm statistics of the images (as after pretext training),
    so its features have a useful scale (a fresh BatchNorm in eval mode leaves them at ~1e-3)."""
    torch.manual_seed(seed)
    model = build.cluster_model(ctx.cfg, ctx, ctx.cfg.scan.num_heads)
    for module in model.backbone.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.reset_running_stats()
            module.momentum = None  # cumulative average: one pass sets the statistics of that batch
    model.backbone.train()
    with torch.no_grad():
        model.backbone(fixed_views(ctx, 0, "eval"))
    return model.eval()


def fake_neighbors(path: Path, num: int = NUM, k: int = 5) -> Path:
    gen = torch.Generator().manual_seed(1)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(path, ((torch.arange(num)[:, None] + torch.randint(1, num, (num, k), generator=gen)) % num).numpy())
    return path


def test_cache_layout_dtype_and_reuse(tmp_path):
    ctx = make_ctx(tmp_path)
    model = make_model(ctx)
    calls = []
    model.backbone.register_forward_hook(lambda *_: calls.append(1))
    rng_before = torch.get_rng_state()
    cache = build_cache(ctx, model.backbone, VIEWS, "simclr", tmp_path / "cache")
    assert torch.equal(torch.get_rng_state(), rng_before), "building a cache must not move the torch RNG"
    assert cache.built and cache.path.parent.parent == tmp_path / "cache"
    stored = np.load(cache.path, mmap_mode="r")
    assert isinstance(stored, np.memmap) and stored.dtype == np.float16
    dim = model.backbone.out_dim
    assert stored.shape == (NUM, VIEWS + 1, dim) and (cache.num_items, cache.num_views, cache.dim) == stored.shape
    meta = json.loads((cache.path.parent / "meta.json").read_text())
    assert meta["complete"] and meta["shape"] == [NUM, VIEWS + 1, dim] and meta["dtype"] == "float16"
    with torch.no_grad():
        eval_features = model.backbone(fixed_views(ctx, 0, "simclr"))
        view2 = model.backbone(fixed_views(ctx, 2, "simclr"))
    # view 0 is the un-augmented image, views 1..V the counter-based augmentations; fp16 storage: relative 2**-11
    torch.testing.assert_close(torch.from_numpy(np.array(stored[:, 0])).float(), eval_features, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(torch.from_numpy(np.array(stored[:, 2])).float(), view2, rtol=1e-3, atol=1e-3)
    for a in range(VIEWS + 1):
        for b in range(a + 1, VIEWS + 1):
            gap = np.linalg.norm(stored[:, a] - stored[:, b]) / np.linalg.norm(stored[:, a])
            assert gap > 0.05, f"views {a} and {b} must differ"
    views, rows = torch.tensor([0, 3, 1, 2]), torch.tensor([5, 5, 255, 100])
    got = cache.get(views, rows)
    assert got.dtype == torch.float32 and got.shape == (4, dim)
    assert torch.equal(got, torch.from_numpy(np.array(stored[rows.numpy(), views.numpy()])).float())

    # the same backbone, images and settings again: reused, nothing recomputed or rewritten
    calls.clear()
    mtime = cache.path.stat().st_mtime_ns
    time.sleep(0.01)
    again = build_cache(ctx, model.backbone, VIEWS, "simclr", tmp_path / "cache")
    assert not again.built and again.path == cache.path and again.path.stat().st_mtime_ns == mtime
    assert len(calls) == 1  # only the one-image probe that finds the feature size
    # other weights -> another key: rebuilt, and the stale cache is removed (one cache per folder)
    with torch.no_grad():
        next(model.backbone.parameters()).mul_(1.01)
    changed = build_cache(ctx, model.backbone, VIEWS, "simclr", tmp_path / "cache")
    assert changed.built and changed.path != cache.path and not cache.path.exists()
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == [changed.path.parent.name]


def test_cached_scan_equals_on_the_fly_scan(tmp_path, monkeypatch):
    """Cached SCAN (fp16 memmap, gathered rows) vs SCAN with the frozen backbone run on every step's rows of the same
    fixed views, same per-row view draws, same neighbour draws. Linear heads and SGD with momentum (the ImageNet
    recipe), so that a feature difference moves the weights in proportion; Adam's per-element scaling and ReLU
    kinks would turn 1e-4 differences into lr-sized ones on a few near-zero gradient elements.

    * against a reference whose on-the-fly features are rounded to fp16 like the cache: equal to float32 noise
      (the backbone on other batch compositions): losses and weights within 1e-5;
    * against the plain float32 reference: features differ by fp16 rounding (relative <= 2**-11 ~ 4.9e-4), the
      losses within rtol 1e-3 and the head weights within 1e-3 absolute (measured: 1.5e-4), while training moves
      them by > 0.1 (measured: 0.47).
    """
    overrides = ("scan.optimizer=sgd", "scan.lr=1.0", "scan.momentum=0.9", "scan.head_hidden=0")
    neighbors = fake_neighbors(tmp_path / "neighbors.npy")
    recorded = []
    real_objective = scan.scan_objective

    def recorder(*args, **kwargs):
        out = real_objective(*args, **kwargs)
        recorded.append(out[1].clone())  # per-head total loss of the step
        return out

    monkeypatch.setattr(scan, "scan_objective", recorder)

    def train(name: str, features_fn=None):
        ctx = make_ctx(tmp_path / name, *overrides)
        model = make_model(ctx)
        recorded.clear()
        torch.manual_seed(123)
        if features_fn is None:
            history = scan._train_cached(ctx.cfg, ctx, model, neighbors, "hash")
        else:
            history = scan.train_on_features(ctx.cfg, ctx, model, neighbors, "hash", features_fn(ctx, model), NUM,
                                             VIEWS)
        return model.heads.state_dict(), torch.stack(recorded), history

    seen_views = []

    def on_the_fly(round_fp16: bool):
        def make(ctx, model):
            pixels = torch.stack([fixed_views(ctx, v, ctx.cfg.scan.view) for v in range(VIEWS + 1)], dim=1)

            def features(views, rows):
                seen_views.append(views)
                with torch.no_grad():
                    out = model.backbone(pixels[rows, views])
                return out.half().float() if round_fp16 else out

            return features
        return make

    cached = train("cached")
    rounded = train("rounded", on_the_fly(True))
    plain = train("plain", on_the_fly(False))
    untrained = make_model(make_ctx(tmp_path / "untrained", *overrides)).heads.state_dict()

    steps = 2 * (NUM // 64)
    assert len(cached[1]) == len(rounded[1]) == len(plain[1]) == steps
    # Training draws augmented views only; the end-of-epoch head diagnostics read the un-augmented view 0.
    training = [v for v in seen_views if v.any()]
    assert len(training) == 2 * steps  # one call per step, two on-the-fly runs
    chosen = torch.cat(training)
    assert chosen.min() >= 1 and set(chosen.tolist()) == set(range(1, VIEWS + 1))
    torch.testing.assert_close(cached[1], rounded[1], rtol=0, atol=1e-5)
    torch.testing.assert_close(cached[1], plain[1], rtol=1e-3, atol=1e-4)
    for key in plain[2][-1]:
        assert cached[2][-1][key] == pytest.approx(plain[2][-1][key], rel=1e-3, abs=1e-4)
    for name in cached[0]:
        torch.testing.assert_close(cached[0][name], rounded[0][name], rtol=0, atol=1e-5)
        torch.testing.assert_close(cached[0][name], plain[0][name], rtol=0, atol=1e-3)
    moved = max(float((cached[0][n] - untrained[n]).abs().max()) for n in cached[0])
    worst = max(float((cached[0][n] - plain[0][n]).abs().max()) for n in cached[0])
    print(f"max |w_cached - w_fp32_reference| = {worst:.2e}, max |w - w_init| = {moved:.2e}, "
          f"max loss diff = {float((cached[1] - plain[1]).abs().max()):.2e}")
    assert moved > 0.1


def test_cached_scan_resumes_to_the_same_weights(tmp_path, monkeypatch):
    """A run that dies mid-epoch resumes from its checkpoint on the reused cache and ends where an uninterrupted
    run ends (the neighbour and view draws are counter-based: the position alone says what comes next)."""
    overrides = ("run.checkpoint_every_steps=3",)
    neighbors = fake_neighbors(tmp_path / "neighbors.npy")

    def train(run_dir: Path):
        ctx = make_ctx(run_dir, *overrides)
        model = make_model(ctx)
        torch.manual_seed(7)
        history = scan._train_cached(ctx.cfg, ctx, model, neighbors, "hash")
        return model.heads.state_dict(), history

    whole = train(tmp_path / "whole")
    real_get, calls = FeatureCache.get, []

    # Training steps read augmented views (1..V); the end-of-epoch diagnostics read view 0 and are not counted.
    def dying_get(self, views, rows):
        calls.append(int(views.any()))
        if sum(calls) == 6:  # epoch 2, step 2: the last checkpoint is the end of epoch 1
            raise KeyboardInterrupt("killed")
        return real_get(self, views, rows)

    monkeypatch.setattr(FeatureCache, "get", dying_get)
    with pytest.raises(KeyboardInterrupt):
        train(tmp_path / "killed")
    assert (tmp_path / "killed" / "scan" / "checkpoint.pt").is_file()
    calls.clear()

    def counting_get(self, views, rows):
        calls.append(int(views.any()))
        return real_get(self, views, rows)

    monkeypatch.setattr(FeatureCache, "get", counting_get)
    resumed = train(tmp_path / "killed")
    assert sum(calls) == NUM // 64  # only epoch 2 ran again
    assert resumed[1] == whole[1]
    for name in whole[0]:
        assert torch.equal(resumed[0][name], whole[0][name]), name


def _shard_worker(rank: int, world: int, port: int, out_dir: str):
    with gloo_group(rank, world, port):
        ctx = make_ctx(Path(out_dir))
        model = make_model(ctx)
        build_cache(ctx, model.backbone, 2, "weak", Path(out_dir) / "two")


@pytest.mark.dist
def test_sharded_build_equals_one_process(tmp_path):
    mp.spawn(_shard_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each gloo worker: the same CPU kernels
    try:
        ctx = make_ctx(tmp_path)
        one = build_cache(ctx, make_model(ctx).backbone, 2, "weak", tmp_path / "one")
    finally:
        torch.set_num_threads(threads)
    (two,) = [p for p in (tmp_path / "two").iterdir()]
    assert two.name == one.path.parent.name  # the key does not depend on the number of processes
    assert json.loads((two / "meta.json").read_text())["world_size"] == 2
    sharded, single = np.load(two / "features.npy"), np.load(one.path)
    assert sharded.shape == single.shape == (NUM, 3, make_model(ctx).backbone.out_dim)
    assert np.array_equal(sharded, single)


@pytest.mark.slow
def test_smoke_run_cached_mode(tmp_path, fashion_mnist):
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "scan_dist.launch", "--local", "--run-dir", str(run_dir), "smoke",
           "run.progress=false", "scan.mode=cached", "scan.cached_views=2"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["acc"] > 0.2  # better than chance (0.1) after one short epoch per stage
    (cache_dir,) = [p for p in (run_dir / "scan" / "cache").iterdir()]
    stored = np.load(cache_dir / "features.npy", mmap_mode="r")
    assert stored.dtype == np.float16 and stored.shape[:2] == (3000, 3)
    mtime = (cache_dir / "features.npy").stat().st_mtime_ns
    # a changed SCAN training setting re-runs the stage on the same frozen backbone: the cache is reused
    again = subprocess.run(cmd + ["scan.lr=0.002", "selflabel.enabled=false"], capture_output=True, text=True,
                           timeout=600)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "feature cache: reusing" in (run_dir / "log.txt").read_text()
    assert (cache_dir / "features.npy").stat().st_mtime_ns == mtime
