"""NVIDIA DALI executor of the views' base phase (data.backend=dali).

The views are decided where they are on the torch path: DataLoader workers run `BatchBuilder` (read or decode
the images, draw every sample's parameters from the counter-based streams of sampling.py) with its base phase
switched off, so a batch arrives holding the stored images and, per view, each sample's *source map* -- the
2x3 affine map from output to stored pixels that is that view's base phase (`ViewTransform.source_map`: the
random resized crop with flip and translation, or the eval/strong crop). DALI executes the maps with one
`fn.warp_affine` per view (bilinear; border repeat, or 0 outside the image for weak translation) on the GPU
(CPU operators without CUDA, as in the tests), and the float phase (`ViewTransform.finish`: colour jitter,
blur, RandAugment, cutout, normalisation) runs on the device as on the torch path. Hence both backends, any
number of ranks and workers, and a resumed run produce the same views: bit-identical crops of eval/strong
views and weak/simclr crops that differ only where DALI's bilinear weights round differently (at most a few
grey levels on a few pixels, see tests/test_dali.py).

Asynchrony: the CPU half (decode, parameters) runs ahead in the DataLoader workers; DALI runs with
`exec_async`/`exec_pipelined` and `data.prefetch` iterations in flight -- the next batch is fed and scheduled
before the current one is handed to the training step.

Not here yet: GPU JPEG decoding (nvJPEG through `fn.decoders.image(device="mixed")`). The workers decode
with PIL at the reader's resize (shorter side 256 for 224 crops); feeding encoded bytes instead needs the
same resize on the GPU before the warp, see the README's DALI paragraph.
"""
from __future__ import annotations

import time
from collections import deque
from types import SimpleNamespace
from typing import Iterator

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Sampler

from ..errors import ConfigError
from .loaders import BatchBuilder, BatchSource, LoaderSettings, Request, usable_cpus

__all__ = ["BACKENDS", "DALI_MISSING", "dali_available", "resolve_backend", "DaliBatchSource"]

BACKENDS = ("auto", "torchvision", "dali")
DALI_MISSING = ("data.backend=dali needs NVIDIA DALI: pip install -e .[dali] (nvidia-dali-cuda130), "
                "or use data.backend=torchvision")


def _dali() -> SimpleNamespace:
    """Import DALI or raise the one-line ConfigError."""
    try:
        import nvidia.dali.fn as fn
        import nvidia.dali.types as types
        from nvidia.dali import pipeline_def
    except (ImportError, OSError) as exc:  # OSError: a wheel whose native libraries fail to load
        raise ConfigError(DALI_MISSING) from exc
    return SimpleNamespace(fn=fn, types=types, pipeline_def=pipeline_def)


def dali_available() -> bool:
    """True when NVIDIA DALI imports."""
    try:
        _dali()
    except ConfigError:
        return False
    return True


def resolve_backend(name: str, device: torch.device | str) -> str:
    """data.backend (auto|torchvision|dali) -> "torchvision" or "dali".

    auto picks DALI only when it is installed and the device is CUDA (on a CPU the torch executor is faster);
    dali insists (ConfigError without DALI).
    """
    if name not in BACKENDS:
        raise ConfigError(f"data.backend must be one of {', '.join(BACKENDS)}, got {name!r}")
    if name == "torchvision":
        return "torchvision"
    if name == "dali":
        _dali()
        return "dali"
    return "dali" if torch.device(device).type == "cuda" and dali_available() else "torchvision"


def _threads() -> int:
    return max(1, min(4, usable_cpus()))


class DaliBatchSource(BatchSource):
    """`BatchSource` whose base phase DALI executes; same batches, same `epoch`/`build_now`/`close`/`wait_s`."""

    def __init__(self, builder: BatchBuilder, sampler: Sampler, settings: LoaderSettings):
        self._dali = _dali()
        builder.execute_base = False
        super().__init__(builder, sampler, settings)
        self.depth = max(1, settings.prefetch)
        self.rows = sorted({spec.rows for spec in builder.specs})
        self._pipe = None
        self._max_batch = 0
        self._pending = 0  # iterations scheduled and not yet read back

    def __iter__(self) -> Iterator[dict]:
        self._drain()
        iterator = iter(self.loader)
        in_flight: deque = deque()

        def take(count: int) -> list[dict]:
            raws = []
            for raw in iterator:
                self.check(raw)
                raws.append(raw)
                if len(raws) == count:
                    break
            return raws

        start = time.perf_counter()
        in_flight.extend(self._submit(take(self.depth)))
        while in_flight:
            bases = self._outputs()
            raw = in_flight.popleft()
            in_flight.extend(self._submit(take(1)))  # fed and scheduled before this batch goes to the step
            batch = self._finish(raw, bases)
            self.wait_s += time.perf_counter() - start
            yield batch
            start = time.perf_counter()

    def build_now(self, indices: np.ndarray, epoch: int = 0) -> dict:
        self._drain()
        raw = self.builder[Request(epoch, 0, np.asarray(indices, dtype=np.int64))]
        self.check(raw)
        self._submit([raw])
        return self._finish(raw, self._outputs())

    def close(self) -> None:
        super().close()
        self._pipe, self._pending = None, 0

    # ---- DALI ----------------------------------------------------------------------------------------------

    def _drain(self) -> None:
        """Read back and drop iterations an abandoned epoch left scheduled (a consumer that stopped early)."""
        while self._pending:
            self._pipe.outputs()
            self._pending -= 1

    def _submit(self, raws: list[dict]) -> list[dict]:
        """Feed these batches to DALI and schedule their runs."""
        if not raws:
            return raws
        largest = max(max(len(raw["index"]) for raw in raws), getattr(self.sampler, "batch", 0))
        if self._pipe is not None and largest > self._max_batch:
            if self._pending:
                raise RuntimeError(f"DALI pipeline built for batches of {self._max_batch}, got {largest}")
            self._pipe = None  # nothing in flight: rebuild for the larger batch
        self._pending += len(raws)
        if self._pipe is None:
            # DALI's first scheduled run executes `prefetch_queue_depth` iterations: build it for the batches at hand.
            self._build(largest, depth=len(raws))
            for raw in raws:
                self._feed(raw)
            self._pipe.schedule_run()
            return raws
        for raw in raws:
            self._feed(raw)
            self._pipe.schedule_run()
        return raws

    def _build(self, batch_size: int, depth: int) -> None:
        d, specs, rows = self._dali, self.builder.specs, self.rows
        transforms = self.builder.transforms
        on_gpu = self.settings.device.type == "cuda"

        @d.pipeline_def
        def graph():
            images = {name: d.fn.external_source(name=f"images_{name}", layout="HWC", dtype=d.types.UINT8)
                      for name in rows}
            if on_gpu:
                images = {name: node.gpu() for name, node in images.items()}
            outputs = []
            for i, spec in enumerate(specs):
                transform = transforms[spec.kind]
                maps = d.fn.external_source(name=f"map_{i}", dtype=d.types.FLOAT)
                fill = {"fill_value": 0.0} if transform.fills_outside else {}
                size = transform.out_size
                outputs.append(d.fn.warp_affine(images[spec.rows], matrix=maps, size=[size, size],
                                                interp_type=d.types.INTERP_LINEAR, inverse_map=True, **fill))
            return tuple(outputs)

        device = self.settings.device
        device_id = (device.index if device.index is not None else torch.cuda.current_device()) if on_gpu else None
        # Every draw was made before DALI sees the batch: the seed only feeds operators this graph never uses.
        self._pipe = graph(batch_size=batch_size, num_threads=_threads(), device_id=device_id, seed=0,
                           prefetch_queue_depth=depth, exec_async=True, exec_pipelined=True)
        self._pipe.build()
        self._max_batch = batch_size

    def _feed(self, raw: dict) -> None:
        pipe = self._pipe
        for name in self.rows:
            stored = raw["stored"][name]
            if isinstance(stored, Tensor):
                pipe.feed_input(f"images_{name}", stored.numpy(), layout="HWC")
            else:
                pipe.feed_input(f"images_{name}", [img.numpy() for img in stored], layout="HWC")
        for i, maps in enumerate(raw["maps"]):
            pipe.feed_input(f"map_{i}", maps.numpy())

    def _outputs(self) -> list[Tensor]:
        """The oldest scheduled iteration's base views: uint8 NCHW tensors on the device."""
        outputs = self._pipe.outputs()
        self._pending -= 1
        device = self.settings.device
        bases = []
        for out in outputs:
            if device.type == "cuda":
                from nvidia.dali.plugin.pytorch import feed_ndarray

                dense = out.as_tensor()
                result = torch.empty(dense.shape(), dtype=torch.uint8, device=device)
                feed_ndarray(dense, result, cuda_stream=torch.cuda.current_stream(device))
            else:
                result = torch.from_numpy(np.array(out.as_tensor(), copy=True))  # DALI reuses its buffers
            bases.append(result.permute(0, 3, 1, 2).contiguous())
        return bases

    def _finish(self, raw: dict, bases: list[Tensor]) -> dict:
        """The torch path's consumer side (skip counts, the float phase, memory format) on DALI's base views."""
        batch = {key: value for key, value in raw.items() if key not in ("stored", "maps")}
        return self.finish({**batch, "views": bases})
