"""The run context handed to every stage: config, run folder, device, logger, and the datasets loaded once."""
from __future__ import annotations

import logging
from functools import cached_property
from pathlib import Path

import torch

from .config import Config
from .data import augment
from .data.datasets import ImageSet, open_dataset
from .dist import comm
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

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that writes artifacts, markers and reports."""
        return comm.is_main()

    def engine(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None):
        """Wrap a model and its optimizer for dist.backend (none | ddp | deepspeed): the stages' only door to it."""
        from .dist.engine import Engine  # DeepSpeed is imported only when a run asks for it

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
            raise DataError(
                f"data.path {shown} does not exist; preset {self.cfg.name!r} expects {data.format} data there: "
                f"{LAYOUT_HINTS.get(data.format, LAYOUT_HINTS['auto'])}"
            )

    def _open(self, split: str) -> ImageSet:
        data = self.cfg.data
        self.check_data_path()
        limit = data.max_images if split == "train" else data.max_eval_images
        imageset = open_dataset(
            data.path, split, fmt=data.format, image_size=data.image_size, channels=data.channels,
            subset=data.subset, on_bad_image=data.on_bad_image, include_unlabeled=data.include_unlabeled,
            max_images=limit, seed=self.cfg.run.seed, num_threads=data.num_threads, progress=self.cfg.run.progress,
        )
        if imageset.skipped:
            self.log.warning("%s: skipped %d unreadable image(s), first: %s", split, len(imageset.skipped),
                             imageset.skipped[0])
        self.log.info("%s data: %s, %d images of %s", split, imageset.source, len(imageset),
                      "x".join(map(str, imageset.images.shape[1:])))
        return imageset

    @cached_property
    def train_set(self) -> ImageSet:
        imageset = self._open("train")
        if self.cfg.num_clusters > len(imageset):
            raise DataError(f"num_clusters={self.cfg.num_clusters} is larger than the {len(imageset)} training images")
        return imageset

    @cached_property
    def eval_set(self) -> ImageSet:
        return self._open("eval")

    @cached_property
    def channels(self) -> int:
        return int(self.train_set.images.shape[1])

    @cached_property
    def pixel_shape(self) -> tuple[int, int, int]:
        return tuple(int(d) for d in self.train_set.images.shape[1:])

    @cached_property
    def pca_dims(self) -> int:
        """mine.pca_dims, capped by the pixel count and the number of training images (tiny data sets)."""
        channels, height, width = self.pixel_shape
        return min(self.cfg.mine.pca_dims, channels * height * width, len(self.train_set))

    @cached_property
    def normalization(self) -> tuple[list[float], list[float]]:
        """Per-channel mean/std: from the config, or measured on (up to 10k of) the training images."""
        data = self.cfg.data
        if data.mean is not None and data.std is not None:
            return list(data.mean), list(data.std)
        images = self.train_set.images[:10000].float() / 255.0
        mean = images.mean(dim=(0, 2, 3)).tolist()
        std = images.std(dim=(0, 2, 3)).clamp_min(1e-3).tolist()
        return mean, std

    @cached_property
    def augment_backend(self) -> str:
        """data.backend resolved for this device: "torchvision" (batched torch ops) or "dali"."""
        from .data import dali

        backend = dali.resolve_backend(self.cfg.data.backend, self.device)
        if backend == "dali":
            self.log.info("augmentations: NVIDIA DALI (per-sample randomness is DALI's: N processes and a resumed "
                          "run see other views than one uninterrupted process)")
        return backend

    def transform(self, kind: str):
        """A batched augmentation (uint8 [B,C,S,S] -> normalised float on the device) of the given kind."""
        if self.augment_backend != "dali":
            return self.torch_transform(kind)
        from .data import dali

        mean, std = self.normalization
        base = dali.make_dali_transform(kind, self.cfg.augment, mean, std, device=self.device)
        memory_format = self.memory_format

        def apply_dali(batch_uint8: torch.Tensor) -> torch.Tensor:
            # DALI takes host arrays and returns the batch on the device already.
            return base(batch_uint8.cpu()).contiguous(memory_format=memory_format)

        return apply_dali

    def torch_transform(self, kind: str):
        """`transform(kind)` with this project's batched torch augmentations whatever `data.backend` says (their
        randomness is torch's, so it can be seeded: the feature cache needs that)."""
        mean, std = self.normalization
        base = augment.make_transform(kind, self.cfg.augment, mean, std)
        memory_format = self.memory_format

        def apply(batch_uint8: torch.Tensor) -> torch.Tensor:
            return base(batch_uint8.to(self.device, non_blocking=True)).contiguous(memory_format=memory_format)

        return apply

    @property
    def memory_format(self) -> torch.memory_format:
        """Of the batches the transforms return (model.channels_last)."""
        return torch.channels_last if self.cfg.model.channels_last else torch.contiguous_format

    def prepare_model(self, model: torch.nn.Module) -> torch.nn.Module:
        model = model.to(self.device)
        if self.cfg.model.channels_last:
            model = model.to(memory_format=torch.channels_last)
        return model


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise DataError("run.device=cuda but no CUDA device is visible; use run.device=cpu or auto")
    return torch.device(name)
