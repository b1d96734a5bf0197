"""The memory plan of a run: per-rank host and GPU memory of every stage, with the arithmetic, for `--dry-run`.

Nothing is opened or allocated: dataset sizes come from the preset (published sizes, capped by data.max_images),
the models are built on torch's meta device (parameter counts, feature sizes) and the activation memory of a
training step is counted exactly on the meta device too (the bytes autograd saves for backward for one image at
the run's input size, in fp32; mixed precision saves part of it in 16 bits, so this is an upper bound).

What the plan counts and what it leaves out:
* host, per rank: the reader's index (file names, labels), the loader's prefetched batches, the O(N x D) arrays a
  stage holds in process memory (the k-NN bank, gathered neighbours, the evaluation logits), model and optimiser
  state kept on the CPU by CPU runs;
* shared, per node: files that every rank of a node memory-maps through the page cache (the decoded array cache,
  embeddings, the feature cache when it stays on the host) -- counted once per node, not per rank;
* GPU, per rank: weights, gradients, optimiser state (DDP; ZeRO-1/2 divide the optimiser state / gradients by the
  world size), DDP's gradient buckets, activations of the local batch, the k-NN bank, the feature cache when it
  fits in half the GPU (FeatureCache's rule).
Python, CUDA context (~0.5-1 GB per GPU process) and allocator slack are not counted.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch.autograd.graph import saved_tensors_hooks

from .config import Config

GB = 1e9
# Evaluation images per preset (published split sizes); data.max_eval_images caps them.
EVAL_IMAGES = {"imagenet1k": 50000, "imagenet200": 10000, "imagenet100": 5000, "imagenet50": 2500,
               "cifar10": 10000, "cifar20": 10000, "stl10": 8000, "fashion_mnist": 10000, "demo": 10000,
               "smoke": 10000}
NATIVE = {"idx": (1, 28), "cifar10": (3, 32), "cifar100": (3, 32), "cifar20": (3, 32), "stl10": (3, 96)}
FILE_NAME_BYTES = 48  # a relative ImageNet path ("train/n01440764/n01440764_10026.JPEG" is 38) + its label
GPU_MEMORY = 80 * GB  # an H100; the feature cache moves to the GPU when it needs at most half of it
DEFAULT_WORKERS_GPU = 8


@dataclass
class Item:
    what: str
    bytes: float
    formula: str
    where: str  # host | gpu | node (page cache shared by the ranks of a node)


@dataclass
class StagePlan:
    stage: str
    items: list[Item] = field(default_factory=list)

    def total(self, where: str) -> float:
        return sum(item.bytes for item in self.items if item.where == where)


def _model_facts(cfg: Config, channels: int, side: int) -> dict:
    """Parameters, feature size and saved-activation bytes per image of the backbone, counted on the meta device."""
    from .models import build
    from .models.backbones import build_backbone
    from .models.heads import ClusterHeads

    with torch.device("meta"):
        backbone = build_backbone(cfg.model.backbone, channels, cfg.model.width)
        simclr = build.simclr_model(cfg, channels)
        heads = ClusterHeads(backbone.out_dim, cfg.num_clusters, cfg.scan.num_heads, cfg.scan.head_hidden)
        images = torch.empty(1, channels, side, side)
    params = {id(p) for p in backbone.parameters()}
    saved: dict[int, int] = {}

    def pack(tensor):
        if id(tensor) not in params:
            saved[id(tensor)] = tensor.numel() * tensor.element_size()
        return tensor

    with saved_tensors_hooks(pack, lambda tensor: tensor):
        backbone(images)
    count = lambda module: sum(p.numel() for p in module.parameters())  # noqa: E731
    return {"params": count(backbone), "simclr_params": count(simclr), "head_params": count(heads),
            "dim": int(backbone.out_dim), "embed_dim": simclr.embedding_dim(cfg.mine.layer, cfg.mine.grid),
            "activation_bytes": float(sum(saved.values()))}


def dataset_facts(cfg: Config) -> dict:
    from .cluster import TRAIN_IMAGES

    train = TRAIN_IMAGES.get(cfg.name)
    evals = EVAL_IMAGES.get(cfg.name)
    if cfg.data.max_images:
        train = min(train or cfg.data.max_images, cfg.data.max_images)
    if cfg.data.max_eval_images:
        evals = min(evals or cfg.data.max_eval_images, cfg.data.max_eval_images)
    fmt = cfg.data.format
    channels, native = NATIVE.get(fmt, (3, 64))
    channels = cfg.data.channels or channels
    side = cfg.data.image_size or native
    return {"train": train, "eval": evals, "format": fmt, "array": fmt in NATIVE, "channels": channels,
            "side": side}


def plan_memory(cfg: Config, world: int, tasks_per_node: int, gpu: bool) -> dict:
    """The per-stage plan (or {"why": ...} when the dataset size is unknown for this config)."""
    data = dataset_facts(cfg)
    n, n_eval = data["train"], data["eval"]
    if n is None or n_eval is None:
        return {"why": "unknown dataset size (a custom dataset: the plan needs the preset's published size or "
                       "data.max_images and data.max_eval_images)"}
    c, s = data["channels"], data["side"]
    model = _model_facts(cfg, c, s)
    p, d = model["params"], model["dim"]
    heads, clusters = cfg.scan.num_heads, cfg.num_clusters
    workers = cfg.data.workers if cfg.data.workers is not None else (DEFAULT_WORKERS_GPU if gpu else 1)
    finish_on_device = gpu if cfg.data.finish_on == "auto" else cfg.data.finish_on == "device"
    pixel_bytes = 1 if finish_on_device else 4
    image = c * s * s
    stages = []

    def reader_items(count: int, what: str) -> list[Item]:
        if data["array"]:
            return [Item(f"{what} images, memory-mapped uint8 cache", count * image,
                         f"{count:,} x {c}x{s}x{s} B", "node"),
                    Item(f"{what} labels", count * 8, f"{count:,} x 8 B", "host")]
        return [Item(f"{what} file names + labels", count * FILE_NAME_BYTES, f"{count:,} x {FILE_NAME_BYTES} B",
                     "host")]

    def training_items(batch: int, views: int, optimizer: str, trained_params: int, with_images: bool = True):
        local = max(1, batch // world)
        states = 2 if optimizer == "adam" else 1
        zero = cfg.dist.zero_stage if cfg.dist.backend == "deepspeed" else 0
        grad_div = world if zero >= 2 else 1
        opt_div = world if zero >= 1 else 1
        where = "gpu" if gpu else "host"
        items = [Item("weights", trained_params * 4, f"{trained_params / 1e6:.2f} M params x 4 B", where),
                 Item("gradients" + (" (ZeRO-2 shard)" if grad_div > 1 else ""), trained_params * 4 / grad_div,
                      f"{trained_params / 1e6:.2f} M x 4 B / {grad_div}", where),
                 Item(f"{optimizer} state" + (" (ZeRO shard)" if opt_div > 1 else ""),
                      trained_params * 4 * states / opt_div, f"{trained_params / 1e6:.2f} M x {4 * states} B / {opt_div}",
                      where)]
        if cfg.dist.backend != "none" and world > 1 and zero == 0:
            items.append(Item("DDP gradient buckets", trained_params * 4, f"{trained_params / 1e6:.2f} M x 4 B", where))
        if with_images:
            items.append(Item(f"activations of {local} x {views} views (fp32 bound)",
                              local * views * model["activation_bytes"],
                              f"{local} x {views} x {model['activation_bytes'] / 1e6:.2f} MB", where))
            items.append(Item(f"prefetched batches ({workers} workers x {cfg.data.prefetch})",
                              max(1, workers) * cfg.data.prefetch * local * views * image * pixel_bytes,
                              f"{max(1, workers)} x {cfg.data.prefetch} x {local} x {views} x {image} x "
                              f"{pixel_bytes} B", "host"))
        return items

    if not cfg.model.pretrained and cfg.pretext.epochs > 0:
        stages.append(StagePlan("pretext", reader_items(n, "train") + training_items(
            cfg.pretext.batch_size, 2, cfg.pretext.optimizer, model["simclr_params"])))
    embed_dim = model["embed_dim"]
    stages.append(StagePlan("embed", reader_items(n, "train") + [
        Item("train embeddings (written by all ranks, memory-mapped)", n * embed_dim * 4,
             f"{n:,} x {embed_dim} x 4 B", "node")]))
    mined = (embed_dim if cfg.mine.features in ("pretext", "both") else 0) + \
        (min(cfg.mine.pca_dims, image) if cfg.mine.features in ("pixels", "both") else 0)
    bank = [Item("search space (written by all ranks, memory-mapped)", n * mined * 4, f"{n:,} x {mined} x 4 B",
                 "node"),
            Item("this rank's top-(k+1) lists", -(-n // world) * (cfg.mine.k + 1) * 8,
                 f"{-(-n // world):,} x {cfg.mine.k + 1} x 8 B", "host"),
            Item("neighbour lists (written by all ranks)", n * cfg.mine.k * 8, f"{n:,} x {cfg.mine.k} x 8 B", "node")]
    if gpu:
        bank.append(Item("k-NN bank on the device", n * mined * 4, f"{n:,} x {mined} x 4 B", "gpu"))
    stages.append(StagePlan("mine", bank))

    scan_items = [Item("neighbour lists (memory-mapped)", n * cfg.mine.k * 8, f"{n:,} x {cfg.mine.k} x 8 B", "node")]
    head_params = model["head_params"]
    if cfg.scan.mode == "full":
        scan_items += reader_items(n, "train") + training_items(cfg.scan.batch_size, 2, cfg.scan.optimizer,
                                                                p + head_params)
    else:
        views = cfg.scan.cached_views + 1 if cfg.scan.mode == "cached" else 1
        size = 2 if cfg.scan.mode == "cached" else 4
        table = n * views * d * size
        on_gpu = gpu and table <= 0.5 * GPU_MEMORY
        scan_items.append(Item(f"feature cache ({views} views, {'fp16' if size == 2 else 'fp32'})", table,
                               f"{n:,} x {views} x {d} x {size} B", "gpu" if on_gpu else "node"))
        scan_items += training_items(cfg.scan.batch_size, 2, cfg.scan.optimizer, head_params, with_images=False)
    from .stages.scan import selection_chunk
    chunk = selection_chunk(cfg.mine.eval_k, heads, clusters, n_eval)
    scan_items += [
        Item("evaluation logits of every head (memory-mapped)", n_eval * heads * clusters * 4,
             f"{n_eval:,} x {heads} x {clusters} x 4 B", "node"),
        Item("head selection, one chunk of (anchor, neighbour) pairs", 2 * chunk * cfg.mine.eval_k * heads * clusters * 4,
             f"2 x {chunk} x {cfg.mine.eval_k} x {heads} x {clusters} x 4 B", "host")]
    stages.append(StagePlan("scan", scan_items))

    if cfg.selflabel.enabled:
        # Self-labelling trains what the SCAN stage handed on: one head, or scan.ensemble_size of them (a tie may
        # hold every head: its size is known only once the heads are trained).
        size = heads if cfg.scan.ensemble_rank == "tie" else cfg.scan.ensemble_size
        kept = min(size, heads) if cfg.scan.select == "ensemble" else 1
        head_params = model["head_params"] // heads * kept
        if cfg.selflabel.mode == "cached":
            sl_items = [Item(f"feature cache ({cfg.selflabel.cached_views + 1} views, fp16)",
                             n * (cfg.selflabel.cached_views + 1) * d * 2,
                             f"{n:,} x {cfg.selflabel.cached_views + 1} x {d} x 2 B", "node")]
            sl_items += training_items(cfg.selflabel.batch_size, 1, cfg.selflabel.optimizer, head_params,
                                       with_images=False)
        else:
            sl_items = reader_items(n, "train") + training_items(cfg.selflabel.batch_size, 2, cfg.selflabel.optimizer,
                                                                 p + head_params)
        if cfg.selflabel.ema_decay > 0:
            sl_items.append(Item("EMA teacher", (p + head_params) * 4, "params x 4 B", "gpu" if gpu else "host"))
        stages.append(StagePlan("selflabel", sl_items))

    from .stages.evaluate import KMEANS_MAX_IMAGES, KMEANS_MAX_SIDE
    km = min(n_eval, KMEANS_MAX_IMAGES) * c * min(s, KMEANS_MAX_SIDE) ** 2 * 4
    stages.append(StagePlan("evaluate", reader_items(n_eval, "eval") + [
        Item("final logits + probabilities (rank 0)", 2 * n_eval * clusters * 4, f"2 x {n_eval:,} x {clusters} x 4 B",
             "host"),
        Item("k-means baseline pixels (rank 0, bounded sample)", km,
             f"{min(n_eval, KMEANS_MAX_IMAGES):,} x {c}x{min(s, KMEANS_MAX_SIDE)}^2 x 4 B", "host")]))

    return {"train_images": n, "eval_images": n_eval, "world_size": world, "tasks_per_node": tasks_per_node,
            "input": f"{c}x{s}x{s}", "backbone_params": p, "feature_dim": d,
            "activation_mb_per_image_fp32": round(model["activation_bytes"] / 1e6, 1),
            "stages": [{"stage": sp.stage, "host_gb_per_rank": round(sp.total("host") / GB, 3),
                        "gpu_gb_per_rank": round(sp.total("gpu") / GB, 3),
                        "page_cache_gb_per_node": round(sp.total("node") / GB, 3),
                        "items": [{"what": i.what, "gb": round(i.bytes / GB, 4), "formula": i.formula,
                                   "where": i.where} for i in sp.items]} for sp in stages]}


def format_memory_plan(mp: dict) -> str:
    if "why" in mp:
        return f"  memory plan: not available ({mp['why']})"
    lines = [f"  memory plan per rank ({mp['world_size']} ranks, {mp['tasks_per_node']} per node; "
             f"{mp['train_images']:,} train / {mp['eval_images']:,} eval images at {mp['input']}; backbone "
             f"{mp['backbone_params'] / 1e6:.2f} M params, {mp['feature_dim']}-d features, "
             f"{mp['activation_mb_per_image_fp32']} MB saved activations per image in fp32):",
             f"    {'stage':<10} {'host GB/rank':>12} {'GPU GB/rank':>12} {'page cache GB/node':>19}"]
    for st in mp["stages"]:
        lines.append(f"    {st['stage']:<10} {st['host_gb_per_rank']:>12.2f} {st['gpu_gb_per_rank']:>12.2f} "
                     f"{st['page_cache_gb_per_node']:>19.2f}")
        for item in st["items"]:
            lines.append(f"      {item['where']:<5} {item['gb']:>9.3f} GB  {item['what']}: {item['formula']}")
    return "\n".join(lines)
