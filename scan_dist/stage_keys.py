"""Which settings change which stage's result: the one list the stage hashes and the run comparison both read.

A stage's hash (pipeline.py) covers its settings here and its upstream stage's hash, so changing one reruns the
stage and everything after it; every other setting (threads, loader workers, progress bars, checkpoint cadence,
exact-search backends, the collective timeout, ...) never reruns anything. `python -m scan_dist.report` groups runs
by the same settings, so two runs that differ only in threads or workers are seeds of one setup, and two that differ
in `mine.k` are two setups. No torch here: the report imports this on a machine without it.
"""
from __future__ import annotations

from typing import Any, Mapping

__all__ = ["STAGE_KEYS", "settings_of", "result_settings"]

# A "section.*" entry takes the whole section; "-section.key" then leaves a key of it out. tests/test_pipeline.py
# checks both directions, stage by stage.
STAGE_KEYS: dict[str, tuple[str, ...]] = {
    "pretext": ("data.*", "-data.workers", "-data.prefetch", "-data.cache_dir", "-data.finish_on",
                "-data.max_eval_images", "augment.*", "model.*", "pretext.*", "run.seed", "dist.precision",
                "dist.grad_clip", "dist.sync_batchnorm"),
    "embed": ("mine.layer", "mine.grid", "data.max_eval_images"),
    "mine": ("mine.*", "-mine.backend", "-mine.precision"),  # the k-NN is exact whichever backend finds it
    "scan": ("scan.*", "-scan.loss_backend", "num_clusters", "dist.precision", "dist.grad_clip",
             "dist.sync_batchnorm"),
    "selflabel": ("selflabel.*", "dist.precision", "dist.grad_clip", "dist.sync_batchnorm"),
    "evaluate": ("run.baseline",),
}

_MISSING = object()


def _lookup(tree: Mapping[str, Any], dotted: str) -> Any:
    node: Any = tree
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return _MISSING
        node = node[part]
    return node


def settings_of(tree: Mapping[str, Any], stage: str) -> dict[str, Any]:
    """{dotted key: value} of STAGE_KEYS[stage] in a config tree (`dataclasses.asdict(cfg)` or a run's config.yaml).

    A key the tree lacks (a config.yaml written by an older version) is left out rather than failing.
    """
    chosen: dict[str, Any] = {}
    for entry in STAGE_KEYS[stage]:
        if entry.startswith("-"):
            chosen.pop(entry[1:], None)
        elif entry.endswith(".*"):
            section = _lookup(tree, entry[:-2])
            if isinstance(section, Mapping):
                chosen.update({f"{entry[:-2]}.{key}": value for key, value in section.items()})
        else:
            value = _lookup(tree, entry)
            if value is not _MISSING:
                chosen[entry] = value
    return chosen


def result_settings(tree: Mapping[str, Any]) -> dict[str, Any]:
    """Every setting that changes some stage's result, except `run.seed`: what makes two runs the same setup."""
    settings: dict[str, Any] = {}
    for stage in STAGE_KEYS:
        settings.update(settings_of(tree, stage))
    settings.pop("run.seed", None)
    return dict(sorted(settings.items()))
