"""The run context handed to every stage: config, run folder, device, logger, the dataset readers and loaders."""
from __future__ import annotations

import logging
from functools import cached_property
from pathlib import Path

import torch

import numpy as np

from .config import Config, load_config
from .data.formats import FILE_FORMATS, Reader, detect_format, list_files, open_dataset
from .data.formats.common import existing_dir
from .data.loaders import (BatchBuilder, BatchSource, EpochRequests, LoaderSettings, Partners, RangeRequests, Request,
                           ViewSpec, usable_cpus)
from .data.transforms import ViewTransform
from .distributed import comm
from .errors import DataError

# What each format expects at data.path, for the message when the data is missing.
LAYOUT_HINTS = {
    "idx": "train-images-idx3-ubyte[.gz], train-labels-idx1-ubyte[.gz], t10k-images-idx3-ubyte[.gz], "
           "t10k-labels-idx1-ubyte[.gz] (Fashion-MNIST: apt-get install dataset-fashion-mnist)",
    "cifar10": "cifar-10-batches-py/ (data_batch_1..5, test_batch) from the CIFAR-10 python release",
    "cifar100": "cifar-100-python/ (train, test) from the CIFAR-100 python release",
    "cifar20": "cifar-100-python/ (train, test) from the CIFAR-100 python release",
    "stl10": "stl10_binary/ (train_X.bin, train_y.bin, test_X.bin, test_y.bin, unlabeled_X.bin)",
    "imagenet": "train/<wnid>/*.JPEG and val/<wnid>/*.JPEG (or a flat val/ with LOC_val_solution.csv)",
    "imagefolder": "<class>/<image> folders (optionally under train/ and val/ or test/)",
    "flat": "a folder of images (png/jpg), any size",
    "auto": "one of the supported layouts (see README, 'Data')",
}


class RunContext:
    def __init__(self, cfg: Config, run_dir: Path, logger: logging.Logger, env=None):
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.log = logger
        self.env = env  # dist.env.DistEnv of this process, or None for a plain single process
        self.device = env.device if env is not None else resolve_device(cfg.run.device)
        self.stage_stats: dict[str, dict] = {}  # per stage: data wait, skipped images (merged into DONE markers)
        self.skipped: dict[str, set[int]] = {"train": set(), "eval": set()}  # unreadable images met (on_bad_image=skip)

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that writes artifacts, markers and reports."""
        return comm.is_main()

    def engine(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None):
        """Wrap a model and its optimizer for dist.backend (none | ddp | deepspeed): the stages' only door to it."""
        from .distributed.engine import Engine  # DeepSpeed is imported only when a run asks for it

        return Engine(model, optimizer, self.cfg.dist, self.env)

    def stage_dir(self, name: str) -> Path:
        path = self.run_dir / name
        path.mkdir(parents=True, exist_ok=True)
        return path

    def check_data_path(self) -> None:
        """Fail at once, before any work, when the dataset folder is missing."""
        data = self.cfg.data
        if not data.path or not Path(data.path).exists():
            shown = data.path or "(empty)"
            fmt = data.format if data.format != "auto" else preset_format(self.cfg.name) or "auto"
            raise DataError(
                f"data.path {shown} does not exist; preset {self.cfg.name!r} expects {fmt} data there: "
                f"{LAYOUT_HINTS.get(fmt, LAYOUT_HINTS['auto'])}"
            )

    def _open(self, split: str) -> Reader:
        data = self.cfg.data
        self.check_data_path()
        fmt = data.format if data.format != "auto" else detect_format(data.path)
        if data.format == "auto" and split == "train":
            self.log.info("data.format=auto: %s detected at %s", fmt, data.path)
        limit = data.max_images if split == "train" else data.max_eval_images
        listing = None
        if fmt in FILE_FORMATS:  # rank 0 walks the folder once; the others get its listing
            listing = comm.broadcast_object(
                list_files(existing_dir(data.path), split, fmt, data.subset, limit, self.cfg.run.seed)
                if comm.is_main() else None)
        reader = open_dataset(
            data.path, split, fmt=fmt, image_size=data.image_size, resize_size=data.resize_size,
            channels=data.channels, subset=data.subset, on_bad_image=data.on_bad_image,
            include_unlabeled=data.include_unlabeled, max_images=limit, seed=self.cfg.run.seed,
            cache_dir=data.cache_dir, listing=listing, log=self.log,
        )
        stored = "x".join(map(str, reader.stored_hw())) if reader.fixed_size else \
            f"shorter side {reader.resize_size}, any aspect"
        self.log.info("%s data: %s, %d images, %d channel(s), stored %s, network input %d", split, reader.source,
                      len(reader), reader.channels, stored, reader.image_size)
        return reader

    @cached_property
    def train_set(self) -> Reader:
        reader = self._open("train")
        if self.cfg.num_clusters > len(reader):
            raise DataError(f"num_clusters={self.cfg.num_clusters} is larger than the {len(reader)} training images")
        return reader

    @cached_property
    def eval_set(self) -> Reader:
        return self._open("eval")

    def reader(self, split: str) -> Reader:
        return self.train_set if split == "train" else self.eval_set

    @cached_property
    def channels(self) -> int:
        return self.train_set.channels

    @cached_property
    def pixel_shape(self) -> tuple[int, int, int]:
        """(C, S, S) of the network's input."""
        side = self.train_set.image_size
        return self.channels, side, side

    @cached_property
    def pca_dims(self) -> int:
        """mine.pca_dims, capped by the pixel count and the number of training images (tiny data sets)."""
        channels, height, width = self.pixel_shape
        return min(self.cfg.mine.pca_dims, channels * height * width, len(self.train_set))

    @cached_property
    def normalization(self) -> tuple[list[float], list[float]]:
        """Per-channel mean/std: from the config, or measured on evenly spaced training images (their evaluation
        crops): up to 10,000 of a memory-mapped array, up to 256 decoded files."""
        data = self.cfg.data
        if data.mean is not None and data.std is not None:
            return list(data.mean), list(data.std)
        reader = self.train_set
        count = min(len(reader), 10000 if reader.fixed_size else 256)
        picks = np.unique(np.linspace(0, len(reader) - 1, num=count).astype(np.int64))
        images = torch.cat([self.eval_images("train", picks[i:i + 1024]).float() / 255
                            for i in range(0, len(picks), 1024)])
        mean = images.mean(dim=(0, 2, 3)).tolist()
        std = images.std(dim=(0, 2, 3)).clamp_min(1e-3).tolist()
        return mean, std

    @cached_property
    def augment_backend(self) -> str:
        """data.backend resolved for this device: "torchvision" (this project's torch ops) or "dali"."""
        from .data import dali

        backend = dali.resolve_backend(self.cfg.data.backend, self.device)
        if backend == "dali":
            self.log.info("augmentations: NVIDIA DALI, executing the same per-sample parameters as the torch path")
        return backend

    def view_transform(self, kind: str) -> ViewTransform:
        """The view `kind` at the network's input size, normalised with this run's statistics."""
        mean, std = self.normalization
        return ViewTransform(kind, self.cfg.augment, mean, std, self.train_set.image_size)

    @cached_property
    def eval_batch_size(self) -> int:
        """run.eval_batch_size, or by input size: 1024 images of 32 px (scaled by pixel count, at least 32) on a
        CPU, 8 times that on CUDA."""
        if self.cfg.run.eval_batch_size is not None:
            return self.cfg.run.eval_batch_size
        side = self.train_set.image_size
        batch = max(32, min(1024, int(1024 * (32 / side) ** 2)))
        return batch * (8 if self.device.type == "cuda" else 1)

    @cached_property
    def loader_settings(self) -> LoaderSettings:
        data = self.cfg.data
        workers = data.workers
        if workers is None:
            if self.device.type == "cuda":
                workers = min(8, max(1, usable_cpus() // 2))
            elif self.train_set.fixed_size:
                # CPU, memory-mapped arrays: building a batch is cheap, and a worker beside the training threads
                # costs more than it saves (the demo's pretext: 688 img/s with 1 worker, 938 with 0, 2 cores).
                workers = 0
            else:
                workers = max(1, usable_cpus() // 4)  # CPU, decoded files: decoding is worth a process
        return LoaderSettings(workers=workers, prefetch=data.prefetch, pin_memory=self.device.type == "cuda",
                              device=self.device, memory_format=self.memory_format)

    @property
    def finish_in_loader(self) -> bool:
        """Run the float phase of augmentation in the loader (CPU runs) or on the device (CUDA runs)."""
        finish_on = self.cfg.data.finish_on
        if finish_on == "auto":
            return self.device.type != "cuda"
        return finish_on == "loader"

    def batches(self, split: str, specs: list[ViewSpec], batch_size: int, stream: str,
                partners: Partners | None = None):
        """Training batches of `split`: an epoch-by-epoch source of this rank's slices of the global batches."""
        reader = self.reader(split)
        sampler = EpochRequests(len(reader), batch_size, self.cfg.run.seed, stream, comm.rank(), comm.world_size())
        return self._source(reader, specs, sampler, partners)

    def inference_batches(self, split: str, specs: list[ViewSpec] | None = None, start: int | None = None,
                          stop: int | None = None):
        """Batches of rows [start, stop) (default: this rank's shard), in order, in the given views (default: the
        un-augmented eval view)."""
        reader = self.reader(split)
        if start is None:
            start, stop = comm.shard_range(len(reader))
        sampler = RangeRequests(start, stop, self.eval_batch_size)
        return self._source(reader, specs or [ViewSpec("eval")], sampler, None)

    def report_skips(self, stage: str, split: str, bad: list[int]) -> None:
        """Collect the unreadable images a stage met on every rank (data.on_bad_image=skip), log them once, keep
        them in the stage's metrics and in `self.skipped` (evaluate leaves them out of the results)."""
        met = sorted({index for part in comm.all_gather_object(sorted(set(bad))) for index in part})
        if not met:
            return
        new = [i for i in met if i not in self.skipped[split]]
        self.skipped[split].update(met)
        reader = self.reader(split)
        names = [reader.names[i].decode() if reader.names is not None else str(i) for i in met]
        self.stage_stats.setdefault(stage, {}).update(skipped_images=len(met), skipped_first=names[:20])
        if new:
            self.log.warning("%s: skipped %d unreadable image(s), first: %s (data.on_bad_image=skip: a black image "
                             "stands in for training, and evaluation leaves them out)", stage, len(met), names[0])

    def eval_images(self, split: str, indices) -> torch.Tensor:
        """uint8 [B, C, S, S]: the un-augmented network-size crops of these images (plots, baselines), in this
        process. Unreadable files come back black whatever data.on_bad_image says (they were met, or skipped,
        during training)."""
        reader = self.reader(split)
        view = ViewTransform("eval", self.cfg.augment, [0.0] * reader.channels, [1.0] * reader.channels,
                             reader.image_size)
        builder = BatchBuilder(reader, [ViewSpec("eval")], {"eval": view}, self.cfg.run.seed, False, "skip")
        return builder.build(Request(0, 0, np.asarray(indices, dtype=np.int64)))["views"][0]

    def _source(self, reader, specs, sampler, partners):
        transforms = {spec.kind: self.view_transform(spec.kind) for spec in specs}
        builder = BatchBuilder(reader, specs, transforms, self.cfg.run.seed, self.finish_in_loader,
                               self.cfg.data.on_bad_image, partners)
        if self.augment_backend == "dali":
            from .data import dali

            return dali.DaliBatchSource(builder, sampler, self.loader_settings)
        return BatchSource(builder, sampler, self.loader_settings)

    @property
    def memory_format(self) -> torch.memory_format:
        """Of the batches the transforms return (model.channels_last)."""
        return torch.channels_last if self.cfg.model.channels_last else torch.contiguous_format

    def prepare_model(self, model: torch.nn.Module) -> torch.nn.Module:
        model = model.to(self.device)
        if self.cfg.model.channels_last:
            model = model.to(memory_format=torch.channels_last)
        return model


def preset_format(name: str) -> str | None:
    """The data.format a preset declares (the hint for a missing folder when data.path was overridden)."""
    try:
        return load_config(name).data.format
    except Exception:  # not a preset (a YAML file) or an unreadable one: no hint
        return None


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise DataError("run.device=cuda but no CUDA device is visible; use run.device=cpu or auto")
    return torch.device(name)
