"""`run.start_from` (`--from RUN_DIR`): begin a run with another run's finished stages, so an ablation reruns only
what its change touches.

Every stage's `DONE` marker carries the hash of its settings chained with its upstream stages' (pipeline.py). A new
run folder started from a source run gets a copy of the source's stage folders, in pipeline order, for as long as
their hashes equal the new config's; the first stage that differs, and everything after it, runs in the new folder.
`python -m scan_dist.launch --from runs/demo --run-dir runs/demo_ent8 demo scan.entropy_weight=8` thus copies
pretext, embed and mine and trains only the SCAN heads onward. With `--seeds`, a source made by `--seeds` is read
per seed (`SOURCE/seed<S>`), so a paired ablation over seeds is one command.

Files are copied, not hard-linked: a stage that later rebuilds a file in place (a memory-mapped cache opened for
writing) must never reach into the source run. The evaluate stage is never copied (it writes the run folder's own
metrics, report and plots, in seconds). A stage folder already finished in the new folder with the same hash is
left as it is, so rerunning the command resumes instead of copying again; a half-done one is replaced by the
source's finished copy. The copied stages' points of `history.jsonl` come along, so the curves stay whole.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from .config import Config
from .errors import ConfigError
from .history import HISTORY_FILE, read_history
from .io_utils import write_json, write_text
from .pipeline import accepted_hashes, active_stages, finished, stage_hashes

NEVER_COPIED = ("evaluate",)


def source_folder(cfg: Config) -> Path | None:
    """The run folder to copy from (`SOURCE/seed<run.seed>` when SOURCE is a `--seeds` folder), checked."""
    if not cfg.run.start_from:
        return None
    source = Path(cfg.run.start_from)
    per_seed = source / f"seed{cfg.run.seed}"
    if not (source / "config.yaml").is_file() and (per_seed / "config.yaml").is_file():
        source = per_seed
    if not source.is_dir():
        raise ConfigError(f"run.start_from={cfg.run.start_from}: no such folder")
    if not (source / "config.yaml").is_file():
        raise ConfigError(f"run.start_from={cfg.run.start_from}: not a run folder (no config.yaml there, nor in "
                          f"{per_seed.name}/ for run.seed={cfg.run.seed})")
    return source


def stages_to_copy(cfg: Config, run_dir: Path) -> list[str]:
    """The stages the next launch copies from the source: the source's leading stages whose hashes match, less those
    the run folder already has finished with the same hash."""
    return _source_and_stages(cfg, run_dir)[1]


def _source_and_stages(cfg: Config, run_dir: Path) -> tuple[Path | None, list[str]]:
    try:
        source = source_folder(cfg)
    except ConfigError:
        if (Path(run_dir) / "config.yaml").is_file():  # a started run whose source is gone since: it goes on alone
            return None, []
        raise
    if source is None:
        return None, []
    if source.resolve() == Path(run_dir).resolve():
        raise ConfigError(f"run.start_from={cfg.run.start_from} is the run folder itself; give another --run-dir")
    in_source, here, chosen = accepted_hashes(cfg, source), accepted_hashes(cfg, run_dir), []
    for name in active_stages(cfg):
        if name in NEVER_COPIED or not finished(source, name, in_source[name]):
            break
        if not finished(run_dir, name, here[name]):
            chosen.append(name)
    return source, chosen


def copy_stages(cfg: Config, run_dir: Path, log) -> list[str]:
    """Copy `stages_to_copy` into the run folder (rank 0, before the pipeline plans). Returns their names."""
    source, names = _source_and_stages(cfg, run_dir)
    if not names:
        if cfg.run.start_from:
            log.info("run.start_from=%s: no stage to copy (the folder is gone, none of its stages matches this "
                     "config, or they are all here already)", cfg.run.start_from)
        return []
    run_dir, hashes = Path(run_dir), stage_hashes(cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    for name in names:
        staging = run_dir / f".{name}.copying"  # a kill mid-copy leaves this, never a half-copied stage folder
        shutil.rmtree(staging, ignore_errors=True)
        shutil.copytree(source / name, staging, ignore=shutil.ignore_patterns("checkpoint.pt", "checkpoint_shards"))
        marker = json.loads((staging / "DONE").read_text())
        marker["artifacts"] = {key: _moved(path, source, run_dir) for key, path in marker.get("artifacts", {}).items()}
        marker["copied_from"] = str(source / name)
        # The copy is finished with this config's settings (checked above), so it carries today's hash, also when
        # the source wrote an older version's (pipeline.accepted_hashes): the new folder's config cannot vouch for that.
        marker["config_hash"] = hashes[name]
        write_json(staging / "DONE", marker)
        shutil.rmtree(run_dir / name, ignore_errors=True)
        os.replace(staging, run_dir / name)
    _copy_history(source, run_dir, set(names))
    log.info("run.start_from: copied %s from %s (same settings); the rest runs here", ", ".join(names), source)
    return names


def _moved(path: str, source: Path, run_dir: Path) -> str:
    try:
        return str(run_dir / Path(path).relative_to(source))
    except ValueError:  # recorded relative to another working directory: leave it as it was
        return path


def _copy_history(source: Path, run_dir: Path, names: set[str]) -> None:
    kept = [point for point in read_history(run_dir) if point["stage"] not in names]
    copied = [point for point in read_history(source) if point["stage"] in names]
    if copied:
        write_text(run_dir / HISTORY_FILE, "".join(json.dumps(point) + "\n" for point in copied + kept))
