"""The one configuration tree: dataclasses (with defaults and checks) <- preset YAML <- dotted CLI overrides.

Every stage reads its settings from the resolved `Config`; the resolved tree is written to the run folder as
`config.yaml`. Unknown keys and wrong types are errors that list the closest valid keys.
"""
from __future__ import annotations

import difflib
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, List, Optional

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from .data.augment import AugmentConfig
from .errors import ConfigError

PRESET_DIR = Path(__file__).parent / "presets"


@dataclass
class DataConfig:
    path: str = ""  # dataset root folder; "" lets the preset's default apply
    format: str = "auto"  # auto | idx | imagefolder | flat | imagenet | cifar10 | cifar100 | cifar20 | stl10
    image_size: Optional[int] = None  # side the network sees; None: native size for array formats, 64 for files
    resize_size: Optional[int] = None  # image files: shorter side after decoding, before the crop; None:
    #                                    image_size * 256/224 (the paper's ImageNet chain: 256, then 224 crops)
    channels: Optional[int] = None  # None: native channels (files: 1 when the probed headers are all grayscale)
    subset: Optional[str] = None  # imagenet50 | imagenet100 | imagenet200 (ImageNet layout only)
    on_bad_image: str = "fail"  # fail | skip (an unreadable file is replaced by a black image and counted)
    include_unlabeled: bool = False  # STL-10: add the unlabeled split to the training images
    max_images: Optional[int] = None  # keep a seeded random subset of the training images (tests, smoke runs)
    max_eval_images: Optional[int] = None  # same for the evaluation images
    mean: Optional[List[float]] = None  # per-channel normalisation mean; None: measured on the training images
    std: Optional[List[float]] = None  # per-channel normalisation std; None: measured on the training images
    cache_dir: Optional[str] = None  # array formats are decoded once into a uint8 .npy here; None:
    #                                  $SCAN_DIST_CACHE_DIR or ~/.cache/scan_dist
    workers: Optional[int] = None  # DataLoader worker processes per rank; None: min(8, CPUs/2) on CUDA, on CPU 0
    #                                for arrays and CPUs/4 (>= 1) for image files; 0 builds batches in the loop
    prefetch: int = 2  # batches each worker prepares ahead
    finish_on: str = "auto"  # where the float phase of augmentation runs: auto (device on CUDA, loader on CPU) |
    #                          loader | device
    backend: str = "auto"  # augmentation: auto (DALI when installed and on CUDA) | torchvision (batched torch) | dali

    def __post_init__(self):
        if self.on_bad_image not in ("fail", "skip"):
            raise ConfigError(f"data.on_bad_image must be 'fail' or 'skip', got {self.on_bad_image!r}")


@dataclass
class ModelConfig:
    backbone: str = "cnn_small"  # cnn_small | resnet18_cifar | resnet18_stl | resnet50
    width: int = 32  # base channel width of cnn_small
    projection_dim: int = 128  # SimCLR projection output size
    pretrained: Optional[str] = None  # checkpoint to start the backbone from (skips nothing by itself)
    channels_last: bool = True  # memory format for convolutions (faster on CPU and GPU)


@dataclass
class PretextConfig:
    epochs: int = 10
    batch_size: int = 512
    optimizer: str = "sgd"  # sgd | adam
    lr: float = 0.4
    weight_decay: float = 1e-4
    momentum: float = 0.9
    warmup_epochs: float = 0.0
    temperature: float = 0.1  # NT-Xent temperature
    min_lr_ratio: float = 0.001  # cosine schedule floor as a fraction of lr (paper: 0.1**3)
    min_steps: int = 0  # small datasets: run at least this many optimiser steps (epochs rise to reach it; 0: off)


@dataclass
class MineConfig:
    k: int = 20  # neighbours per image (the image itself excluded)
    features: str = "pretext"  # pretext | pixels | both: the space the neighbours are searched in
    layer: str = "projection"  # pretext embedding used: projection (SimCLR head output) | backbone (pooled) |
    #                            grid (the backbone's last feature map pooled to grid x grid cells, concatenated)
    grid: int = 2  # cells per side for layer=grid (out_dim x grid^2 dimensions)
    pca_dims: int = 64  # dimensions of the pixel PCA used by features=pixels|both
    pixel_weight: float = 1.0  # features=both: the pixel part's length against the pretext part's (both unit
    #                            vectors first), so the cosine weighs them 1 : pixel_weight^2
    backend: str = "auto"  # auto (Triton on CUDA, else torch) | torch | faiss | triton
    precision: str = "fp32"  # k-NN scores: fp32 | fp16 (Triton fast path: fp16 candidates, fp32 re-rank, still exact)
    eval_k: int = 5  # neighbours mined within the evaluation set (head selection only; no labels)
    mutual: bool = False  # keep a training neighbour j of i only when i is among j's k too (rows filled by repeating
    #                       those; a row with none keeps its list): what SCAN and self-labelling read. Demo: purer
    #                       pairs (0.834 against 0.821), −4.7 final ACC over two paired seeds (README)


@dataclass
class ScanConfig:
    mode: str = "full"  # full: backbone + heads on augmented views | head: heads only on frozen features |
    #                     cached: heads only, on frozen features of `cached_views` fixed augmented views (kind
    #                     scan.view) computed once into <run>/scan/cache (see stages/feature_cache.py)
    features: str = "backbone"  # what the heads read: backbone (the paper) | mined (the space the neighbours were
    #                              mined in: pretext embedding and/or pixel PCA, see models/mined_space.py)
    init: str = "pretext"  # backbone start: pretext (the paper) | random (the pretext then only mines); with
    #                        features=mined the pretext encoder is always loaded and this is ignored
    epochs: int = 10
    batch_size: int = 256
    optimizer: str = "adam"  # adam | sgd
    lr: float = 1e-4
    backbone_lr: Optional[float] = None  # None: same as lr
    weight_decay: float = 1e-4
    momentum: float = 0.9
    num_heads: int = 5
    head_hidden: int = 0  # 0: each cluster head is one linear layer; >0: an MLP with this hidden size
    entropy_weight: float = 5.0
    view: str = "simclr"  # augmentation of anchor and neighbour: simclr | strong | weak | eval
    loss_backend: str = "auto"  # SCAN loss implementation: auto (Triton on CUDA, else torch) | triton | torch
    select: str = "loss"  # what is kept, without labels: loss (the head with the lowest SCAN loss on the evaluation
    #                        images: the paper) | consensus (the head that agrees most with the others) | ensemble
    #                        (the ensemble_size most agreeing heads, aligned and averaged; see head_consensus.py) |
    #                        tie (of the heads whose loss the evaluation images cannot tell from the lowest, within
    #                        tie_z paired standard errors, the one that agrees most with the other heads)
    ensemble_size: int = 10  # heads averaged by select=ensemble (at most num_heads; degenerate heads never join;
    #                          not used with ensemble_rank=tie, whose tie sets the size)
    ensemble_rank: str = "agreement"  # which heads select=ensemble averages: agreement (the most agreeing, onto the
    #                                    medoid's clusters) | loss (the lowest selection losses, onto the lowest's) |
    #                                    tie (select=tie's tie, onto its lowest-loss head)
    select_entropy_weight: float = 1.0  # weight of the entropy in the head-selection loss (paper: 1)
    tie_z: float = 2.0  # select=tie: a head ties with the lowest-loss one when its loss is within tie_z standard
    #                      errors of their paired per-image difference (0: only equal losses tie, the loss rule)
    cached_views: int = 4  # mode=cached: augmented views stored per image (anchors and neighbours draw one of
    #                         them per step); 0 trains on the un-augmented features only (like mode=head)
    min_steps: int = 0  # small datasets: run at least this many optimiser steps (epochs rise to reach it; 0: off)
    candidate_heads: int = 0  # > num_heads: start this many heads and, after screen_fraction of the steps, go on
    #                            with the num_heads whose SCAN loss on the evaluation images is lowest (the select=loss
    #                            rule, applied early: no label); 0: off. mode=head|cached only (README, "Measured")
    screen_fraction: float = 0.15  # share of the stage's epochs the candidate heads train before the screen


@dataclass
class SelfLabelConfig:
    enabled: bool = True
    epochs: int = 5
    batch_size: int = 512
    optimizer: str = "adam"
    lr: float = 1e-4
    weight_decay: float = 1e-4
    momentum: float = 0.9
    threshold: float = 0.99  # a sample becomes a pseudo-label when its max probability exceeds this
    class_balance: bool = True  # average the cross-entropy per pseudo-class
    ema_decay: float = 0.0  # >0: pseudo-labels come from an EMA teacher with this decay
    view: str = "strong"  # augmentation the student is trained on: strong | simclr | weak
    teacher_flip: bool = False  # mode=full: pseudo-labels from the teacher's softmax averaged over the weak view and
    #                             its mirror image (needs augment.flip); demo: +0.1 ± 0.2 on 3 paired seeds, +45 s (README)
    mode: str = "full"  # full: backbone + head | cached: head only, on a frozen backbone's cached features
    cached_views: int = 4  # mode=cached: fixed augmented (selflabel.view) views per image in the cache
    min_steps: int = 0  # small datasets: run at least this many optimiser steps (epochs rise to reach it; 0: off)


@dataclass
class DistConfig:
    """How the training stages run over processes. Launch N processes with torchrun (or SLURM); batch sizes are
    global and must divide by N. N processes train on exactly the batches one process would."""

    backend: str = "none"  # none | ddp | deepspeed; ddp/deepspeed also run in one process
    zero_stage: int = 0  # DeepSpeed ZeRO stage 0 | 1 | 2 (optimizer state / gradients sharded over ranks)
    precision: str = "fp32"  # fp32 | bf16 | fp16 autocast for the training forward passes
    grad_clip: float = 0.0  # >0: clip the global gradient norm to this value
    timeout_s: int = 600  # collective timeout: a dead rank fails the job after this long instead of hanging it
    sync_batchnorm: bool = True  # BatchNorm statistics over the global batch (as one process computes them)


@dataclass
class SlurmConfig:
    """Resources for `--nodes N` (SLURM through submitit). Unset (null) fields come from the cluster profile
    `slurm/profiles/<profile>.yaml` (or a YAML file path); set ones override it."""

    profile: str = "default"  # a profile name in slurm/profiles, or a path to a profile YAML
    partition: Optional[str] = None
    account: Optional[str] = None
    qos: Optional[str] = None
    constraint: Optional[str] = None
    exclusive: Optional[bool] = None
    gpus_per_node: Optional[int] = None  # also --gpus-per-node; one task per GPU
    tasks_per_node: Optional[int] = None  # default: gpus_per_node (1 when the nodes have no GPU)
    cpus_per_task: Optional[int] = None
    mem_gb: Optional[float] = None  # per node
    time_min: Optional[int] = None  # time limit per job; a job that reaches it checkpoints and requeues itself
    signal_delay_s: Optional[int] = None  # SLURM warns (USR2) this long before the time limit
    max_requeues: Optional[int] = None  # requeues on time limit before giving up (preemptions do not count)
    extra_sbatch: Optional[List[str]] = None  # more "#SBATCH" flags, e.g. ["--mail-type=END", "--reservation=x"]
    setup: Optional[List[str]] = None  # shell lines run before the tasks start (module load, conda activate)


@dataclass
class RunConfig:
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda
    threads: Optional[int] = None  # torch intra-op threads; None: torch default
    checkpoint_every_steps: int = 200  # stage checkpoints (resume after a kill)
    checkpoint_every_min: float = 30.0  # also checkpoint when this much time passed since the last one (0: off)
    progress: bool = True  # tqdm progress bars
    eval_batch_size: Optional[int] = None  # inference batch; None: by input size (1024 at 32 px, 32 at 224 px on
    #                                        CPU; 8x that on CUDA), so large images do not exhaust host memory
    baseline: bool = True  # compute the k-means-on-pixels baseline in the evaluate stage
    tune_malloc: bool = True  # CPU runs on glibc: keep freed host memory for reuse (host_memory.py)
    monitor_labels: bool = False  # history: each SCAN/self-label epoch also scores the heads against the labels
    #                               (diagnostic only: training is bit-identical either way)
    tensorboard: bool = False  # also write the history's scalars to RUN_DIR/tb/ (needs `pip install -e .[tensorboard]`)
    start_from: Optional[str] = None  # a run folder (or a --seeds folder: its seed<S>) whose finished stages with the
    #                                   same settings are copied in first, so only what changed runs (run_fork.py)
    deterministic: bool = False  # CUDA: deterministic algorithms (cuDNN, cuBLAS, scatter), so a GPU run repeats
    #                               itself bit for bit, at some speed (reproducibility.py); CPU runs already do
    kernel_self_check: bool = True  # CUDA: check each Triton kernel against its torch reference at first use and
    #                                 fall back to torch (with one warning) on a mismatch or error
    cpu_kernels: str = "native"  # native: the processor's widest CPU kernels | avx2: torch, oneDNN and MKL limited to
    #                              AVX2, so a seed gives the same digits on x86 CPUs with and without AVX-512
    #                              (reproducibility.py; the launcher restarts itself with the limit in place)


@dataclass
class Config:
    name: str = "custom"
    num_clusters: int = 10
    data: DataConfig = field(default_factory=DataConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)  # fields documented in data/augment.py
    model: ModelConfig = field(default_factory=ModelConfig)
    pretext: PretextConfig = field(default_factory=PretextConfig)
    mine: MineConfig = field(default_factory=MineConfig)
    scan: ScanConfig = field(default_factory=ScanConfig)
    selflabel: SelfLabelConfig = field(default_factory=SelfLabelConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    slurm: SlurmConfig = field(default_factory=SlurmConfig)
    run: RunConfig = field(default_factory=RunConfig)


_CHOICES = {
    "data.backend": ("auto", "torchvision", "dali"),
    "data.finish_on": ("auto", "loader", "device"),
    "data.format": ("auto", "idx", "imagefolder", "flat", "imagenet", "cifar10", "cifar100", "cifar20", "stl10"),
    "model.backbone": ("cnn_small", "resnet18_cifar", "resnet18_stl", "resnet50"),
    "pretext.optimizer": ("sgd", "adam"),
    "mine.features": ("pretext", "pixels", "both"),
    "mine.backend": ("auto", "torch", "faiss", "triton"),
    "mine.precision": ("fp32", "fp16"),
    "mine.layer": ("projection", "backbone", "grid"),
    "scan.mode": ("full", "head", "cached"),
    "scan.init": ("pretext", "random"),
    "scan.features": ("backbone", "mined"),
    "scan.optimizer": ("sgd", "adam"),
    "scan.loss_backend": ("auto", "triton", "torch"),
    "scan.view": ("simclr", "strong", "weak", "eval"),
    "scan.select": ("consensus", "loss", "ensemble", "tie"),
    "scan.ensemble_rank": ("agreement", "loss", "tie"),
    "selflabel.optimizer": ("sgd", "adam"),
    "selflabel.mode": ("full", "cached"),
    "selflabel.view": ("strong", "simclr", "weak"),
    "dist.backend": ("none", "ddp", "deepspeed"),
    "dist.zero_stage": (0, 1, 2),
    "dist.precision": ("fp32", "bf16", "fp16"),
    "run.device": ("auto", "cpu", "cuda"),
    "run.cpu_kernels": ("native", "avx2"),
}


def available_presets() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def _flat_keys(node: Any, prefix: str = "") -> list[str]:
    keys = []
    for key, value in node.items():
        full = f"{prefix}{key}"
        keys.append(full)
        if isinstance(value, dict):
            keys.extend(_flat_keys(value, full + "."))
    return keys


_VALID_KEYS = _flat_keys(OmegaConf.to_container(OmegaConf.structured(Config)))


def _unknown_key_error(key: str, where: str) -> ConfigError:
    close = difflib.get_close_matches(key, _VALID_KEYS, n=5, cutoff=0.5)
    if not close:  # fall back to keys of the same section, then to the top level
        section = key.split(".")[0] + "."
        close = [k for k in _VALID_KEYS if k.startswith(section)][:8] or [k for k in _VALID_KEYS if "." not in k]
    return ConfigError(f"unknown config key {key!r} in {where}; close valid keys: {', '.join(close)}")


def _check_keys(tree: dict, where: str, prefix: str = "") -> None:
    for key, value in tree.items():
        full = f"{prefix}{key}"
        if full not in _VALID_KEYS:
            raise _unknown_key_error(full, where)
        if isinstance(value, dict) and f"{full}." in {k[: len(full) + 1] for k in _VALID_KEYS}:
            _check_keys(value, where, full + ".")


def _load_yaml(path: Path, seen: tuple = ()) -> dict:
    """A preset may start from another with `_base_: NAME`; the chain is merged base-first."""
    try:
        tree = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"{path}: a config file must hold a mapping of keys")
    base = tree.pop("_base_", None)
    if base is None:
        return tree
    if base in seen:
        raise ConfigError(f"{path}: _base_ cycle through {base!r}")
    base_tree = _load_yaml(_resolve_preset_path(base), seen + (base,))
    return OmegaConf.to_container(OmegaConf.merge(base_tree, tree))


def _resolve_preset_path(name_or_path: str) -> Path:
    candidate = Path(name_or_path)
    if candidate.suffix in (".yaml", ".yml"):
        if not candidate.is_file():
            raise ConfigError(f"config file {name_or_path} does not exist")
        return candidate
    preset = PRESET_DIR / f"{name_or_path}.yaml"
    if not preset.is_file():
        close = difflib.get_close_matches(name_or_path, available_presets(), n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise ConfigError(
            f"unknown preset {name_or_path!r}{hint}; presets: {', '.join(available_presets())}; or pass a .yaml file"
        )
    return preset


def _parse_override(item: str) -> tuple[str, Any]:
    if "=" not in item:
        raise ConfigError(f"override {item!r} must look like key=value (e.g. scan.epochs=20)")
    key, raw = item.split("=", 1)
    key = key.strip()
    if key not in _VALID_KEYS:
        raise _unknown_key_error(key, "the command line")
    value = yaml.safe_load(raw) if raw != "" else ""
    return key, value


def _set_dotted(tree: dict, key: str, value: Any) -> None:
    node = tree
    parts = key.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value


def load_config(preset_or_yaml: str, overrides: list[str] | None = None) -> Config:
    """Build the resolved Config: dataclass defaults <- preset (with its _base_ chain) <- key=value overrides."""
    path = _resolve_preset_path(preset_or_yaml)
    tree = _load_yaml(path)
    _check_keys(tree, str(path))
    given = set()
    for item in overrides or []:
        key, value = _parse_override(item)
        _set_dotted(tree, key, value)
        given.add(key)
    if "data.path" in given and "data.format" not in given:
        # A preset's data.format describes the preset's own data: pointed elsewhere, detect the format again.
        _set_dotted(tree, "data.format", "auto")
    try:
        merged = OmegaConf.merge(OmegaConf.structured(Config), tree)
        cfg: Config = OmegaConf.to_object(merged)
    except OmegaConfBaseException as exc:
        key = getattr(exc, "full_key", None) or "?"
        message = str(exc).splitlines()[0]
        raise ConfigError(f"bad value for {key}: {message}") from None
    except ValueError as exc:  # AugmentConfig.__post_init__ is the one section check raising ValueError
        raise ConfigError(f"bad value: augment.{exc}") from None
    validate(cfg)
    return cfg


def validate(cfg: Config) -> None:
    """Cross-field checks that a single dataclass cannot make."""
    as_dict = to_dict(cfg)
    for key, choices in _CHOICES.items():
        section, name = key.split(".")
        value = as_dict[section][name]
        if value not in choices:
            raise ConfigError(f"{key} must be one of {', '.join(map(str, choices))}; got {value!r}")
    if cfg.num_clusters < 2:
        raise ConfigError(f"num_clusters must be at least 2; got {cfg.num_clusters}")
    positive = {
        "pretext.batch_size": cfg.pretext.batch_size,
        "scan.batch_size": cfg.scan.batch_size,
        "selflabel.batch_size": cfg.selflabel.batch_size,
        "scan.num_heads": cfg.scan.num_heads,
        "mine.k": cfg.mine.k,
        "mine.grid": cfg.mine.grid,
        "run.eval_batch_size": cfg.run.eval_batch_size if cfg.run.eval_batch_size is not None else 1,
    }
    for key, value in positive.items():
        if value < 1:
            raise ConfigError(f"{key} must be at least 1; got {value}")
    non_negative = {"pretext.epochs": cfg.pretext.epochs, "scan.epochs": cfg.scan.epochs,
                    "selflabel.epochs": cfg.selflabel.epochs, "scan.tie_z": cfg.scan.tie_z}
    for key, value in non_negative.items():
        if value < 0:
            raise ConfigError(f"{key} must be >= 0; got {value}")
    if not cfg.mine.pixel_weight > 0:
        raise ConfigError(f"mine.pixel_weight must be > 0; got {cfg.mine.pixel_weight}")
    if not 0.0 < cfg.selflabel.threshold < 1.0:
        raise ConfigError(f"selflabel.threshold must be in (0, 1); got {cfg.selflabel.threshold}")
    if not 0.0 <= cfg.selflabel.ema_decay < 1.0:
        raise ConfigError(f"selflabel.ema_decay must be in [0, 1); got {cfg.selflabel.ema_decay}")
    if cfg.selflabel.teacher_flip and not (cfg.selflabel.mode == "full" and cfg.selflabel.ema_decay > 0
                                           and cfg.augment.flip):
        raise ConfigError("selflabel.teacher_flip=true needs selflabel.mode=full, selflabel.ema_decay > 0 and "
                          f"augment.flip=true; got mode={cfg.selflabel.mode}, ema_decay={cfg.selflabel.ema_decay}, "
                          f"augment.flip={cfg.augment.flip}")
    if cfg.data.image_size is not None and cfg.data.image_size < 8:
        raise ConfigError(f"data.image_size must be at least 8; got {cfg.data.image_size}")
    if cfg.data.resize_size is not None and cfg.data.resize_size < (cfg.data.image_size or 8):
        raise ConfigError(f"data.resize_size={cfg.data.resize_size} must be at least data.image_size")
    if cfg.data.workers is not None and cfg.data.workers < 0:
        raise ConfigError(f"data.workers must be >= 0 (0: build batches in the training loop); got {cfg.data.workers}")
    if cfg.data.prefetch < 1:
        raise ConfigError(f"data.prefetch must be at least 1; got {cfg.data.prefetch}")
    if cfg.data.channels not in (None, 1, 3):
        raise ConfigError(f"data.channels must be 1 or 3; got {cfg.data.channels}")
    if cfg.scan.mode in ("head", "cached") and cfg.scan.init == "random":
        raise ConfigError("scan.init=random needs scan.mode=full: frozen random features cannot be clustered")
    if cfg.scan.candidate_heads:
        if cfg.scan.candidate_heads <= cfg.scan.num_heads:
            raise ConfigError(f"scan.candidate_heads={cfg.scan.candidate_heads} must exceed scan.num_heads="
                              f"{cfg.scan.num_heads} (or be 0: no screen)")
        if cfg.scan.mode == "full":
            raise ConfigError("scan.candidate_heads needs scan.mode=head or cached: with mode=full every head shares "
                              "the backbone it trains, so a screened-out head has already moved it")
        if not 0.0 < cfg.scan.screen_fraction < 1.0:
            raise ConfigError(f"scan.screen_fraction must be in (0, 1); got {cfg.scan.screen_fraction}")
    if cfg.scan.cached_views < 0:
        raise ConfigError(f"scan.cached_views must be >= 0; got {cfg.scan.cached_views}")
    if cfg.selflabel.mode == "cached" and cfg.selflabel.cached_views < 1:
        raise ConfigError(f"selflabel.cached_views must be at least 1 with selflabel.mode=cached; "
                          f"got {cfg.selflabel.cached_views}")
    if cfg.dist.zero_stage and cfg.dist.backend != "deepspeed":
        raise ConfigError(f"dist.zero_stage={cfg.dist.zero_stage} needs dist.backend=deepspeed")
    if cfg.dist.timeout_s < 1:
        raise ConfigError(f"dist.timeout_s must be at least 1; got {cfg.dist.timeout_s}")


def to_dict(cfg: Config) -> dict:
    return OmegaConf.to_container(OmegaConf.structured(cfg))


def to_yaml(cfg: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def section_hash(*parts: Any) -> str:
    """A short stable hash of config sections (and upstream hashes): a stage's identity for skip/resume."""
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]
