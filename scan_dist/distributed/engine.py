"""The one training engine: a plain module, DistributedDataParallel or DeepSpeed behind one API.

No other module imports DDP or DeepSpeed; stages call `Engine.forward/backward/step/state_dict`, `all_gather`,
`all_reduce`, `barrier` and read `is_main`, `process_group`.

Backends (`cfg_dist.backend`):

* ``none``: the module on `env.device`; a world size above 1 is a ConfigError (each rank would train alone).
* ``ddp``: DistributedDataParallel (gloo on CPU, nccl on CUDA). With world size 1 the module is *not* wrapped (and
  no process group is needed): the single process trains exactly as ``none``.
  `sync_batchnorm` (default True; ddp and deepspeed) converts BatchNorm layers when the world size is above 1,
  in place (parameters and buffers stay the same objects, state-dict keys unchanged): on CUDA to
  `torch.nn.SyncBatchNorm`; on CPU to `CpuSyncBatchNorm` below, because torch's SyncBatchNorm refuses CPU tensors
  (checked on torch 2.14: "SyncBatchNorm expected input tensor to be on GPU or XPU", and the CPU build lacks its
  `batch_norm_stats` kernels). `CpuSyncBatchNorm` computes the global-batch mean and variance with two
  differentiable all-reduces, so training matches one process on the global batch (the tests check 1e-5).
* ``deepspeed``: `deepspeed.initialize` with a config generated from `cfg_dist` (never a user JSON):
  train_micro_batch_size_per_gpu 1 (DeepSpeed needs one; we never give it a data loader), gradient accumulation,
  ZeRO stage 0/1/2, precision, gradient clipping (0 unless `cfg_dist.grad_clip` > 0: DeepSpeed's own default
  would be 1.0) and the caller's torch optimizer (`zero_allow_untested_optimizer`). With world size 1 a one-process
  group (an in-memory store, no port) is made because DeepSpeed needs torch.distributed.
  bf16/fp16 use DeepSpeed's ``torch_autocast`` section (weights, gradients, their reduction and the optimizer stay
  fp32; DeepSpeed's forward runs under torch.autocast; fp16 adds a GradScaler, which this engine saves since
  DeepSpeed's checkpoints do not), not the ``bf16``/``fp16`` sections: those cast the module's *parameters* to
  bf16 but keep BatchNorm's running statistics fp32, and BatchNorm then fails ("expected scalar type BFloat16 but
  found Float", DeepSpeed 0.19.8 on CPU); they also reject fp16 on CPU. So every backend has the same mixed precision.
  On CPU, DeepSpeed 0.19 compiles a shared-memory all-reduce op (`deepspeed_shm_comm`, ~35-50 s with g++, cached
  in ~/.cache/torch_extensions) at its first `init_distributed`. That op only serves DeepSpeed's inference/tensor-
  parallel all-reduce, never training, so this engine marks it unavailable before DeepSpeed's comm backend starts
  and nothing is compiled (DeepSpeed init then takes about 1 s). Set ``SCAN_DIST_DS_SHM_COMM=1`` to let DeepSpeed
  build/use it anyway (or pre-build it with ``DS_BUILD_SHM_COMM=1 DS_ACCELERATOR=cpu pip install deepspeed``).
  `DS_ACCELERATOR` defaults to ``cpu`` when the engine's device is the CPU.

Gradient semantics: DDP and DeepSpeed *average* gradients over ranks. So a loss that is the mean over the local
batch gives the gradient of the global-batch mean (equal local batch sizes), exactly as one process on the global
batch; a loss computed from `all_gather(..., grad=True)` rows whose per-rank values average to the global loss (e.g.
NT-Xent with each rank scoring its own anchors against all gathered candidates) also needs no scale, because the
gather's backward sums the gradients of every rank's copy; a loss that is already the *global* loss on every rank,
built with the one differentiable cross-rank sum (`kernels/_collectives.py::all_reduce_sum`, whose backward sums:
the SCAN loss with `process_group`), also needs no scale; a loss that is a rank's *share* of the global loss (the
self-labelling cross-entropy with global class counts) is passed with ``backward(loss, scale=world_size)``.
Gradient accumulation divides by `grad_accum_steps`, so k micro-batches
of size b equal one batch of size k*b.

Precision: bf16/fp16 run `forward` under `torch.autocast(env.device.type)` (DeepSpeed: its own autocast, same
dtype); fp16 scales the loss with a torch GradScaler (ours for none/ddp, DeepSpeed's for deepspeed). Gradient
clipping (`cfg_dist.grad_clip` > 0) clips the global gradient norm after unscaling, on the accumulation boundary.
"""
from __future__ import annotations

import contextlib
import copy
import datetime
import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ..errors import ConfigError
from ..kernels._collectives import all_reduce_sum
from .env import DistEnv, detect, export_environ, init_process_group

log = logging.getLogger(__name__)

BACKENDS = ("none", "ddp", "deepspeed")
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
META_FILE = "scan_dist_meta.json"
_REDUCE_OPS = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}


# --------------------------------------------------------------------------- #
# Differentiable collectives (torch.distributed.nn.functional is deprecated from torch 2.14 on)
# --------------------------------------------------------------------------- #
class _AllGatherRows(torch.autograd.Function):
    """All ranks' rows concatenated in rank order; backward sums the gradients every rank computed for this rank's
    rows (reduce-scatter on nccl; all-reduce and a slice elsewhere: gloo has no reduce-scatter)."""

    @staticmethod
    def forward(ctx, tensor: Tensor, group) -> Tensor:  # type: ignore[override]
        ctx.group = group
        ctx.rows = tensor.shape[0]
        tensor = tensor.contiguous()
        parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, tensor, group=group)
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        grad = grad.contiguous()
        if dist.get_backend(ctx.group) == "nccl":
            out = torch.empty((ctx.rows,) + tuple(grad.shape[1:]), dtype=grad.dtype, device=grad.device)
            dist.reduce_scatter_tensor(out, grad, op=dist.ReduceOp.SUM, group=ctx.group)
            return out, None
        grad = grad.clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        start = dist.get_rank(ctx.group) * ctx.rows
        return grad[start:start + ctx.rows], None


# --------------------------------------------------------------------------- #
# SyncBatchNorm for CPU (gloo)
# --------------------------------------------------------------------------- #
class CpuSyncBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm over the global batch for CPU process groups, where torch.nn.SyncBatchNorm refuses to run.

    Training: per channel, sum and count are all-reduced (mean), then the sum of squared deviations (biased
    variance), both with a differentiable all-reduce whose backward sums the gradients of all ranks: with DDP's
    average this is the gradient of one process on the global batch. Running statistics use the
    unbiased global variance, as BatchNorm does. Evaluation, or no group of more than one rank: plain BatchNorm.
    The parameter and buffer names equal BatchNorm's, so state dicts are interchangeable.
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1, affine: bool = True,
                 track_running_stats: bool = True, process_group=None, device=None, dtype=None):
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device=device, dtype=dtype)
        self.process_group = process_group

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def forward(self, input: Tensor) -> Tensor:
        self._check_input_dim(input)
        group = self.process_group or (dist.group.WORLD if dist.is_available() and dist.is_initialized() else None)
        if not self.training or group is None or dist.get_world_size(group) == 1:
            return super().forward(input)
        channels = input.shape[1]
        dims = [0] + list(range(2, input.dim()))
        shape = [1, channels] + [1] * (input.dim() - 2)
        x = input.float()
        count = torch.tensor([float(input.numel() // channels)], dtype=torch.float32, device=input.device)
        totals = all_reduce_sum(torch.cat([x.sum(dims), count]), group)
        n = totals[-1].detach()  # a count: no gradient
        if float(n) <= 1:
            raise ValueError(f"Expected more than 1 value per channel when training, got {int(n)} in the global batch")
        mean = totals[:-1] / n
        centered = x - mean.view(shape)
        var = all_reduce_sum((centered * centered).sum(dims), group) / n
        out = centered * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            out = out * self.weight.float().view(shape) + self.bias.float().view(shape)
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
                self.running_mean.mul_(1 - factor).add_(mean.detach().to(self.running_mean.dtype), alpha=factor)
                unbiased = var.detach() * (n / (n - 1))
                self.running_var.mul_(1 - factor).add_(unbiased.to(self.running_var.dtype), alpha=factor)
        return out.to(input.dtype)

    @classmethod
    def convert(cls, module: nn.Module, process_group=None) -> nn.Module:
        """Replace every BatchNorm layer; parameters and buffers are the same objects (optimizers stay valid)."""
        output = module
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(module, (cls, nn.SyncBatchNorm)):
            output = cls(module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats,
                         process_group)
            if module.affine:
                with torch.no_grad():
                    output.weight = module.weight
                    output.bias = module.bias
            output.running_mean = module.running_mean
            output.running_var = module.running_var
            output.num_batches_tracked = module.num_batches_tracked
            output.training = module.training
        for name, child in module.named_children():
            output.add_module(name, cls.convert(child, process_group))
        return output


def unit_stride_parameters(module: nn.Module) -> None:
    """Give every parameter plain row-major strides, in place (the same Parameter objects: optimizers stay valid).

    DeepSpeed broadcasts each parameter as a byte view, which needs stride(-1) == 1. A channels_last conv weight
    fails ("self.stride(-1) must be 1"), including a 1x1 one, which still reports is_contiguous() == True.
    Activations may stay channels_last.
    """
    with torch.no_grad():
        for param in module.parameters():
            if param.dim() > 0 and (param.stride(-1) != 1 or not param.is_contiguous()):
                param.data = param.data.clone(memory_format=torch.contiguous_format)


def _has_batchnorm(module: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in module.modules())


def _convert_sync_batchnorm(module: nn.Module, device: torch.device) -> nn.Module:
    if device.type == "cpu":
        return CpuSyncBatchNorm.convert(module)
    return nn.SyncBatchNorm.convert_sync_batchnorm(module)


# --------------------------------------------------------------------------- #
# DeepSpeed
# --------------------------------------------------------------------------- #
def _import_deepspeed(device: torch.device):
    if device.type == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    try:
        import deepspeed
    except ImportError:
        raise ConfigError("dist.backend=deepspeed needs DeepSpeed: `pip install deepspeed`, "
                          "or use dist.backend=ddp") from None
    from deepspeed.accelerator import get_accelerator

    accelerator = get_accelerator().device_name()
    if accelerator != device.type:
        raise ConfigError(f"DeepSpeed's accelerator is {accelerator!r} but the engine's device is {device}; "
                          f"set DS_ACCELERATOR={device.type} (or run.device={accelerator})")
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    if device.type == "cpu" and os.environ.get("SCAN_DIST_DS_SHM_COMM", "0") != "1":
        # DeepSpeed's TorchBackend builds this op when `__compatible_ops__` says it can: the edit makes it skip the
        # ~40 s g++ compile of an op that training never uses (inference all-reduce only).
        try:
            deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
        except (AttributeError, TypeError):
            pass
    return deepspeed


def deepspeed_config(cfg_dist, world_size: int) -> dict:
    """The DeepSpeed config generated from cfg_dist (see the module docstring)."""
    precision = getattr(cfg_dist, "precision", "fp32")
    accum = int(getattr(cfg_dist, "grad_accum_steps", 1))
    clip = float(getattr(cfg_dist, "grad_clip", 0.0) or 0.0)
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": accum,
        "train_batch_size": accum * world_size,
        "zero_optimization": {"stage": int(getattr(cfg_dist, "zero_stage", 0))},
        "gradient_clipping": clip,
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }
    if precision in ("bf16", "fp16"):
        # fp32 weights, autocast compute (as none/ddp); no module cast to fp16/bf16 (see the module docstring)
        config["torch_autocast"] = {"enabled": True, "dtype": "bfloat16" if precision == "bf16" else "float16",
                                    "lower_precision_safe_modules": []}
    return config


# --------------------------------------------------------------------------- #
# Engine
# --------------------------------------------------------------------------- #
class Engine:
    """One training API over none | ddp | deepspeed; see the module docstring for gradient semantics.

    Loop: ``out = engine(x); engine.backward(loss); stepped = engine.step()`` once per micro-batch; `step` returns
    True on the accumulation boundary (when the optimizer stepped; the optional `scheduler` is stepped then too).
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer | None, cfg_dist,
                 env: DistEnv | None = None, scheduler=None):
        self.env = env if env is not None else detect()
        self.backend = getattr(cfg_dist, "backend", "none")
        self.zero_stage = int(getattr(cfg_dist, "zero_stage", 0))
        self.precision = getattr(cfg_dist, "precision", "fp32")
        self.grad_accum_steps = int(getattr(cfg_dist, "grad_accum_steps", 1))
        self.timeout_s = float(getattr(cfg_dist, "timeout_s", 600))
        self.grad_clip = float(getattr(cfg_dist, "grad_clip", 0.0) or 0.0)
        sync_bn = bool(getattr(cfg_dist, "sync_batchnorm", True))
        find_unused = bool(getattr(cfg_dist, "find_unused_parameters", False))
        self._check(optimizer)

        self.rank = self.env.rank
        self.world_size = self.env.world_size
        self.is_main = self.env.is_main
        self.device = self.env.device
        self.optimizer = optimizer
        self.scheduler = scheduler
        self._micro = 0
        self._amp_dtype = PRECISIONS[self.precision]
        self.scaler = None
        self._ds = None

        if self.env.distributed:
            init_process_group(self.env, self.timeout_s)  # idempotent
        elif self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        module = model.to(self.device)
        if self.env.distributed and sync_bn and _has_batchnorm(module):
            module = _convert_sync_batchnorm(module, self.device)
            if self.is_main:
                log.info("BatchNorm synchronised over %d ranks (%s)", self.world_size,
                         "CpuSyncBatchNorm" if self.device.type == "cpu" else "torch.nn.SyncBatchNorm")
        self.module = module

        if self.backend == "deepspeed":
            self._init_deepspeed(cfg_dist)
        else:
            if self.backend == "ddp" and self.env.distributed:
                from torch.nn.parallel import DistributedDataParallel

                device_ids = [self.device.index] if self.device.type == "cuda" else None
                self.model = DistributedDataParallel(module, device_ids=device_ids,
                                                     find_unused_parameters=find_unused)
            else:
                self.model = module
            if self.precision == "fp16" and optimizer is not None:
                self.scaler = torch.amp.GradScaler(self.device.type)

    # ------------------------------------------------------------------ setup
    def _check(self, optimizer) -> None:
        if self.backend not in BACKENDS:
            raise ConfigError(f"dist.backend must be one of {', '.join(BACKENDS)}; got {self.backend!r}")
        if self.zero_stage not in (0, 1, 2):
            raise ConfigError(f"dist.zero_stage must be 0, 1 or 2; got {self.zero_stage}")
        if self.zero_stage > 0 and self.backend != "deepspeed":
            raise ConfigError(f"dist.zero_stage={self.zero_stage} needs dist.backend=deepspeed")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"dist.precision must be fp32, bf16 or fp16; got {self.precision!r}")
        if self.grad_accum_steps < 1:
            raise ConfigError(f"dist.grad_accum_steps must be at least 1; got {self.grad_accum_steps}")
        if self.timeout_s <= 0:
            raise ConfigError(f"dist.timeout_s must be positive; got {self.timeout_s}")
        if self.grad_clip < 0:
            raise ConfigError(f"dist.grad_clip must be >= 0; got {self.grad_clip}")
        if self.backend == "none" and self.env.distributed:
            raise ConfigError(f"dist.backend=none but this job has {self.env.world_size} processes "
                              f"({self.env.source}); use dist.backend=ddp or deepspeed")
        if self.backend == "deepspeed" and optimizer is None:
            raise ConfigError("dist.backend=deepspeed needs an optimizer (DeepSpeed trains; use backend=none "
                              "for inference)")

    def _init_deepspeed(self, cfg_dist) -> None:
        deepspeed = _import_deepspeed(self.device)
        export_environ(self.env)  # DeepSpeed reads LOCAL_RANK (and RANK, WORLD_SIZE) from the environment
        if not dist.is_initialized():  # world size 1: a one-process group on an in-memory store, no port
            dist.init_process_group(backend=self.env.backend, store=dist.HashStore(), rank=0, world_size=1,
                                    timeout=datetime.timedelta(seconds=self.timeout_s))
        deepspeed.init_distributed(dist_backend=self.env.backend,
                                   timeout=datetime.timedelta(seconds=self.timeout_s))
        self.ds_config = deepspeed_config(cfg_dist, self.world_size)
        unit_stride_parameters(self.module)
        engine, _, _, _ = deepspeed.initialize(model=self.module, optimizer=self.optimizer, config=self.ds_config,
                                               dist_init_required=False)
        self._ds = engine
        self.model = engine

    # ------------------------------------------------------------------ training
    def _boundary(self) -> bool:
        return (self._micro + 1) % self.grad_accum_steps == 0

    def _no_sync(self):
        """DDP: skip the gradient all-reduce inside an accumulation window (it must cover forward and backward)."""
        if hasattr(self.model, "no_sync") and self._ds is None and not self._boundary():
            return self.model.no_sync()
        return contextlib.nullcontext()

    def _autocast(self):
        if self._ds is not None:  # DeepSpeed's forward enters its own autocast
            return contextlib.nullcontext()
        return self.autocast()

    def autocast(self):
        """The precision context of dist.precision, for forwards outside the engine (e.g. an EMA teacher)."""
        if self._amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self._amp_dtype)

    def forward(self, *args, **kwargs):
        with self._no_sync(), self._autocast():
            return self.model(*args, **kwargs)

    __call__ = forward

    def backward(self, loss: Tensor, scale: float = 1.0) -> None:
        if self._ds is not None:
            self._ds.backward(loss * scale if scale != 1.0 else loss)  # DeepSpeed divides by its accumulation steps
            return
        loss = loss * (scale / self.grad_accum_steps) if (scale != 1.0 or self.grad_accum_steps > 1) else loss
        with self._no_sync():
            if self.scaler is not None:
                self.scaler.scale(loss).backward()
            else:
                loss.backward()

    def step(self) -> bool:
        if self._ds is not None:
            boundary = self._ds.is_gradient_accumulation_boundary()
            self._ds.step()
        else:
            boundary = self._boundary()
            if boundary:
                self._optimizer_step()
        self._micro += 1
        if boundary and self.scheduler is not None:
            self.scheduler.step()
        return boundary

    def _optimizer_step(self) -> None:
        if self.optimizer is None:
            raise RuntimeError("Engine.step() needs an optimizer")
        if self.scaler is not None:
            if self.grad_clip > 0:
                self.scaler.unscale_(self.optimizer)
                torch.nn.utils.clip_grad_norm_(self.module.parameters(), self.grad_clip)
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            if self.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(self.module.parameters(), self.grad_clip)
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def zero_grad(self) -> None:
        if self._ds is not None:
            self._ds.zero_grad()
        elif self.optimizer is not None:
            self.optimizer.zero_grad(set_to_none=True)
        else:
            self.module.zero_grad(set_to_none=True)

    def set_lr(self, lrs: list[float]) -> None:
        """One learning rate per param group of the optimizer passed in (DeepSpeed's wrapper shares its groups)."""
        groups = self.optimizer.param_groups
        if len(lrs) != len(groups):
            raise ValueError(f"set_lr got {len(lrs)} learning rates for {len(groups)} param groups")
        for group, lr in zip(groups, lrs):
            group["lr"] = float(lr)
        wrapped = getattr(self._ds, "optimizer", None)
        wrapped_groups = getattr(wrapped, "param_groups", None)
        if wrapped_groups is not None and wrapped_groups is not groups and len(wrapped_groups) == len(lrs):
            for group, lr in zip(wrapped_groups, lrs):
                group["lr"] = float(lr)

    # ------------------------------------------------------------------ state
    def _grad_scaler(self):
        """The fp16 GradScaler in use: ours (none/ddp) or the one DeepSpeed's torch_autocast made (not saved by
        DeepSpeed's own checkpoints, so this engine saves it)."""
        if self._ds is None:
            return self.scaler
        return (getattr(self._ds, "torch_autocast_z0_gradscaler", None)
                or getattr(self._ds.optimizer, "torch_autocast_gradscaler", None))

    @property
    def uses_sharded_checkpoints(self) -> bool:
        return self._ds is not None and self.zero_stage > 0

    def state_dict(self) -> dict:
        """Plain dict (tensors and numbers; torch.load(weights_only=True) reads it), copied, so training on does
        not change it. With ZeRO > 0 the optimizer state is sharded: "optimizer" is None and save_sharded holds it."""
        if self._ds is not None:
            optimizer_state = None if self.zero_stage > 0 else self._ds.optimizer.state_dict()
        else:
            optimizer_state = self.optimizer.state_dict() if self.optimizer is not None else None
        scaler = self._grad_scaler()
        state = {
            "model": {k: v.detach().clone() for k, v in self.module.state_dict().items()},
            "optimizer": copy.deepcopy(optimizer_state),
            "scaler": scaler.state_dict() if scaler is not None else None,
            "scheduler": copy.deepcopy(self.scheduler.state_dict()) if self.scheduler is not None else None,
            "micro_step": self._micro,
            "world_size": self.world_size,
            "backend": self.backend,
        }
        return state

    def load_state_dict(self, state: dict) -> None:
        """Restore a state_dict() (from any backend and world size; with ZeRO > 0 only the model weights: use
        load_sharded for the optimizer)."""
        self.module.load_state_dict(state["model"])
        refresh = getattr(getattr(self._ds, "optimizer", None), "refresh_fp32_params", None)
        if refresh is not None and self.zero_stage > 0:
            refresh()  # ZeRO keeps its own fp32 copy of the weights: copy the loaded ones into it
        if state.get("optimizer") is not None:
            if self._ds is not None:
                if self.zero_stage > 0:
                    raise ConfigError("this state holds a plain optimizer state but dist.zero_stage="
                                      f"{self.zero_stage} shards it: resume with load_sharded")
                self._ds.optimizer.load_state_dict(state["optimizer"])
            elif self.optimizer is not None:
                self.optimizer.load_state_dict(state["optimizer"])
        scaler = self._grad_scaler()
        if scaler is not None and state.get("scaler") is not None:
            scaler.load_state_dict(state["scaler"])
        if self.scheduler is not None and state.get("scheduler") is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        self._micro = int(state.get("micro_step", 0))
        if self._ds is not None:
            self._ds.micro_steps = self._micro

    def save_sharded(self, directory: Path, tag: str) -> None:
        """DeepSpeed checkpoint (every rank calls it; each writes its shard) under directory/tag."""
        if self._ds is None:
            raise RuntimeError(f"save_sharded is for dist.backend=deepspeed (this engine is {self.backend}); "
                               "save state_dict() instead")
        directory = Path(directory)
        scaler = self._grad_scaler()
        client = {"micro_step": self._micro,
                  "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
                  "scaler": scaler.state_dict() if scaler is not None else None}
        self._ds.save_checkpoint(str(directory), tag=tag, client_state=client)
        if self.is_main:
            meta = {"world_size": self.world_size, "zero_stage": self.zero_stage, "precision": self.precision}
            tmp = directory / tag / (META_FILE + ".tmp")
            tmp.write_text(json.dumps(meta))
            tmp.replace(directory / tag / META_FILE)
        self.barrier()

    def load_sharded(self, directory: Path, tag: str) -> bool:
        """Load directory/tag written by save_sharded; False when it does not exist (or is incomplete)."""
        if self._ds is None:
            raise RuntimeError(f"load_sharded is for dist.backend=deepspeed (this engine is {self.backend})")
        meta_path = Path(directory) / tag / META_FILE
        if not meta_path.is_file():
            return False
        meta = json.loads(meta_path.read_text())
        if meta["zero_stage"] != self.zero_stage:
            raise ConfigError(f"checkpoint {meta_path.parent} was saved with dist.zero_stage={meta['zero_stage']}, "
                              f"this run has {self.zero_stage}")
        if meta["world_size"] != self.world_size and self.zero_stage > 0:
            raise ConfigError(f"checkpoint {meta_path.parent} holds ZeRO-{self.zero_stage} optimizer shards of "
                              f"{meta['world_size']} processes; this job has {self.world_size}. Resume with "
                              f"{meta['world_size']} processes, or use dist.zero_stage=0 / dist.backend=ddp "
                              "checkpoints to change the world size")
        path, client = self._ds.load_checkpoint(str(directory), tag=tag)
        if path is None:
            return False
        client = client or {}
        self._micro = int(client.get("micro_step", 0))
        self._ds.micro_steps = self._micro
        if self.scheduler is not None and client.get("scheduler") is not None:
            self.scheduler.load_state_dict(client["scheduler"])
        scaler = self._grad_scaler()
        if scaler is not None and client.get("scaler") is not None:
            scaler.load_state_dict(client["scaler"])
        return True

    # ------------------------------------------------------------------ collectives
    @property
    def process_group(self):
        return dist.group.WORLD if self.world_size > 1 else None

    def all_gather(self, tensor: Tensor, grad: bool = False) -> Tensor:
        """Rows of every rank concatenated along dim 0 in rank order (equal shapes). grad=True keeps autograd:
        the backward sums the gradients all ranks computed for this rank's rows."""
        if self.world_size == 1:
            return tensor
        if grad:
            return _AllGatherRows.apply(tensor, dist.group.WORLD)
        parts = [torch.empty_like(tensor) for _ in range(self.world_size)]
        dist.all_gather(parts, tensor.contiguous())
        return torch.cat(parts, dim=0)

    def all_gather_object(self, obj) -> list:
        if self.world_size == 1:
            return [obj]
        out: list = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def all_reduce(self, tensor: Tensor, op: str = "sum") -> Tensor:
        if op not in ("sum", "mean", "max", "min"):
            raise ValueError(f"all_reduce op must be sum, mean, max or min; got {op!r}")
        if self.world_size == 1:
            return tensor
        if op == "mean":
            if not tensor.is_floating_point():
                raise ValueError("all_reduce op='mean' needs a floating-point tensor")
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)  # gloo has no AVG
            return tensor.div_(self.world_size)
        dist.all_reduce(tensor, op=_REDUCE_OPS[op])
        return tensor

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()
