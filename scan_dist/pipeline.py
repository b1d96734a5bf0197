"""The stage graph: pretext -> embed -> mine -> scan -> selflabel -> evaluate, with skip and resume.

Each stage's identity is a hash of the config sections it reads chained with its upstream stage's hash. A stage
whose `DONE` marker carries the same hash is skipped; any change upstream re-runs it and everything after it.
A stage killed half-way resumes from its own checkpoint (see trainer.py). After the last stage the run folder gets
`metrics.json` and `report.md` built from every stage's marker.

With N processes every rank runs every stage (the run folder must be on a filesystem all ranks see); rank 0 decides
the plan, writes the markers and reports, and the others wait for it at a barrier after each stage.
"""
from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable, Mapping

import torch

from . import reproducibility, run_report
from .config import Config, load_config, section_hash
from .context import RunContext
from .curves import write_curves_png
from .data import sampling
from .distributed import comm
from .errors import ConfigError
from .io_utils import write_json
from .stage_keys import LEGACY_STAGE_KEYS, STAGE_KEYS, settings_of
from .stages import embed, evaluate, mine, pretext, scan, selflabel


STAGES: dict[str, Callable] = {
    "pretext": pretext.run,
    "embed": embed.run,
    "mine": mine.run,
    "scan": scan.run,
    "selflabel": selflabel.run,
    "evaluate": evaluate.run,
}


# What each stage leaves in the run folder (for the --dry-run plan).
STAGE_ARTIFACTS = {
    "pretext": ["pretext/model.pt"],
    "embed": ["embed/train.npy", "embed/eval.npy"],
    "mine": ["mine/train_neighbors.npy", "mine/eval_neighbors.npy", "mine/pca.pt (mine.features=pixels|both)"],
    "scan": ["scan/model.pt"],
    "selflabel": ["selflabel/model.pt"],
    "evaluate": ["assignments.csv", "confusion.png", "prototypes.png", "metrics.json", "report.md"],
}


def stage_hashes(cfg: Config, table: Mapping[str, tuple[str, ...]] = STAGE_KEYS) -> dict[str, str]:
    """Each stage's hash: its settings in `table` and the hash of the stage before it."""
    tree, hashes, upstream = asdict(cfg), {}, ""
    for name in STAGES:  # run.seed is in pretext's keys, so every hash carries it
        settings = settings_of(tree, name, table)
        upstream = hashes[name] = section_hash(name, sorted(settings.items()), upstream)
    return hashes


def accepted_hashes(cfg: Config, folder: Path) -> dict[str, tuple[str, ...]]:
    """The DONE-marker hashes in `folder` that count as finished with `cfg`, per stage.

    Today's hash; and the hash a version before the augmentation split (stage_keys.LEGACY_STAGE_KEYS) wrote for the
    same settings: that of `cfg` itself, and that of the folder's own config.yaml when its settings for the stage
    are today's (so `--from` an older run honours the split: a strong-view change copies its SimCLR stage). Legacy
    keys cover every setting today's do, upstream included, so a legacy match never keeps a stage that changed."""
    current, legacy = stage_hashes(cfg), stage_hashes(cfg, LEGACY_STAGE_KEYS)
    accepted = {name: {current[name], legacy[name]} for name in STAGES}
    recorded = _recorded_config(folder)
    if recorded is not None:
        recorded_now, recorded_legacy = stage_hashes(recorded), stage_hashes(recorded, LEGACY_STAGE_KEYS)
        for name in STAGES:
            if recorded_now[name] == current[name]:
                accepted[name].add(recorded_legacy[name])
    return {name: tuple(sorted(hashes)) for name, hashes in accepted.items()}


def _recorded_config(folder: Path) -> Config | None:
    """The config a run folder records (config.yaml), or None when it has none this version can read."""
    path = Path(folder) / "config.yaml"
    if not path.is_file():
        return None
    try:
        return load_config(str(path))
    except (ConfigError, ValueError, TypeError, OSError):  # a config of another version: only exact hashes count
        return None


def upgrade_legacy_markers(run_dir: Path) -> list[str]:
    """Rewrite the DONE markers that carry the legacy hash (stage_keys.LEGACY_STAGE_KEYS) of the folder's own
    config.yaml to today's hash of that config; the stages rewritten. Called before a launch replaces config.yaml,
    which is what lets accepted_hashes recognise them; the old hash stays in the marker as `legacy_config_hash`."""
    recorded = _recorded_config(run_dir)
    if recorded is None:
        return []
    now, legacy, upgraded = stage_hashes(recorded), stage_hashes(recorded, LEGACY_STAGE_KEYS), []
    for name in STAGES:
        marker = read_marker(run_dir, name)
        if marker is not None and marker.get("config_hash") == legacy[name] != now[name]:
            write_json(Path(run_dir) / name / "DONE", {**marker, "config_hash": now[name],
                                                        "legacy_config_hash": legacy[name]})
            upgraded.append(name)
    return upgraded


def init_seed(cfg: Config, stage: str) -> int:
    """The seed of a stage's model initialisation: a function of (run.seed, stage) only, so changing a setting
    changes what the setting changes and not every initial weight as well (a one-setting ablation compares like
    with like; seeding by the stage hash re-rolled every head when, say, scan.select changed)."""
    return sampling.stream_key(cfg.run.seed, f"init/{stage}") % (2**63)


def active_stages(cfg: Config) -> list[str]:
    return [name for name in STAGES if name != "selflabel" or cfg.selflabel.enabled]


def read_marker(run_dir: Path, stage: str) -> dict | None:
    path = run_dir / stage / "DONE"
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        return None


def finished(run_dir: Path, stage: str, accepted: tuple[str, ...]) -> bool:
    """Whether the run folder holds this stage finished with exactly these settings: its DONE marker's hash is one
    of `accepted` (accepted_hashes(cfg, run_dir)[stage])."""
    marker = read_marker(run_dir, stage)
    return marker is not None and marker.get("config_hash") in accepted


def plan(cfg: Config, run_dir: Path) -> list[tuple[str, str]]:
    """(stage, 'run' | 'skip (done)') for each active stage, as the next launch would do it."""
    hashes, rows, rerun = accepted_hashes(cfg, run_dir), [], False
    for name in active_stages(cfg):
        done = not rerun and finished(run_dir, name, hashes[name])
        rerun = rerun or not done
        rows.append((name, "skip (done)" if done else "run"))
    return rows


def run_pipeline(ctx: RunContext) -> dict:
    cfg, run_dir = ctx.cfg, ctx.run_dir
    hashes = stage_hashes(cfg)
    seconds: dict[str, float] = {}
    stage_metrics: dict[str, dict] = {}
    machines: dict[str, dict | None] = {}
    for name, action in comm.broadcast_object(plan(cfg, run_dir)):  # every rank follows rank 0's plan
        if action == "run":
            if ctx.is_main:
                (run_dir / name / "DONE").unlink(missing_ok=True)  # a re-run stage is not done until it finishes
            ctx.log.info("stage %s: running", name)
            # Model initialisation draws from torch's generator, seeded the same on every rank; the data's
            # randomness never touches it (counter-based streams, data/sampling.py).
            torch.manual_seed(init_seed(cfg, name))
            start = time.perf_counter()
            result = STAGES[name](cfg, ctx, hashes[name])
            if name in ctx.stage_stats:  # data wait, skipped images
                result.setdefault("metrics", {}).update(ctx.stage_stats[name])
            elapsed = time.perf_counter() - start
            comm.barrier()
            if ctx.is_main:
                # DONE first: a kill between the two leaves a finished stage with a spare checkpoint, never a
                # stage whose checkpoint is gone but which is not marked done.
                write_json(run_dir / name / "DONE", {"config_hash": hashes[name], "seconds": elapsed,
                                                     "machine": reproducibility.machine(ctx.device), **result})
                (run_dir / name / "checkpoint.pt").unlink(missing_ok=True)
                shutil.rmtree(run_dir / name / "checkpoint_shards", ignore_errors=True)
            comm.barrier()
            ctx.log.info("stage %s: done in %.1f s", name, elapsed)
        else:
            ctx.log.info("stage %s: skipped (done with the same config)", name)
        marker = read_marker(run_dir, name)
        seconds[name] = marker["seconds"]
        stage_metrics[name] = {"seconds": marker["seconds"], **marker.get("metrics", {})}
        machines[name] = marker.get("machine")  # None for a stage finished by an older version
    return summarize(ctx, seconds, stage_metrics, machines)


def summarize(ctx: RunContext, seconds: dict, stage_metrics: dict, machines: dict) -> dict:
    cfg, run_dir = ctx.cfg, ctx.run_dir
    evaluation = stage_metrics["evaluate"]
    final = evaluation["final"]
    summary = {
        "acc": final.get("acc"), "nmi": final.get("nmi"), "ari": final.get("ari"), "ami": final.get("ami"),
        "final": final,
        "baseline_kmeans_pixels": evaluation.get("kmeans_pixels"),
        "stages": stage_metrics,
        "seconds": {**seconds, "total": sum(seconds.values())},
        "preset": cfg.name,
        "world_size": comm.world_size(),
        "machines": machines,  # per stage: where it ran (the same seed repeats only on the same kind)
    }
    if not ctx.is_main:
        return summary
    write_json(run_dir / "metrics.json", summary)
    config_summary = {"preset": cfg.name, "num_clusters": cfg.num_clusters, "data.path": cfg.data.path,
                      "model.backbone": cfg.model.backbone, "pretext.epochs": cfg.pretext.epochs,
                      "mine.k": cfg.mine.k, "mine.features": cfg.mine.features, "scan.mode": cfg.scan.mode,
                      "scan.epochs": cfg.scan.epochs, "scan.num_heads": cfg.scan.num_heads,
                      "selflabel.enabled": cfg.selflabel.enabled, "selflabel.epochs": cfg.selflabel.epochs,
                      "seed": cfg.run.seed}
    has_curves = write_curves_png(run_dir / "curves.png", run_dir)
    run_report.write_report_md(run_dir / "report.md", {**final, "stages": _numeric_stage_metrics(stage_metrics)},
                           seconds, config_summary, evaluation.get("kmeans_pixels"), curves=has_curves)
    return summary


def _numeric_stage_metrics(stage_metrics: dict) -> dict:
    """Only the scalar entries of each stage's metrics, for the report's per-stage table (the evaluation's own
    scores and baseline have their table already)."""
    out = {}
    for stage, values in stage_metrics.items():
        if stage == "evaluate":
            values = {"scan_heads": values.get("scan_heads", {}), "num_images": values.get("num_images")}
        flat = {}
        for key, value in values.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                flat[key] = value
            elif isinstance(value, dict):
                flat.update({f"{key}.{k}": v for k, v in value.items()
                             if isinstance(v, (int, float)) and not isinstance(v, bool)})
        out[stage] = flat
    return out
