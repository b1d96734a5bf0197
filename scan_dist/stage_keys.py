"""Which settings change which stage's result: the one list the stage hashes and the run comparison both read.

A stage's hash (pipeline.py) covers its settings here and its upstream stage's hash, so changing one reruns the
stage and everything after it; every other setting (threads, loader workers, progress bars, checkpoint cadence,
exact-search backends, the collective timeout, ...) never reruns anything. `python -m scan_dist.report` groups runs
by the same settings, so two runs that differ only in threads or workers are seeds of one setup, and two that differ
in `mine.k` are two setups. No torch here: the report imports this on a machine without it.

Augmentation settings belong to the stages whose views read them: pretext to the SimCLR view's fields, the SCAN and
self-labelling stages to the fields of the view kind they train on (`scan.view`, `selflabel.view`), so a change to
the strong view (`augment.strong_ops`, `augment.cutout_frac`) reruns self-labelling only, not SimCLR. Run folders
finished before that split carry hashes of LEGACY_STAGE_KEYS (every `augment.*` in pretext's); those hashes are
still accepted (pipeline.accepted_hashes): they cover a superset of today's settings, so a match is a match.
"""
from __future__ import annotations

from typing import Any, Mapping

__all__ = ["STAGE_KEYS", "LEGACY_STAGE_KEYS", "VIEW_FIELDS", "ADDED_LATER", "settings_of", "result_settings"]

# The augment fields each view kind reads (data/transforms.py, ViewTransform.params/finish); `eval` reads none.
# tests/test_stage_keys.py checks the list against the transform: changing any other field leaves the view as it is.
VIEW_FIELDS: dict[str, tuple[str, ...]] = {
    "simclr": ("augment.crop_scale_min", "augment.crop_ratio", "augment.flip", "augment.jitter_prob",
               "augment.brightness", "augment.contrast", "augment.saturation", "augment.hue",
               "augment.grayscale_prob", "augment.blur_prob"),
    "weak": ("augment.crop_scale_min", "augment.crop_ratio", "augment.flip", "augment.translate_frac"),
    "strong": ("augment.flip", "augment.strong_ops", "augment.cutout_frac"),
    "eval": (),
}

_DATA = ("data.*", "-data.workers", "-data.prefetch", "-data.cache_dir", "-data.finish_on", "-data.max_eval_images")
_TRAINING = ("dist.precision", "dist.grad_clip", "dist.sync_batchnorm")

# A "section.*" entry takes the whole section; "-section.key" then leaves a key of it out; "@stage.view" takes the
# VIEW_FIELDS of the view kind that setting names. tests/test_pipeline.py checks both directions, stage by stage,
# and tests/test_stage_keys.py the augmentation fields.
STAGE_KEYS: dict[str, tuple[str, ...]] = {
    "pretext": (*_DATA, *VIEW_FIELDS["simclr"], "model.*", "pretext.*", "run.seed", *_TRAINING),
    "embed": ("mine.layer", "mine.grid", "data.max_eval_images"),
    "mine": ("mine.*", "-mine.backend", "-mine.precision"),  # the k-NN is exact whichever backend finds it
    "scan": ("scan.*", "-scan.loss_backend", "@scan.view", "num_clusters", *_TRAINING),
    "selflabel": ("selflabel.*", "@selflabel.view", *_TRAINING),
    "evaluate": ("run.baseline",),
}

# The table before the augmentation split (every augment field in pretext's key): the hashes in run folders finished
# by earlier versions. Written out in full and never edited (tests/test_stage_keys.py pins the hashes it gives); a
# future change of STAGE_KEYS that should keep old folders valid adds a table of its own.
LEGACY_STAGE_KEYS: dict[str, tuple[str, ...]] = {
    "pretext": ("data.*", "-data.workers", "-data.prefetch", "-data.cache_dir", "-data.finish_on",
                "-data.max_eval_images", "augment.*", "model.*", "pretext.*", "run.seed", "dist.precision",
                "dist.grad_clip", "dist.sync_batchnorm"),
    "embed": ("mine.layer", "mine.grid", "data.max_eval_images"),
    "mine": ("mine.*", "-mine.backend", "-mine.precision"),
    "scan": ("scan.*", "-scan.loss_backend", "num_clusters", "dist.precision", "dist.grad_clip",
             "dist.sync_batchnorm"),
    "selflabel": ("selflabel.*", "dist.precision", "dist.grad_clip", "dist.sync_batchnorm"),
    "evaluate": ("run.baseline",),
}

# Settings added after run folders were written, each with the value that computes what those folders computed
# without it: at that value the setting stays out of every hash (and out of the report's setup label), so adding a
# setting reruns no finished stage; any other value counts like every other key. tests/test_stage_keys.py.
ADDED_LATER: dict[str, Any] = {"mine.pixel_weight": 1.0, "selflabel.teacher_flip": False, "scan.candidate_heads": 0,
                                 "scan.screen_fraction": 0.15, "scan.ensemble_rank": "agreement",
                                 "mine.mutual": False, "scan.tie_z": 2.0}

_MISSING = object()


def _lookup(tree: Mapping[str, Any], dotted: str) -> Any:
    node: Any = tree
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return _MISSING
        node = node[part]
    return node


def settings_of(tree: Mapping[str, Any], stage: str,
                table: Mapping[str, tuple[str, ...]] = STAGE_KEYS) -> dict[str, Any]:
    """{dotted key: value} of table[stage] in a config tree (`dataclasses.asdict(cfg)` or a run's config.yaml).

    A key the tree lacks (a config.yaml written by an older version) is left out rather than failing.
    """
    chosen: dict[str, Any] = {}
    for entry in table[stage]:
        if entry.startswith("-"):
            chosen.pop(entry[1:], None)
        elif entry.startswith("@"):
            view = _lookup(tree, entry[1:])
            if view is _MISSING:
                continue
            chosen[entry[1:]] = view
            # A view kind this table does not know (a config from another version) takes every augment field:
            # a spare rerun rather than a stage wrongly kept.
            fields = VIEW_FIELDS.get(view) if isinstance(view, str) else None
            for field in ("augment.*",) if fields is None else fields:
                _take(tree, field, chosen)
        else:
            _take(tree, entry, chosen)
    for key, neutral in ADDED_LATER.items():
        if key in chosen and chosen[key] == neutral:
            del chosen[key]
    return chosen


def _take(tree: Mapping[str, Any], entry: str, chosen: dict[str, Any]) -> None:
    """Add a "section.*" entry's keys, or one dotted key, of the tree to `chosen`; absent keys are left out."""
    if entry.endswith(".*"):
        section = _lookup(tree, entry[:-2])
        if isinstance(section, Mapping):
            chosen.update({f"{entry[:-2]}.{key}": value for key, value in section.items()})
    else:
        value = _lookup(tree, entry)
        if value is not _MISSING:
            chosen[entry] = value


def result_settings(tree: Mapping[str, Any]) -> dict[str, Any]:
    """Every setting that changes some stage's result, except `run.seed`: what makes two runs the same setup."""
    settings: dict[str, Any] = {}
    for stage in STAGE_KEYS:
        settings.update(settings_of(tree, stage))
    settings.pop("run.seed", None)
    return dict(sorted(settings.items()))
