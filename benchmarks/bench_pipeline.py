"""Benchmark of the JPEG input pipeline of the data layer (``scan_dist.data``): views per second, loader vs DALI vs tv2.

Measures augmented views per second -- read + decode + augment + delivery to the training loop (on the device when
CUDA) -- for the two multi-view pipelines of SCAN:

* ``simclr``    -- ``ViewSpec("simclr", "pretext", 0)`` and ``ViewSpec("simclr", "pretext", 1)`` (pretext stage);
* ``selflabel`` -- ``ViewSpec("weak", "selflabel", 0)`` and ``ViewSpec("strong", "selflabel", 1)`` (self-labelling).

The files are opened as training runs open them: ``open_dataset(folder, "train", fmt="flat", image_size=out_size)``
(PIL decode, shorter side resized to out_size * 256/224, with JPEG draft decoding), and the views are
``ViewTransform(kind, AugmentConfig(), ImageNet mean/std, out_size)``. Implementations (rows):

* ``loader`` -- :class:`scan_dist.data.loaders.BatchSource` with ``workers`` DataLoader processes running
  ``BatchBuilder`` (decode, parameter draws, base phase, and the finish phase when it runs in the loader); one row per
  ``--workers`` value plus ``workers=0`` (everything in the training process: "in the loop").  ``--finish-on``
  (default ``auto``: in the loader on CPU, on the device on CUDA, as ``data.finish_on=auto``) says where the float
  phase runs; the row's ``finish`` field records it.
* ``dali``   -- :class:`scan_dist.data.dali.DaliBatchSource` (when NVIDIA DALI imports and not ``--no-dali``) with
  ``workers`` = max of ``--workers``: the workers decode and draw, DALI executes the geometric base phase
  (``fn.warp_affine``; CPU operators without CUDA), the finish phase runs in the training process (on the device).
  CPU DALI timings say nothing about GPU speed.
* ``tv2``    -- the classic torchvision recipe, the baseline: a torch ``DataLoader`` over the same files, PIL decode of
  the full image, then per view torchvision.transforms.v2 (RandomResizedCrop / flip / ColorJitter / RandomGrayscale
  [/ GaussianBlur] for simclr; RandomResizedCrop scale >= 0.6 + flip for weak; Resize + CenterCrop + flip +
  RandAugment(num_ops=strong_ops) + RandomErasing as Cutout for strong), ToDtype + Normalize; one row per
  ``--workers`` value.

Timing: per row, one warm-up epoch (workers start, DALI builds), then ``--epochs`` whole epochs; the median epoch's
views/s is reported, with ``wait_frac`` = the share of the epoch the consumer spent waiting for (and, for ``loader``
with the finish phase on the device and for ``dali``, finishing) batches -- ``BatchSource.wait_s``; 1.0 for
``workers=0``, where the consumer builds every batch itself.  ``ratio`` = views/s / the best ``tv2`` row of the same
pipeline (> 1: faster than the classic recipe).

Files are generated once (``--data-dir``, reused when it already holds them; else a temp folder, deleted at the end):
photo-like RGB images of multi-octave random texture, 500x375, JPEG quality ``--quality`` (92: ~85 KB per file), in
a sub-folder named by size and quality.

Budget: ``--budget-s N`` bounds the run.  A probe (one small batch per pipeline and implementation, in this process)
estimates each row's epoch time; the plan then cuts, in order, timed epochs (down to 1), intermediate ``--workers``
values (the smallest and largest stay), and the image count (down to two batches), until the estimate fits 85 % of the
budget; while running, a row's timed epochs stop once another would overrun its share, and rows that no longer fit
are skipped.  Every cut is listed in the JSON's ``notes``.

Usage::

    python benchmarks/bench_pipeline.py                                # 2000 images, workers 2 4 8 16 (+0)
    python benchmarks/bench_pipeline.py --small --workers 1 2          # CPU smoke run, well under 2 minutes
    python benchmarks/bench_pipeline.py --budget-s 300 --data-dir /tmp/jpegs
"""
from __future__ import annotations

import argparse
import math
import os
import shutil
import statistics
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch

if __package__ in (None, ""):  # run as a script: make the repo root importable (benchmarks.common, scan_dist)
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import Budget, add_budget_argument, environment, print_table, synchronize, write_results

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
# name -> the views of one sample, as (kind, stream, view number)
PIPELINES = {
    "simclr": (("simclr", "pretext", 0), ("simclr", "pretext", 1)),
    "selflabel": (("weak", "selflabel", 0), ("strong", "selflabel", 1)),
}
IMPLS = ("loader", "dali", "tv2")
BASELINES = ("tv2",)
SEED = 0
# Start-up seconds a row pays once, outside its per-image cost (estimates for the budget plan only).
_ROW_FIXED_S, _WORKER_START_S, _DALI_BUILD_S = 0.2, 0.15, 1.0
_PLAN_FILL = 0.85  # share of the budget the plan may fill (the rest: estimate error, interpreter exit)
_PROBE_IMAGES = 16


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--small", action="store_true", help="200 images of 160x120, out-size 64, batch 32")
    parser.add_argument("--num-images", type=int, default=None, help="default 2000 (200 with --small)")
    parser.add_argument("--image-size", type=int, nargs=2, default=None, metavar=("W", "H"),
                        help="generated image size (default 500 375; 160 120 with --small)")
    parser.add_argument("--quality", type=int, default=92, help="JPEG quality of the generated files")
    parser.add_argument("--out-size", type=int, default=None, help="view side (default 224; 64 with --small)")
    parser.add_argument("--batch-size", type=int, default=None, help="default 256 (32 with --small)")
    parser.add_argument("--workers", type=int, nargs="+", default=None,
                        help="DataLoader worker counts of the loader and tv2 rows (loader also runs 0; dali uses "
                             "the largest); default 2 4 8 16 (2 with --small)")
    parser.add_argument("--prefetch", type=int, default=2, help="batches each worker prepares ahead (data.prefetch)")
    parser.add_argument("--finish-on", choices=("auto", "loader", "device"), default="auto",
                        help="where the loader rows run the float phase (data.finish_on; auto: loader on CPU, "
                             "device on CUDA)")
    parser.add_argument("--torch-threads", type=int, default=None,
                        help="torch intra-op threads of the consuming (training) process, which runs workers=0 "
                             "batches and DALI's finish phase on CPU (default: torch's own, one per core)")
    parser.add_argument("--impls", nargs="+", choices=IMPLS, default=list(IMPLS))
    parser.add_argument("--pipelines", nargs="+", choices=sorted(PIPELINES), default=sorted(PIPELINES))
    parser.add_argument("--no-dali", action="store_true", help="skip the DALI rows")
    parser.add_argument("--epochs", type=int, default=None,
                        help="timed epochs per row after one warm-up epoch, median reported (default 2; 3 with "
                             "--small)")
    parser.add_argument("--data-dir", type=Path, default=None, help="where the JPEGs go (kept; default: a temp dir)")
    parser.add_argument("--out", type=Path, default=None, help="results folder (default benchmarks/results)")
    add_budget_argument(parser)
    args = parser.parse_args(argv)
    args.num_images = args.num_images or (200 if args.small else 2000)
    args.image_size = tuple(args.image_size or ((160, 120) if args.small else (500, 375)))
    args.out_size = args.out_size or (64 if args.small else 224)
    args.batch_size = args.batch_size or (32 if args.small else 256)
    args.workers = sorted(set(args.workers or ([2] if args.small else [2, 4, 8, 16])))
    args.epochs = args.epochs or (3 if args.small else 2)
    if min(args.workers) < 1:
        parser.error("--workers values must be >= 1 (workers=0 is always run for the loader)")
    if args.epochs < 1 or args.num_images < 1 or args.batch_size < 1:
        parser.error("--epochs, --num-images and --batch-size must be positive")
    return args


def _cores() -> int:
    from scan_dist.data.loaders import usable_cpus

    return usable_cpus()


# --------------------------------------------------------------------------- data


def _texture(seed: int, w: int, h: int):
    """Multi-octave random colour texture: compresses like a photo (~85 KB at 500x375, quality 92)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    acc = np.zeros((h, w, 3), np.float32)
    for div, amp in ((64, 1.0), (16, 0.6), (4, 0.35), (1, 0.12)):
        field = rng.random((max(2, h // div), max(2, w // div), 3), dtype=np.float32)
        up = Image.fromarray((field * 255).astype(np.uint8)).resize((w, h), Image.BICUBIC)
        acc += amp * (np.asarray(up, np.float32) / 255 - 0.5)
    return Image.fromarray(((acc / 1.2 + 0.5).clip(0, 1) * 255).astype(np.uint8))


def _write_jpeg(job) -> int:
    path, seed, w, h, quality = job
    tmp = f"{path}.tmp"
    _texture(seed, w, h).save(tmp, "JPEG", quality=quality)
    os.replace(tmp, path)  # a killed run never leaves a truncated file behind
    return os.path.getsize(path)


def jpeg_folder(root: Path, size: tuple[int, int], quality: int) -> Path:
    """The folder of one (size, quality): a flat listing of it holds only these files."""
    return root / f"{size[0]}x{size[1]}q{quality}"


def make_jpegs(folder: Path, n: int, size: tuple[int, int], quality: int) -> float:
    """Make sure ``folder`` holds img00000.jpg .. img<n-1>.jpg; returns the seconds spent writing."""
    folder.mkdir(parents=True, exist_ok=True)
    w, h = size
    todo = [(str(folder / f"img{i:05d}.jpg"), i, w, h, quality) for i in range(n)
            if not (folder / f"img{i:05d}.jpg").exists()]
    if not todo:
        return 0.0
    start = time.perf_counter()
    if len(todo) <= 4:
        for job in todo:
            _write_jpeg(job)
    else:
        with ProcessPoolExecutor(max_workers=max(1, min(16, _cores(), len(todo) // 4))) as pool:
            list(pool.map(_write_jpeg, todo, chunksize=8))
    spent = time.perf_counter() - start
    print(f"wrote {len(todo)} JPEGs ({w}x{h}, quality {quality}) to {folder} in {spent:.1f} s")
    return spent


def open_reader(folder: Path, out_size: int, num_images: int):
    from scan_dist.data.formats import open_dataset

    return open_dataset(folder, "train", fmt="flat", image_size=out_size, max_images=num_images, seed=SEED)


# --------------------------------------------------------------------------- the data layer (loader, dali)


def _specs(pipeline: str):
    from scan_dist.data.loaders import ViewSpec

    return [ViewSpec(kind, stream, view) for kind, stream, view in PIPELINES[pipeline]]


def _builder(reader, pipeline: str, cfg, out_size: int, finish_in_loader: bool):
    from scan_dist.data.loaders import BatchBuilder
    from scan_dist.data.transforms import ViewTransform

    specs = _specs(pipeline)
    transforms = {s.kind: ViewTransform(s.kind, cfg, IMAGENET_MEAN, IMAGENET_STD, out_size) for s in specs}
    return BatchBuilder(reader, specs, transforms, seed=SEED, finish_in_loader=finish_in_loader, on_bad_image="fail")


def make_source(impl: str, reader, pipeline: str, cfg, args, workers: int, finish_in_loader: bool,
                device: torch.device):
    """A ``BatchSource`` (loader) or ``DaliBatchSource`` (dali) over ``reader``, as ``RunContext.batches`` builds it."""
    from scan_dist.data.loaders import BatchSource, EpochRequests, LoaderSettings

    builder = _builder(reader, pipeline, cfg, args.out_size, finish_in_loader)
    sampler = EpochRequests(len(reader), args.batch_size, seed=SEED, stream=pipeline, rank=0, world=1)
    settings = LoaderSettings(workers=workers, prefetch=args.prefetch, pin_memory=device.type == "cuda",
                              device=device)
    if impl == "dali":
        from scan_dist.data.dali import DaliBatchSource

        return DaliBatchSource(builder, sampler, settings)
    return BatchSource(builder, sampler, settings)


def _source_epoch(source, epoch: int, device: torch.device) -> tuple[int, float]:
    """(views delivered, consumer wait seconds) of one whole epoch of a BatchSource."""
    waited = source.wait_s
    views = 0
    for batch in source.epoch(epoch):
        views += sum(int(v.shape[0]) for v in batch["views"])
    synchronize(device)
    return views, source.wait_s - waited


# --------------------------------------------------------------------------- torchvision v2 baseline


def _tv2_view(kind: str, cfg, out: int):
    from torchvision.transforms import v2

    tail = [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    flip = [v2.RandomHorizontalFlip()] if cfg.flip else []
    if kind == "simclr":
        head = [v2.RandomResizedCrop(out, scale=(cfg.crop_scale_min, 1.0), ratio=cfg.crop_ratio, antialias=True),
                *flip,
                v2.RandomApply([v2.ColorJitter(cfg.brightness, cfg.contrast, cfg.saturation, cfg.hue)],
                               p=cfg.jitter_prob),
                v2.RandomGrayscale(cfg.grayscale_prob)]
        if cfg.blur_prob > 0:
            kernel = max(3, int(0.1 * out) // 2 * 2 + 1)
            head.append(v2.RandomApply([v2.GaussianBlur(kernel, sigma=(0.1, 2.0))], p=cfg.blur_prob))
        return v2.Compose(head + tail)
    if kind == "weak":
        head = [v2.RandomResizedCrop(out, scale=(max(cfg.crop_scale_min, 0.6), 1.0), ratio=cfg.crop_ratio,
                                     antialias=True), *flip]
        return v2.Compose(head + tail)
    side = round(cfg.cutout_frac * out)
    area = side * side / (out * out)
    head = [v2.Resize(out, antialias=True), v2.CenterCrop(out), *flip, v2.RandAugment(num_ops=cfg.strong_ops)]
    erase = [v2.RandomErasing(p=1.0, scale=(area, area), ratio=(1.0, 1.0), value=0)] if side > 0 else []
    return v2.Compose(head + tail + erase)


class Tv2Views(torch.utils.data.Dataset):
    """PIL-decoded files, several torchvision v2 views each: returns ([V, C, out, out] float, index)."""

    def __init__(self, paths, kinds, cfg, out: int):
        self.paths, self.kinds, self.cfg, self.out = list(paths), tuple(kinds), cfg, out
        self._views = None

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i):
        from PIL import Image

        if self._views is None:  # built lazily, inside the worker
            self._views = [_tv2_view(kind, self.cfg, self.out) for kind in self.kinds]
        with Image.open(self.paths[i]) as img:
            img = img.convert("RGB")
            return torch.stack([view(img) for view in self._views]), i


class Tv2Source:
    """The tv2 DataLoader behind the BatchSource interface the timing loop uses (epoch, wait_s, close)."""

    def __init__(self, reader, pipeline: str, cfg, args, workers: int, device: torch.device):
        paths = [reader.path(i) for i in range(len(reader))]
        kinds = [kind for kind, _, _ in PIPELINES[pipeline]]
        self.device = device
        self.loader = torch.utils.data.DataLoader(
            Tv2Views(paths, kinds, cfg, args.out_size), batch_size=args.batch_size, shuffle=True,
            num_workers=workers, drop_last=False, pin_memory=device.type == "cuda",
            persistent_workers=workers > 0, prefetch_factor=args.prefetch if workers else None,
            generator=torch.Generator().manual_seed(SEED))
        self.wait_s = 0.0

    def epoch(self, epoch: int):
        iterator = iter(self.loader)
        while True:
            start = time.perf_counter()
            try:
                views, index = next(iterator)
            except StopIteration:
                return
            views = views.to(self.device, non_blocking=True)
            self.wait_s += time.perf_counter() - start
            yield {"index": index, "views": list(views.unbind(1))}

    def close(self) -> None:
        iterator = getattr(self.loader, "_iterator", None)
        if iterator is not None and hasattr(iterator, "_shutdown_workers"):
            iterator._shutdown_workers()
        self.loader = None


# --------------------------------------------------------------------------- timing


def time_row(make, epochs: int, device: torch.device, seconds: float | None) -> dict:
    """One warm-up epoch, then up to ``epochs`` timed epochs (fewer when another would overrun ``seconds``)."""
    begin = time.perf_counter()
    source = make()
    try:
        start = time.perf_counter()
        _source_epoch(source, 0, device)
        warmup_s = time.perf_counter() - start
        times, rates, waits, views = [], [], [], 0
        for e in range(1, epochs + 1):
            spent = time.perf_counter() - begin
            if seconds is not None and times and spent + statistics.median(times) > seconds:
                break
            start = time.perf_counter()
            views, wait = _source_epoch(source, e, device)
            elapsed = time.perf_counter() - start
            times.append(elapsed)
            rates.append(views / elapsed)
            waits.append(wait / elapsed)
    finally:
        source.close()
    return {"views_per_s": statistics.median(rates), "epoch_s": statistics.median(times),
            "wait_frac": statistics.median(waits), "warmup_s": warmup_s, "views": views, "epochs": len(times),
            "budget_cut": len(times) < epochs}


# --------------------------------------------------------------------------- budget plan


def probe_costs(reader, pipelines, impls, cfg, args, device: torch.device) -> dict:
    """Seconds per image (all views) of each pipeline, from a small batch after one warm-up, measured in this process
    twice: with its torch threads (``"main"``: the workers=0 rows) and with one thread (``"worker"``: what a
    DataLoader worker runs with).  Per-image costs only size the budget plan."""
    from scan_dist.data.loaders import Request

    k = min(_PROBE_IMAGES, len(reader))
    idx = np.arange(k, dtype=np.int64)
    threads = torch.get_num_threads()
    costs = {}
    try:
        for pipeline in pipelines:
            builder = _builder(reader, pipeline, cfg, args.out_size, finish_in_loader=True)
            tv2 = Tv2Views([reader.path(i) for i in range(k)], [kind for kind, _, _ in PIPELINES[pipeline]], cfg,
                           args.out_size) if "tv2" in impls else None
            for where, n_threads in (("main", threads), ("worker", 1)):
                torch.set_num_threads(n_threads)
                builder.build(Request(0, 0, idx[:2]))
                start = time.perf_counter()
                builder.build(Request(0, 0, idx))
                costs[("loader", pipeline, where)] = (time.perf_counter() - start) / k
                if tv2 is not None and where == "worker":
                    tv2[0]
                    start = time.perf_counter()
                    for i in range(k):
                        tv2[i]
                    costs[("tv2", pipeline, where)] = (time.perf_counter() - start) / k
    finally:
        torch.set_num_threads(threads)
    return costs


def estimate_row_s(impl: str, pipeline: str, workers: int, n: int, epochs: int, costs: dict, cores: int) -> float:
    if workers == 0:
        per_image = costs[("loader", pipeline, "main")]
    elif impl == "dali":  # decode in the workers, warp on DALI's threads, finish in this process: in between
        per_image = 0.5 * (costs[("loader", pipeline, "main")] + costs[("loader", pipeline, "worker")])
    else:
        per_image = costs[(impl, pipeline, "worker")]
    epoch = n * per_image / (1 if workers == 0 else min(workers, cores))
    fixed = _ROW_FIXED_S + _WORKER_START_S * workers + (_DALI_BUILD_S if impl == "dali" else 0.0)
    return fixed + (1 + epochs) * epoch


def plan_rows(pipelines, impls, workers, dali_ok: bool) -> list[tuple[str, str, int]]:
    rows = []
    for pipeline in pipelines:
        if "loader" in impls:
            rows.extend(("loader", pipeline, w) for w in [0, *workers])
        if "dali" in impls and dali_ok:
            rows.append(("dali", pipeline, max(workers)))
        if "tv2" in impls:
            rows.extend(("tv2", pipeline, w) for w in workers)
    return rows


def fit_plan(args, pipelines, impls, dali_ok, costs, cores, seconds: float, gen_s_per_image: float, have: int,
             notes: list) -> tuple[int, int, list[int]]:
    """(images, timed epochs, worker values) whose estimated time fits ``seconds``; cuts are appended to notes."""
    n, epochs, workers = args.num_images, args.epochs, list(args.workers)

    def total(n_, epochs_, workers_):
        gen = max(0, n_ - have) * gen_s_per_image / cores
        return gen + sum(estimate_row_s(impl, p, w, n_, epochs_, costs, cores)
                         for impl, p, w in plan_rows(pipelines, impls, workers_, dali_ok))

    limit = _PLAN_FILL * seconds
    if total(n, epochs, workers) > limit and epochs > 1:
        while epochs > 1 and total(n, epochs, workers) > limit:
            epochs -= 1
        notes.append(f"--budget-s: timed epochs per row cut from {args.epochs} to {epochs}")
    if total(n, epochs, workers) > limit and len(workers) > 2:
        dropped = []
        while len(workers) > 2 and total(n, epochs, workers) > limit:
            dropped.append(workers.pop(-2))  # the largest of the intermediate values first
        notes.append(f"--budget-s: worker counts {sorted(dropped)} dropped (kept {workers})")
    floor = min(n, max(2 * args.batch_size, 16))
    if total(n, epochs, workers) > limit and n > floor:
        fixed = total(0, epochs, workers)
        per_image = (total(n, epochs, workers) - fixed) / n
        new_n = max(floor, int((limit - fixed) / per_image) if per_image > 0 else n)
        if new_n < n:
            notes.append(f"--budget-s: images cut from {n} to {new_n}")
            n = new_n
    estimate = total(n, epochs, workers)
    if estimate > limit:
        notes.append(f"--budget-s {seconds:.0f} s (after start-up) likely too short even after the cuts "
                     f"(estimate {estimate:.0f} s); rows that no longer fit are skipped")
    return n, epochs, workers


# --------------------------------------------------------------------------- main


def main(argv=None) -> int:
    args = parse_args(argv)
    budget = Budget(args.budget_s)
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    from scan_dist.data.augment import AugmentConfig
    from scan_dist.data.dali import dali_available

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cfg = AugmentConfig()
    cores = _cores()
    finish_in_loader = args.finish_on == "loader" or (args.finish_on == "auto" and device.type != "cuda")
    notes = []
    if device.type == "cpu":
        notes.append("CPU run: DALI uses its CPU operators (and runs the finish phase in the training process); "
                     "its timings say nothing about GPU speed")
    notes.append(f"{cores} CPU cores visible; worker counts above that only add contention")
    dali_ok = "dali" in args.impls and not args.no_dali and dali_available()
    if "dali" in args.impls and not dali_ok:
        notes.append("dali skipped: " + ("--no-dali" if args.no_dali else "NVIDIA DALI not installed"))
    if "tv2" in args.impls:
        try:
            import torchvision.transforms.v2  # noqa: F401
        except ImportError:
            args.impls = [i for i in args.impls if i != "tv2"]
            notes.append("tv2 skipped: torchvision not installed")

    own_dir = args.data_dir is None
    root = Path(tempfile.mkdtemp(prefix="bench_pipeline_")) if own_dir else args.data_dir
    folder = jpeg_folder(root, args.image_size, args.quality)
    rows: list[dict] = []
    try:
        # Probe set first: the generation cost per image and the pipelines' cost per image size the plan.
        k = min(args.num_images, _PROBE_IMAGES)
        have_before = sum(1 for i in range(args.num_images) if (folder / f"img{i:05d}.jpg").exists())
        start = time.perf_counter()
        made = make_jpegs(folder, k, args.image_size, args.quality)
        gen_per_image = (time.perf_counter() - start) / k if made else 0.0
        if not made:  # files already there: time one generation (discarded) in case more are needed
            start = time.perf_counter()
            _texture(0, *args.image_size)
            gen_per_image = time.perf_counter() - start
        n, epochs, workers = args.num_images, args.epochs, list(args.workers)
        if budget.limited:
            reader = open_reader(folder, args.out_size, k)
            costs = probe_costs(reader, args.pipelines, args.impls, cfg, args, device)
            n, epochs, workers = fit_plan(args, args.pipelines, args.impls, dali_ok, costs, cores, budget.left(),
                                          gen_per_image, max(k, have_before), notes)
        else:
            costs = None
        make_jpegs(folder, n, args.image_size, args.quality)
        reader = open_reader(folder, args.out_size, n)
        mean_kb = statistics.fmean(os.path.getsize(reader.path(i)) for i in range(len(reader))) / 1e3
        print(f"{len(reader)} JPEGs, {args.image_size[0]}x{args.image_size[1]}, mean {mean_kb:.1f} KB, stored at "
              f"shorter side {reader.resize_size}; views {args.out_size}x{args.out_size}, batch {args.batch_size}, "
              f"device {device.type}, {cores} cores")

        plan = plan_rows(args.pipelines, args.impls, workers, dali_ok)
        correction = 1.0  # measured / estimated time of the rows so far
        for done, (impl, pipeline, w) in enumerate(plan):
            rows_left = len(plan) - done
            share = budget.share(rows_left)
            if budget.limited:
                estimate = correction * estimate_row_s(impl, pipeline, w, n, 1, costs, cores)
                if estimate > budget.left():
                    notes.append(f"{pipeline} {impl} workers={w}: skipped, --budget-s spent")
                    print(f"  {pipeline} {impl} workers={w}: skipped (budget)")
                    continue
            if impl == "tv2":
                make = lambda: Tv2Source(reader, pipeline, cfg, args, w, device)  # noqa: E731
            else:
                make = lambda: make_source(impl, reader, pipeline, cfg, args, w, finish_in_loader, device)  # noqa: E731
            start = time.perf_counter()
            result = time_row(make, epochs, device, share)
            if budget.limited:
                estimated = estimate_row_s(impl, pipeline, w, n, result["epochs"], costs, cores)
                correction = max(correction, (time.perf_counter() - start) / max(estimated, 1e-6))
            row = {"pipeline": pipeline, "impl": impl, "device": device.type, "workers": w, **result}
            if impl == "loader":
                row["finish"] = "loader" if finish_in_loader else "device"
            elif impl == "dali":
                from scan_dist.data.dali import _threads

                row["finish"], row["dali_threads"] = "device", _threads()
            else:
                row["finish"] = "loader"
            if result["budget_cut"]:
                notes.append(f"{pipeline} {impl} workers={w}: {result['epochs']} of {epochs} timed epochs "
                             "(--budget-s)")
            rows.append(row)
            print(f"  {pipeline} {impl} workers={w}: {row['views_per_s']:.1f} views/s "
                  f"(epoch {row['epoch_s']:.2f} s, wait {row['wait_frac']:.0%})")
        for pipeline in args.pipelines:
            mine = [r for r in rows if r["pipeline"] == pipeline]
            best = max((r["views_per_s"] for r in mine if r["impl"] in BASELINES), default=None)
            for row in mine:
                row["ratio"] = row["views_per_s"] / best if best else None
    finally:
        if own_dir:
            shutil.rmtree(root, ignore_errors=True)

    print()
    if rows:
        print_table(rows, ["pipeline", "impl", "workers", "finish", "views_per_s", "epoch_s", "wait_frac",
                           "epochs", "ratio"])
    for note in notes:
        print("note:", note)
    versions = {}
    for name, module in (("dali", "nvidia.dali"), ("torchvision", "torchvision"), ("pillow", "PIL")):
        try:
            versions[name] = __import__(module, fromlist=["__version__"]).__version__
        except ImportError:
            versions[name] = None
    payload = {
        "environment": {**environment(device), **versions, "cpu_count": os.cpu_count(), "cores_visible": cores},
        "results": rows,
        "config": {"num_images": n, "num_images_asked": args.num_images, "image_size": list(args.image_size),
                   "quality": args.quality, "mean_file_kb": mean_kb, "stored_short_side": reader.resize_size,
                   "out_size": args.out_size, "batch_size": args.batch_size, "workers": workers,
                   "workers_asked": args.workers, "prefetch": args.prefetch, "finish_on": args.finish_on,
                   "torch_threads": torch.get_num_threads(),
                   "impls": args.impls, "baselines": list(BASELINES),
                   "pipelines": {p: [list(v) for v in PIPELINES[p]] for p in args.pipelines},
                   "epochs": epochs, "epochs_asked": args.epochs, "warmup_epochs": 1, "small": args.small,
                   "budget_s": args.budget_s, "elapsed_s": time.perf_counter() - budget.start,
                   "augment": {k: getattr(cfg, k) for k in cfg.__dataclass_fields__},
                   "views_per_s": "augmented views delivered to the consumer (on the device when CUDA) per second, "
                                  "median over whole timed epochs after one warm-up epoch",
                   "wait_frac": "share of an epoch the consumer spent waiting for (and finishing) batches"},
        "notes": notes,
    }
    path = write_results("pipeline", payload, args.out)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
