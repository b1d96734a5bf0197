"""Benchmark of one training step -- SCAN and self-labelling -- through the real Engine: images/s, memory, bytes.

Each timed call is one optimiser step of the stage, as the stages run it:

* ``scan``      -- ``scan_dist.stages.scan._scan_step`` itself (the full-network mode): a neighbour per anchor
  (``loaders.sample_partners``, the counter-based pick the loader makes), both views of the model's SCAN kind,
  one forward of both through backbone + heads (``[H, 2b, C]``), ``scan_objective`` over the global batch,
  ``engine.backward(loss, scale=world_size)``, ``engine.step()``, and the three metrics the stage returns (0-d
  tensors, not read);
* ``selflabel`` -- ``scan_dist.stages.selflabel.self_label_step`` itself: weak
  (``eval``) and strong views, one forward of both (or, with an EMA teacher, the teacher's no-grad forward of the
  weak view and the student's forward of the strong view), ``confident_targets``, ``self_label_loss``
  (class-balanced or not, per preset), backward with scale = world size, step, EMA update;

on this rank's slice of a global batch drawn from a seeded order, as ``run_epochs`` feeds it; the metrics of the
last step are averaged over ranks after the timing.  The model is ``ClusterModel(build_backbone(...), ClusterHeads(...))`` (one head for
self-labelling, as after ``keep_head``), ``to(channels_last)`` as ``ctx.prepare_model`` does, then
``Engine(model, optimizer, cfg_dist)`` (SyncBatchNorm with more than one rank, DDP buckets, DeepSpeed ZeRO 0/2).

Inputs: synthetic uint8 images already on the device, indexed by CPU indices each step and passed through the real
view transform (``transforms.make_transform``; parameters from the counter-based ``sampling.draws`` of each row's
sample index and view, both phases -- ``base`` and ``finish`` -- on the device), so the number includes
augmentation.  In the pipeline the ``base`` phase runs in DataLoader workers, off the step (and on CPU the
``finish`` phase too), so this is the step with augmentation *on* its critical path: an upper bound of what a
loader-fed step costs.  ``--augment off`` (``--no-augment``) replaces them by random normalised float images on
the device (no augmentation): the model-only ceiling of the same step, to separate the two.

Per model the defaults are the paper's recipe (``../shared/RECIPES.md``, the repo presets ``cifar10`` and
``imagenet50``):

==================  =====  =============================================  ==========================================
model               size   SCAN                                           self-label
==================  =====  =============================================  ==========================================
``resnet18_cifar``  32     batch 128, 1 head x 10, view strong, Adam      batch 1000, 10 classes, balanced CE, Adam
``resnet50``        224    batch 512, 10 heads x 50, view simclr, SGD     batch 512, 50 classes, EMA 0.999, SGD
==================  =====  =============================================  ==========================================

The paper trains only the heads in the ImageNet SCAN stage (``scan.mode=head``); the ``resnet50`` SCAN row times
the full-network step (``scan.mode=full``), the expensive case.  Two deliberate benchmark settings: the
learning rate is 1e-4 for every group (the optimiser *type*, momentum and weight decay follow the preset; the
paper's lr 5 on a random full network diverges to NaN within a few steps, and NaN logits give no confident
sample), and the confidence threshold is 0 (``--threshold``): a freshly initialised head is never 99 % sure, and
without a confident sample the stage skips backward and step.  Neither changes the work of a step.

Columns: ``img_s`` = global batch (anchors for SCAN, images for self-labelling) per second; ``views_s`` = images
through the network per second (SCAN: anchor + neighbour = 2 per item; self-label: weak + strong = 2);
``train_views_s_gpu`` = views that get forward *and* backward, per rank (with an EMA teacher the weak view is
forward-only and not counted).  ``ceiling_img_s`` is a constant, *not measured here*: ResNet-50, 224x224, bf16
forward + backward + SGD on synthetic data on one H100 at batch 256 -- 3,981 img/s eager, 5,550 compiled --
given for ``resnet50`` rows at 224 in bf16 on CUDA; ``ratio_vs_ceiling`` = train_views_s_gpu / ceiling (target
>= 0.9).  Time per step is the median over ``--repeats`` steps after ``--warmup`` (``common.time_ms``, CUDA
synchronised); with N ranks the slowest rank's median is used.  ``peak_mem_mb`` is the largest over ranks of
``torch.cuda.max_memory_allocated`` (reset per row) on GPU, or of the process's max RSS (``getrusage``; it only
grows, so on CPU it is the peak *so far*, not per row).  ``grad_bytes`` = trainable parameters x 4 (fp32
gradients: every backend keeps fp32 weights and gradients), the size of the gradient all-reduce per step when N > 1
(a ring all-reduce moves 2(N-1)/N of it per GPU: ``ring_bytes_gpu``).  ``loss_floats`` = the loss's own
all-reduce per step (SCAN: H*C + H + 1; self-label: C class counts).

Multi-process: launch with torchrun; ``--batch`` is the *global* batch (split evenly over ranks); rank 0 prints
and writes the JSON.  Backend ``none`` rows are skipped when N > 1.

Usage::

    python benchmarks/bench_train_step.py                                   # GPU: both models, bf16, eager
    python benchmarks/bench_train_step.py --models resnet50 --precision fp32 bf16 --channels-last both \\
        --compile both --augment both
    python -m torch.distributed.run --nproc_per_node 8 benchmarks/bench_train_step.py --backend ddp deepspeed \\
        --zero 0 2
    python benchmarks/bench_train_step.py --small                           # CPU smoke run
    OMP_NUM_THREADS=1 python -m torch.distributed.run --nproc_per_node 2 benchmarks/bench_train_step.py \\
        --small --backend ddp
"""
from __future__ import annotations

import argparse
import copy
import gc
import itertools
import logging
import resource
import sys
import time
import traceback
import types
from pathlib import Path

import torch

if __package__ in (None, ""):  # run as a script: make the repo root importable (benchmarks.common, scan_dist)
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import Budget, add_budget_argument, environment, print_table, time_ms, write_results

CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)

# The paper's recipes (RECIPES.md sections 3-4; presets cifar10 and imagenet50).
SPECS = {
    "resnet18_cifar": {
        "preset": "cifar10", "image_size": 32, "mean": CIFAR10_MEAN, "std": CIFAR10_STD,
        "augment": {"crop_scale_min": 0.2, "cutout_frac": 0.5}, "neighbors_k": 20,
        "scan": {"batch": 128, "heads": 1, "classes": 10, "view": "strong", "optimizer": "adam",
                 "weight_decay": 1e-4},
        "selflabel": {"batch": 1000, "classes": 10, "view": "strong", "class_balance": True, "ema_decay": 0.0,
                      "optimizer": "adam", "weight_decay": 1e-4},
    },
    "resnet50": {
        "preset": "imagenet50", "image_size": 224, "mean": IMAGENET_MEAN, "std": IMAGENET_STD,
        "augment": {"crop_scale_min": 0.2, "cutout_frac": 0.335}, "neighbors_k": 50,
        "scan": {"batch": 512, "heads": 10, "classes": 50, "view": "simclr", "optimizer": "sgd",
                 "weight_decay": 0.0},
        "selflabel": {"batch": 512, "classes": 50, "view": "strong", "class_balance": False, "ema_decay": 0.999,
                      "optimizer": "sgd", "weight_decay": 0.0},
    },
}
# --small: CPU-sized (global batch, image size) per model.
SMALL = {"resnet18_cifar": {"batch": 32, "image_size": 32}, "resnet50": {"batch": 8, "image_size": 64}}

CEILING = {
    "what": "torchvision resnet50, 224x224, bf16 autocast, synthetic data, forward + backward + SGD step, batch 256",
    "device": "one NVIDIA H100", "eager_img_s": 3981.0, "compiled_img_s": 5550.0, "model": "resnet50",
    "image_size": 224, "precision": "bf16", "batch": 256,
    "source": "measured elsewhere on the GPU machine, not by this script",
}
TARGET_RATIO = 0.9
DS_CHANNELS_LAST_NOTE = (
    "deepspeed + channels_last fails in Engine._init_deepspeed: it makes only parameters with is_contiguous() False "
    "contiguous, but a 1x1 conv weight in channels_last has is_contiguous() True and stride(-1) = C_in != 1, so "
    "DeepSpeed's byte-view broadcast raises; use --channels-last off for deepspeed rows until the engine is fixed")
BENCH_LR = 1e-4
MOMENTUM = 0.9
ENTROPY_WEIGHT = 5.0


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--small", action="store_true",
                        help="CPU-sized: resnet18_cifar at batch 32, resnet50 at 64x64 batch 8, 3 repeats")
    parser.add_argument("--models", nargs="+", choices=sorted(SPECS), default=sorted(SPECS))
    parser.add_argument("--steps", nargs="+", choices=["scan", "selflabel"], default=["scan", "selflabel"])
    parser.add_argument("--backend", nargs="+", choices=["none", "ddp", "deepspeed"], default=None,
                        help="dist backends (default: none in one process, ddp under torchrun)")
    parser.add_argument("--zero", nargs="+", type=int, choices=[0, 1, 2], default=[0],
                        help="DeepSpeed ZeRO stages for the deepspeed rows (default 0)")
    parser.add_argument("--precision", nargs="+", choices=["fp32", "bf16", "fp16"], default=None,
                        help="default: bf16 on GPU, fp32 on CPU")
    parser.add_argument("--channels-last", choices=["on", "off", "both"], default="on")
    parser.add_argument("--compile", nargs="?", const="on", choices=["on", "off", "both"], default="off",
                        help="torch.compile the wrapped model (bare --compile = on; both = eager and compiled rows)")
    parser.add_argument("--augment", choices=["on", "off", "both"], default="on",
                        help="off: random normalised float images, no augmentation (the model-only ceiling)")
    parser.add_argument("--no-augment", dest="augment", action="store_const", const="off",
                        help="same as --augment off")
    parser.add_argument("--batch", type=int, default=None, help="global batch for every row (default: the paper's)")
    parser.add_argument("--heads", type=int, default=None, help="SCAN heads (default: the preset's)")
    parser.add_argument("--classes", type=int, default=None, help="clusters (default: the preset's)")
    parser.add_argument("--threshold", type=float, default=0.0,
                        help="self-label confidence threshold (default 0: every sample is confident)")
    parser.add_argument("--no-sync-bn", action="store_true", help="dist.sync_batchnorm=False")
    parser.add_argument("--cudnn-benchmark", action="store_true",
                        help="torch.backends.cudnn.benchmark = True (the pipeline leaves it off)")
    parser.add_argument("--repeats", type=int, default=None, help="timed steps (default 20; 3 with --small)")
    parser.add_argument("--warmup", type=int, default=None, help="warm-up steps (default 5; 1 with --small)")
    parser.add_argument("--timeout-s", type=float, default=600.0, help="collective timeout (dist.timeout_s)")
    parser.add_argument("--out", type=Path, default=None, help="results folder (default benchmarks/results)")
    add_budget_argument(parser)
    args = parser.parse_args(argv)
    if args.repeats is None:
        args.repeats = 3 if args.small else 20
    if args.warmup is None:
        args.warmup = 1 if args.small else 5
    return args


def _both(value: str) -> list[bool]:
    return {"on": [True], "off": [False], "both": [False, True]}[value]


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _gather(obj, world: int) -> list:
    if world == 1:
        return [obj]
    import torch.distributed as dist

    out: list = [None] * world
    dist.all_gather_object(out, obj)
    return out


def _row_plan(args, world: int, device: torch.device) -> list[dict]:
    backends = args.backend or (["none"] if world == 1 else ["ddp"])
    precisions = args.precision or (["bf16"] if device.type == "cuda" else ["fp32"])
    combos = []
    for backend in backends:
        for zero in (args.zero if backend == "deepspeed" else [0]):
            combos.append((backend, zero))
    plan = []
    for model, step in itertools.product(args.models, args.steps):
        for (backend, zero), precision, cl, comp, aug in itertools.product(
                combos, precisions, _both(args.channels_last), _both(args.compile), _both(args.augment)):
            plan.append({"model": model, "step": step, "backend": backend, "zero": zero, "precision": precision,
                         "channels_last": cl, "compile": comp, "augment": aug})
    return plan


class _Row:
    """One row: the model and optimizer (``__init__``), then the engine, inputs and step (``start``); ``close()``
    frees them."""

    def __init__(self, args, spec_row: dict, env, device: torch.device):
        from scan_dist.models.backbones import build_backbone
        from scan_dist.models.heads import ClusterHeads, ClusterModel
        from scan_dist.stages.common import make_optimizer

        self.row = spec_row
        name, kind = spec_row["model"], spec_row["step"]
        spec = SPECS[name]
        stage = spec[kind]
        small = SMALL[name] if args.small else {}
        self.image_size = small.get("image_size", spec["image_size"])
        self.global_batch = args.batch or small.get("batch", stage["batch"])
        self.world, self.rank = env.world_size, env.rank
        if self.global_batch % self.world:
            raise ValueError(f"global batch {self.global_batch} does not divide by {self.world} ranks")
        self.local = self.global_batch // self.world
        self.heads = (args.heads or stage["heads"]) if kind == "scan" else 1
        self.classes = args.classes or stage["classes"]
        self.memory_format = torch.channels_last if spec_row["channels_last"] else torch.contiguous_format
        self.device = device
        self.pool_size = max(2 * self.local, 16)

        backbone = build_backbone(name, 3)
        model = ClusterModel(backbone, ClusterHeads(backbone.out_dim, self.classes, self.heads))
        model = model.to(device)  # ctx.prepare_model
        if spec_row["channels_last"]:
            model = model.to(memory_format=torch.channels_last)
        model.train()
        self.teacher = None
        self.ema_decay = stage.get("ema_decay", 0.0) if kind == "selflabel" else 0.0
        if self.ema_decay > 0:
            self.teacher = copy.deepcopy(model).eval()
        if kind == "scan":  # scan._optimizer, full mode: heads group + backbone group
            groups = [{"params": model.heads.parameters(), "lr": BENCH_LR},
                      {"params": model.backbone.parameters(), "lr": BENCH_LR}]
        else:
            groups = [{"params": model.parameters(), "lr": BENCH_LR}]
        optimizer = make_optimizer(stage["optimizer"], groups, stage["weight_decay"], MOMENTUM)
        cfg_dist = types.SimpleNamespace(backend=spec_row["backend"], zero_stage=spec_row["zero"],
                                         precision=spec_row["precision"], grad_clip=0.0, timeout_s=args.timeout_s,
                                         sync_batchnorm=not args.no_sync_bn, grad_accum_steps=1)
        self.model = model
        self.trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        self.params = sum(p.numel() for p in model.parameters())
        self.bn_layers = sum(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())
        self._deferred = (args, spec, stage, optimizer, cfg_dist, env)
        self.engine = None
        self.last: dict = {}

    def start(self) -> None:
        """The engine (DDP / DeepSpeed wrapping, SyncBatchNorm), torch.compile, the data and the step function."""
        from scan_dist.data.augment import AugmentConfig
        from scan_dist.data.sampling import draws, stream_key
        from scan_dist.data.transforms import make_transform
        from scan_dist.distributed.engine import Engine

        args, spec, stage, optimizer, cfg_dist, env = self._deferred
        self._deferred = None
        spec_row, kind, device = self.row, self.row["step"], self.device
        self.engine = Engine(self.model, optimizer, cfg_dist, env)
        if spec_row["compile"]:
            if self.engine._ds is not None:
                self.engine._ds.compile()
            else:
                self.engine.model = torch.compile(self.engine.model)

        # Synthetic data on the device: a pool twice the local batch, indexed by CPU indices every step.
        gen = torch.Generator().manual_seed(1234 + self.rank)
        shape = (self.pool_size, 3, self.image_size, self.image_size)
        if spec_row["augment"]:
            self.images = torch.randint(0, 256, shape, dtype=torch.uint8, generator=gen).to(device)
            aug_cfg = AugmentConfig(**spec["augment"])

            def view(kind_name, stream, view_number):
                transform = make_transform(kind_name, aug_cfg, spec["mean"], spec["std"])

                def apply(rows):
                    # The loader's draws: per (seed, stream, epoch, sample index, view); a "step" is an epoch
                    # here so a pool image gets a new view every step.
                    u = draws(stream_key(0, stream, self.calls), rows, view_number) if transform.random else None
                    out = transform(self.images[torch.from_numpy(rows).to(device)], u)
                    return out.contiguous(memory_format=self.memory_format)
                return apply
        else:
            self.images = torch.randn(shape, generator=gen).to(device)

            def view(kind_name, stream, view_number):
                return lambda rows: self.images[torch.from_numpy(rows).to(device)].contiguous(
                    memory_format=self.memory_format)
        self.k = min(spec["neighbors_k"], self.pool_size - 1)
        self.neighbors = torch.randint(0, self.pool_size, (self.pool_size, self.k), generator=gen).numpy()
        self.calls = 0
        self.index_gen = torch.Generator().manual_seed(99)  # same on every rank, as the trainer's seeded order
        # The stages' view specs: SCAN anchors view 0 and partners view 1 of stream "scan"; self-labelling the
        # eval view and view 0 of stream "selflabel".
        if kind == "scan":
            self._step = self._scan_step(view(stage["view"], "scan", 0), view(stage["view"], "scan", 1))
        else:
            self._step = self._selflabel_step(view("eval", "", 0), view(stage["view"], "selflabel", 0),
                                              stage["class_balance"], args.threshold)

    # ------------------------------------------------------------------ the steps
    def _scan_step(self, anchor_view, partner_view):
        from scan_dist.data.loaders import sample_partners
        from scan_dist.data.sampling import stream_key
        from scan_dist.stages.scan import _scan_step

        engine = self.engine

        def logits(batch):
            anchors = batch["index"].numpy()
            # What the loader's Partners.pick does for the batch (here inside the timed step).
            partners = sample_partners(self.neighbors, stream_key(0, "scan", self.calls), anchors)
            return engine(torch.cat([anchor_view(anchors), partner_view(partners)]))

        return _scan_step(logits, engine, ENTROPY_WEIGHT, "auto")

    def _selflabel_step(self, weak, strong, class_balance: bool, threshold: float):
        from scan_dist.stages.selflabel import self_label_step

        teacher = self.teacher
        ema = (teacher, self.model, self.ema_decay) if teacher is not None else None
        return self_label_step(self.engine, lambda batch: weak(batch["index"].numpy()),
                               lambda batch: strong(batch["index"].numpy()), teacher, threshold, class_balance, ema)

    def __call__(self) -> None:
        # The trainer's loop: this rank's slice of a global batch (the same global order on every rank); the logged
        # values stay on the device (the trainer reads them every READ_EVERY steps, not per step).
        order = torch.randint(0, self.pool_size, (self.global_batch,), generator=self.index_gen)
        indices = order[self.rank * self.local:(self.rank + 1) * self.local]
        self.last = self._step({"epoch": self.calls, "index": indices})
        self.calls += 1

    # ------------------------------------------------------------------ facts
    def facts(self) -> dict:
        kind = self.row["step"]
        views = 2 * self.global_batch
        train_views = self.global_batch if (kind == "selflabel" and self.teacher is not None) else views
        grad_bytes = 4 * self.trainable
        loss_floats = self.heads * self.classes + self.heads + 1 if kind == "scan" else self.classes
        return {"image_size": self.image_size, "global_batch": self.global_batch, "local_batch": self.local,
                "world_size": self.world, "heads": self.heads, "classes": self.classes,
                "views_per_step": views, "train_views_per_step": train_views,
                "ema_teacher": self.teacher is not None, "params": self.params, "trainable_params": self.trainable,
                "bn_layers": self.bn_layers, "grad_bytes": grad_bytes,
                "ring_bytes_gpu": 2 * (self.world - 1) / self.world * grad_bytes,
                "loss_floats": loss_floats, "pool_images": self.pool_size}

    def close(self) -> None:
        for name in ("engine", "model", "teacher", "images", "neighbors", "_step", "_deferred"):
            setattr(self, name, None)
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


def _run_row(args, spec_row: dict, env, device: torch.device, seconds: float | None = None) -> dict:
    """One row; ``seconds`` (one process only: ranks must run the same number of steps) caps the row's time."""
    begin = time.perf_counter()
    row = dict(spec_row)
    row["device"] = device.type
    bench = None
    try:
        bench = _Row(args, spec_row, env, device)
        row.update(bench.facts())
        bench.start()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        bench.engine.barrier()
        left = None if seconds is None else max(0.0, seconds - (time.perf_counter() - begin))
        stats = time_ms(bench, device, warmup=args.warmup, repeats=args.repeats, seconds=left)
        from scan_dist.distributed import comm

        last = comm.mean_over_ranks(bench.last)
        memory = _peak_memory_mb(device)
        ok = True
    except Exception as exc:  # an OOM, a failed compile: reported in the row, not fatal
        oom = isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc).lower()
        row["note"] = ("OOM: " if oom else "") + f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
        if env.is_main and not oom:
            traceback.print_exc()
        stats, last, memory, ok = None, {}, None, False
    finally:
        if bench is not None:
            bench.close()
    # Every rank's numbers (the step's collectives keep ranks in lockstep; the slowest median is reported).
    gathered = _gather({"stats": stats, "memory": memory, "ok": ok, "note": row.get("note")}, env.world_size)
    if not all(g["ok"] for g in gathered):
        row.setdefault("note", next(g["note"] for g in gathered if not g["ok"]))
        return row
    medians = [g["stats"]["median_ms"] for g in gathered]
    row.update(stats)
    row["median_ms_per_rank"] = medians
    row["median_ms"] = max(medians)
    row["peak_mem_mb_per_rank"] = [g["memory"] for g in gathered]
    row["peak_mem_mb"] = max(row["peak_mem_mb_per_rank"])
    row["last_metrics"] = last
    row["finite"] = all(v == v and abs(v) != float("inf") for v in last.values())
    seconds = row["median_ms"] / 1e3
    row["img_s"] = row["global_batch"] / seconds
    row["views_s"] = row["views_per_step"] / seconds
    row["train_views_s_gpu"] = row["train_views_per_step"] / seconds / row["world_size"]
    if (device.type == "cuda" and row["model"] == CEILING["model"] and row["image_size"] == CEILING["image_size"]
            and row["precision"] == CEILING["precision"]):
        row["ceiling_img_s"] = CEILING["compiled_img_s" if row["compile"] else "eager_img_s"]
        row["ratio_vs_ceiling"] = row["train_views_s_gpu"] / row["ceiling_img_s"]
        row["meets_target"] = row["ratio_vs_ceiling"] >= TARGET_RATIO
    return row


def main(argv=None) -> int:
    args = parse_args(argv)
    from scan_dist.distributed.env import destroy_process_group, detect, init_process_group

    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    env = detect()
    device = env.device
    init_process_group(env, args.timeout_s)
    if args.cudnn_benchmark:
        torch.backends.cudnn.benchmark = True
    torch.manual_seed(0)  # the same initial weights on every rank
    plan = _row_plan(args, env.world_size, device)
    notes = []
    if device.type == "cpu":
        notes.append("CPU run: timings say nothing about GPU speed; peak_mem_mb is the process max RSS so far")
    rows = []
    budget = Budget(args.budget_s)
    for index, spec_row in enumerate(plan):
        if spec_row["backend"] == "none" and env.world_size > 1:
            notes.append(f"skipped backend none for {spec_row['model']}/{spec_row['step']}: {env.world_size} ranks")
            continue
        share = None
        if budget.limited:
            # Every rank must take the same decision: the least time left over the ranks.
            share = min(_gather(budget.share(len(plan) - index), env.world_size))
            if share < 1.0:
                notes.append(f"skipped {spec_row['model']}/{spec_row['step']}/{spec_row['backend']}: "
                             "--budget-s spent")
                continue
        row = _run_row(args, spec_row, env, device, share if env.world_size == 1 else None)
        rows.append(row)
        if "stride(-1) must be 1" in row.get("note", "") and DS_CHANNELS_LAST_NOTE not in notes:
            notes.append(DS_CHANNELS_LAST_NOTE)
        if env.is_main:
            print(f"[{len(rows)}/{len(plan)}] {row['model']} {row['step']} {row['backend']}"
                  f"{'-z' + str(row['zero']) if row['backend'] == 'deepspeed' else ''} {row['precision']} "
                  f"cl={row['channels_last']} compile={row['compile']} augment={row['augment']}: "
                  f"{row.get('median_ms', float('nan')):.1f} ms {row.get('note', '')}", flush=True)

    if env.is_main:
        for row in rows:
            row["params_M"] = row.get("params", 0) / 1e6 if row.get("params") else None
            row["grad_MB"] = row.get("grad_bytes", 0) / 1e6 if row.get("grad_bytes") else None
        print_table(rows, ["model", "step", "backend", "zero", "precision", "channels_last", "compile", "augment",
                           "world_size", "global_batch", "median_ms", "img_s", "views_s", "train_views_s_gpu",
                           "ceiling_img_s", "ratio_vs_ceiling", "peak_mem_mb", "params_M", "grad_MB", "note"])
        for note in notes:
            print("note:", note)
        payload = {
            "environment": environment(device),
            "config": {"small": args.small, "repeats": args.repeats, "warmup": args.warmup, "budget_s": args.budget_s,
                       "world_size": env.world_size, "launcher": env.source, "dist_backend": env.backend,
                       "models": args.models, "steps": args.steps, "batch_override": args.batch,
                       "threshold": args.threshold, "lr": BENCH_LR, "momentum": MOMENTUM,
                       "entropy_weight": ENTROPY_WEIGHT, "sync_batchnorm": not args.no_sync_bn,
                       "cudnn_benchmark": args.cudnn_benchmark, "specs": SPECS,
                       "small_specs": SMALL if args.small else None,
                       "img_s": "global batch items (SCAN anchors / self-label images) per second",
                       "views_s": "images through the network per second (2 per item)",
                       "train_views_s_gpu": "views with forward+backward per second per rank",
                       "grad_bytes": "trainable params x 4 (fp32 grads): the gradient all-reduce per step when N > 1",
                       "ring_bytes_gpu": "2(N-1)/N x grad_bytes, sent (and received) per GPU by a ring all-reduce",
                       "loss_floats": "floats in the loss's own all-reduce (SCAN: H*C+H+1; self-label: C)"},
            "ceiling": CEILING,
            "target_ratio": TARGET_RATIO,
            "results": rows,
            "notes": notes,
        }
        path = write_results("train_step", payload, args.out)
        print(f"wrote {path}")
    destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
