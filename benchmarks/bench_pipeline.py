"""Benchmark of the JPEG input pipeline: DALI (``scan_dist.data.dali``) vs a torch DataLoader.

Measures augmented views per second, read + decode + augment + (on GPU) delivery on the device, for the two
multi-view pipelines of SCAN:

* ``simclr``   -- two SimCLR views per image (pretext stage);
* ``selflabel`` -- one weak and one strong view per image (self-labelling stage).

Implementations (same host, same files, same batch size; whole epochs timed after a warm-up, median reported):

* ``dali``    -- :func:`scan_dist.data.dali.jpeg_folder_pipeline`: ``fn.readers.file`` + ``fn.decoders.image``
  (nvJPEG, ``"mixed"``, on GPU; CPU decoder otherwise) + the DALI augmentations, ``--threads`` CPU threads, each
  file decoded once for both views.  Runs on the GPU when one is visible, else on the CPU.
* ``tv2``     -- torch ``DataLoader`` with ``--workers`` processes: PIL decode, then torchvision.transforms.v2
  equivalents per view (RandomResizedCrop / flip / ColorJitter / RandomGrayscale for simclr; RandomResizedCrop
  scale>=0.6 + flip for weak; Resize + CenterCrop + flip + RandAugment(num_ops=strong_ops) + RandomErasing as
  Cutout for strong), ToDtype + Normalize.  The classic torchvision recipe.
* ``project`` -- the same DataLoader, but after PIL decode each image is resized (shorter side) and centre-cropped
  to ``--out-size`` (what ``datasets.py`` does at load time) and this project's ``augment.make_transform`` runs on
  it per sample in the worker (a batch of one).

The ``ratio`` column is views/s divided by the best ``tv2``/``project`` row of the same pipeline (> 1: faster).
On the GPU machine the target is ratio >= 1.8 for DALI.  With ``--small`` (200 images of 128x96, ``--workers 2``
recommended) it is a smoke run: CPU DALI timings say nothing about GPU speed.

Files are generated once into a temp folder (or ``--data-dir``, reused when it already holds them): ImageNet-like
500x375 RGB images of multi-octave random texture, JPEG quality ``--quality`` (92 gives ~85 KB per file).

Usage::

    python benchmarks/bench_pipeline.py                        # 2000 images, workers 2 4 8 16
    python benchmarks/bench_pipeline.py --small --workers 2    # CPU smoke run
"""
from __future__ import annotations

import argparse
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

from benchmarks.common import environment, print_table, synchronize, write_results

PIPELINES = {"simclr": ("simclr", "simclr"), "selflabel": ("weak", "strong")}
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
BASELINES = ("tv2", "project")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--small", action="store_true", help="200 images of 128x96, out-size 64, batch 32")
    parser.add_argument("--num-images", type=int, default=None, help="default 2000 (200 with --small)")
    parser.add_argument("--image-size", type=int, nargs=2, default=None, metavar=("W", "H"),
                        help="generated image size (default 500 375; 128 96 with --small)")
    parser.add_argument("--quality", type=int, default=92, help="JPEG quality of the generated files")
    parser.add_argument("--out-size", type=int, default=None, help="view side (default 224; 64 with --small)")
    parser.add_argument("--batch-size", type=int, default=None, help="default 256 (32 with --small)")
    parser.add_argument("--threads", type=int, default=None, help="DALI CPU threads (default: cores, at most 8)")
    parser.add_argument("--workers", type=int, nargs="+", default=None,
                        help="DataLoader worker counts (default 2 4 8 16; 2 with --small)")
    parser.add_argument("--baselines", nargs="+", choices=BASELINES, default=list(BASELINES))
    parser.add_argument("--pipelines", nargs="+", choices=sorted(PIPELINES), default=sorted(PIPELINES))
    parser.add_argument("--no-dali", action="store_true", help="time only the DataLoader baselines")
    parser.add_argument("--epochs", type=int, default=None,
                        help="timed epochs per row, median reported (default 2; 3 with --small)")
    parser.add_argument("--warmup-batches", type=int, default=3, help="untimed batches before the timed epochs")
    parser.add_argument("--data-dir", type=Path, default=None, help="where the JPEGs go (kept; default: a temp dir)")
    parser.add_argument("--out", type=Path, default=None, help="results folder (default benchmarks/results)")
    args = parser.parse_args(argv)
    args.num_images = args.num_images or (200 if args.small else 2000)
    args.image_size = tuple(args.image_size or ((128, 96) if args.small else (500, 375)))
    args.out_size = args.out_size or (64 if args.small else 224)
    args.batch_size = args.batch_size or (32 if args.small else 256)
    args.workers = args.workers or ([2] if args.small else [2, 4, 8, 16])
    args.epochs = args.epochs or (3 if args.small else 2)
    return args


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
    _texture(seed, w, h).save(path, "JPEG", quality=quality)
    return os.path.getsize(path)


def make_jpegs(folder: Path, n: int, size: tuple[int, int], quality: int) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    w, h = size
    tag = f"{w}x{h}q{quality}"
    files = [folder / f"img{i:05d}_{tag}.jpg" for i in range(n)]
    todo = [(str(p), i, w, h, quality) for i, p in enumerate(files) if not p.exists()]
    if todo:
        start = time.perf_counter()
        with ProcessPoolExecutor(max_workers=max(1, min(16, os.cpu_count() or 1))) as pool:
            list(pool.map(_write_jpeg, todo, chunksize=16))
        print(f"wrote {len(todo)} JPEGs ({tag}) to {folder} in {time.perf_counter() - start:.1f} s")
    return [str(p) for p in files]


# --------------------------------------------------------------------------- torch DataLoader baselines


def _tv2_view(kind: str, cfg, out: int):
    from torchvision.transforms import v2

    tail = [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    flip = [v2.RandomHorizontalFlip()] if cfg.flip else []
    if kind == "simclr":
        head = [v2.RandomResizedCrop(out, scale=(cfg.crop_scale_min, 1.0), ratio=cfg.crop_ratio), *flip,
                v2.RandomApply([v2.ColorJitter(cfg.brightness, cfg.contrast, cfg.saturation, cfg.hue)],
                               p=cfg.jitter_prob),
                v2.RandomGrayscale(cfg.grayscale_prob)]
        return v2.Compose(head + tail)
    if kind == "weak":
        head = [v2.RandomResizedCrop(out, scale=(max(cfg.crop_scale_min, 0.6), 1.0), ratio=cfg.crop_ratio), *flip]
        return v2.Compose(head + tail)
    side = round(cfg.cutout_frac * out)
    area = side * side / (out * out)
    head = [v2.Resize(out), v2.CenterCrop(out), *flip, v2.RandAugment(num_ops=cfg.strong_ops)]
    erase = [v2.RandomErasing(p=1.0, scale=(area, area), ratio=(1.0, 1.0), value=0)] if side > 0 else []
    return v2.Compose(head + tail + erase)


class JpegViews(torch.utils.data.Dataset):
    """PIL-decoded JPEGs, several augmented views each: returns ([V, C, out, out] float, index)."""

    def __init__(self, files, kinds, cfg, out: int, baseline: str):
        self.files, self.kinds, self.cfg, self.out, self.baseline = list(files), kinds, cfg, out, baseline
        self._views = None

    def __len__(self) -> int:
        return len(self.files)

    def _build(self):
        if self.baseline == "tv2":
            return [_tv2_view(k, self.cfg, self.out) for k in self.kinds]
        from scan_dist.data.augment import make_transform

        return [make_transform(k, self.cfg, IMAGENET_MEAN, IMAGENET_STD) for k in self.kinds]

    def __getitem__(self, i):
        from PIL import Image

        if self._views is None:  # built lazily, inside the worker
            self._views = self._build()
        with Image.open(self.files[i]) as img:
            img = img.convert("RGB")
            if self.baseline == "tv2":
                views = [view(img) for view in self._views]
            else:
                # datasets.py's load-time geometry: shorter side to out (bilinear, antialiased), centre crop.
                w, h = img.size
                scale = self.out / min(w, h)
                img = img.resize((max(self.out, round(w * scale)), max(self.out, round(h * scale))),
                                 Image.BILINEAR)
                w, h = img.size
                left, top = (w - self.out) // 2, (h - self.out) // 2
                img = img.crop((left, top, left + self.out, top + self.out))
                x = torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1).unsqueeze(0).contiguous()
                views = [view(x)[0] for view in self._views]
        return torch.stack(views), i


def _loader_epochs(files, kinds, cfg, args, baseline: str, workers: int, device: torch.device):
    dataset = JpegViews(files, kinds, cfg, args.out_size, baseline)
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=args.batch_size, shuffle=True, num_workers=workers, drop_last=False,
        pin_memory=device.type == "cuda", persistent_workers=True, prefetch_factor=4,
    )

    def consume(batches):
        n = 0
        for views, index in batches:
            views = views.to(device, non_blocking=True)
            n += views.shape[0] * views.shape[1]
        synchronize(device)
        return n

    it = iter(loader)
    for _ in range(min(args.warmup_batches, len(loader))):
        next(it)
    del it
    return _time_epochs(lambda: consume(loader), args.epochs)


# --------------------------------------------------------------------------- DALI


def _dali_epochs(files, kinds, cfg, args, device: torch.device):
    from scan_dist.data.dali import jpeg_folder_pipeline

    loader = jpeg_folder_pipeline(files, kinds, cfg, IMAGENET_MEAN, IMAGENET_STD, args.out_size, args.batch_size,
                                  device=device, num_threads=args.threads, shuffle=True)

    def consume(batches, limit=None):
        n = 0
        for b, out in enumerate(batches):
            n += out["views"].shape[0]
            if limit is not None and b + 1 >= limit:
                break
        synchronize(device)
        return n

    # Warm-up: one whole epoch (a DALI epoch cannot be abandoned half-way without resetting the iterator).
    consume(loader)
    return _time_epochs(lambda: consume(loader), args.epochs)


def _time_epochs(run_epoch, epochs: int) -> dict:
    rates, times = [], []
    for _ in range(epochs):
        start = time.perf_counter()
        views = run_epoch()
        elapsed = time.perf_counter() - start
        times.append(elapsed)
        rates.append(views / elapsed)
    return {"views_per_s": statistics.median(rates), "epoch_s": statistics.median(times), "views": views,
            "epochs": epochs}


# --------------------------------------------------------------------------- main


def main(argv=None) -> int:
    args = parse_args(argv)
    from scan_dist.data.augment import AugmentConfig
    from scan_dist.data.dali import dali_available

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cfg = AugmentConfig()
    notes = []
    if device.type == "cpu":
        notes.append("CPU run: DALI uses its CPU operators; timings say nothing about GPU speed")
    own_dir = args.data_dir is None
    folder = Path(tempfile.mkdtemp(prefix="bench_pipeline_")) if own_dir else args.data_dir
    try:
        files = make_jpegs(folder, args.num_images, args.image_size, args.quality)
        mean_kb = statistics.fmean(os.path.getsize(f) for f in files) / 1e3
        print(f"{len(files)} JPEGs, {args.image_size[0]}x{args.image_size[1]}, mean {mean_kb:.1f} KB; "
              f"views {args.out_size}x{args.out_size}, batch {args.batch_size}, device {device.type}")
        dali_ok = dali_available() and not args.no_dali
        if not dali_ok:
            notes.append("dali skipped: " + ("--no-dali" if args.no_dali else "NVIDIA DALI not installed"))
        threads = args.threads
        if threads is None:
            from scan_dist.data.dali import _default_threads

            threads = _default_threads()
        rows = []
        for name in args.pipelines:
            kinds = PIPELINES[name]
            pipe_rows = []
            for baseline in args.baselines:
                for workers in args.workers:
                    row = {"pipeline": name, "impl": baseline, "device": device.type, "workers": workers}
                    row.update(_loader_epochs(files, kinds, cfg, args, baseline, workers, device))
                    pipe_rows.append(row)
                    print(f"  {name} {baseline} workers={workers}: {row['views_per_s']:.1f} views/s")
            if dali_ok:
                row = {"pipeline": name, "impl": "dali", "device": device.type, "threads": threads}
                row.update(_dali_epochs(files, kinds, cfg, args, device))
                pipe_rows.append(row)
                print(f"  {name} dali threads={threads}: {row['views_per_s']:.1f} views/s")
            best = max((r["views_per_s"] for r in pipe_rows if r["impl"] in BASELINES), default=None)
            for row in pipe_rows:
                row["ratio_vs_best_torchvision"] = row["views_per_s"] / best if best else None
            rows.extend(pipe_rows)
    finally:
        if own_dir:
            shutil.rmtree(folder, ignore_errors=True)

    print()
    print_table(rows, ["pipeline", "impl", "device", "workers", "threads", "views_per_s", "epoch_s",
                       "ratio_vs_best_torchvision"])
    for note in notes:
        print("note:", note)
    try:
        import nvidia.dali

        dali_version = nvidia.dali.__version__
    except ImportError:
        dali_version = None
    try:
        import torchvision

        tv_version = torchvision.__version__
    except ImportError:
        tv_version = None
    payload = {
        "environment": {**environment(device), "dali": dali_version, "torchvision": tv_version,
                        "cpu_count": os.cpu_count()},
        "results": rows,
        "config": {"num_images": args.num_images, "image_size": list(args.image_size), "quality": args.quality,
                   "mean_file_kb": mean_kb, "out_size": args.out_size, "batch_size": args.batch_size,
                   "threads": threads, "workers": args.workers, "baselines": args.baselines,
                   "pipelines": {p: list(PIPELINES[p]) for p in args.pipelines}, "epochs": args.epochs,
                   "warmup_batches": args.warmup_batches, "small": args.small,
                   "augment": {k: getattr(cfg, k) for k in cfg.__dataclass_fields__},
                   "views_per_s": "augmented views delivered (on the device when CUDA) per second, one epoch"},
        "notes": notes,
    }
    path = write_results("pipeline", payload, args.out)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
