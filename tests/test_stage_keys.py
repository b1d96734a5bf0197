"""stage_keys: the augment fields each view kind reads (checked against the transform itself), which stage an
augmentation change reruns, and run folders finished before the augmentation split (legacy hashes) staying valid:
kept as they are with the same config, and reused up to the first changed stage with `--from` or in place; a
setting added later (stage_keys.ADDED_LATER) rerunning nothing at its neutral value."""
import dataclasses
import json
import logging

import numpy as np
import pytest
import torch

from scan_dist import run_fork
from scan_dist.config import load_config, to_yaml
from scan_dist.data.augment import AugmentConfig
from scan_dist.data.sampling import NUM_DRAWS
from scan_dist.data.transforms import make_transform
from scan_dist.job import write_config
from scan_dist.pipeline import STAGES, plan, stage_hashes
from scan_dist.stage_keys import ADDED_LATER, LEGACY_STAGE_KEYS, VIEW_FIELDS, result_settings, settings_of

# Another valid value of every augment field, each far enough from the default to move some pixel of the views
# that read it (crop_scale_min above the weak view's 0.6 floor, so the weak view reads it too).
CHANGED = {"crop_scale_min": 0.9, "crop_ratio": (0.5, 2.0), "flip": False, "jitter_prob": 0.3, "brightness": 0.8,
           "contrast": 0.8, "saturation": 0.9, "hue": 0.3, "grayscale_prob": 0.7, "blur_prob": 0.6,
           "strong_ops": 2, "cutout_frac": 0.2, "translate_frac": 0.2}
BASE = AugmentConfig(crop_scale_min=0.7)


def test_every_augment_field_has_a_changed_value():
    assert set(CHANGED) == {field.name for field in dataclasses.fields(AugmentConfig)}


def _view(kind, cfg, images, u):
    torch.manual_seed(0)  # none of the transforms draws from torch; this only makes a stray draw repeat
    return make_transform(kind, cfg, [0.5] * 3, [0.25] * 3, 24)(images, u)


@pytest.mark.parametrize("kind", list(VIEW_FIELDS))
def test_a_view_changes_with_exactly_its_listed_fields(kind):
    """The soundness of the split: a field left out of a view's list must never change that view (else a stage
    would be kept after a change that alters its training data); a listed one must (else reruns are spare)."""
    rng = np.random.default_rng(0)
    images = torch.from_numpy(rng.integers(0, 256, (16, 3, 28, 28), dtype=np.uint8))
    u = rng.random((16, NUM_DRAWS)) if kind != "eval" else None
    base = _view(kind, BASE, images, u)
    for field, value in CHANGED.items():
        changed = _view(kind, dataclasses.replace(BASE, **{field: value}), images, u)
        listed = f"augment.{field}" in VIEW_FIELDS[kind]
        assert (not torch.equal(base, changed)) == listed, (kind, field)


def test_an_augmentation_change_reruns_the_stages_whose_views_read_it():
    base = stage_hashes(load_config("smoke"))

    def rerun(*overrides):
        changed = stage_hashes(load_config("smoke", list(overrides)))
        return [name for name in STAGES if changed[name] != base[name]]

    assert rerun("augment.strong_ops=6") == ["selflabel", "evaluate"]  # the strong view: self-labelling only
    assert rerun("augment.cutout_frac=0.25") == ["selflabel", "evaluate"]
    assert rerun("augment.translate_frac=0.1") == []  # the weak view: no stage of smoke trains on it
    assert rerun("augment.jitter_prob=0.5") == list(STAGES)  # the SimCLR view
    # Views chosen per stage bring their fields along.
    strong_scan = stage_hashes(load_config("smoke", ["scan.view=strong"]))
    changed = stage_hashes(load_config("smoke", ["scan.view=strong", "augment.strong_ops=6"]))
    assert [n for n in STAGES if changed[n] != strong_scan[n]] == ["scan", "selflabel", "evaluate"]
    weak_label = stage_hashes(load_config("smoke", ["selflabel.view=weak"]))
    changed = stage_hashes(load_config("smoke", ["selflabel.view=weak", "augment.translate_frac=0.1"]))
    assert [n for n in STAGES if changed[n] != weak_label[n]] == ["selflabel", "evaluate"]


def test_a_view_kind_unknown_to_the_table_takes_every_augment_field():
    tree = dataclasses.asdict(load_config("smoke"))
    tree["selflabel"]["view"] = "a_future_kind"
    chosen = settings_of(tree, "selflabel")
    assert {key for key in chosen if key.startswith("augment.")} == {f"augment.{f}" for f in CHANGED}


# The smoke preset's hashes as the version before the split (commit 24b847d) wrote them. They change whenever a
# config field is added or a default changes (every run folder then reruns, as before the split); update them then.
# Both tables below were written while the demo preset (smoke's base) had the strong view's Cutout at 0.4; the
# twenty-second pass moved it to 0.2, so the old config is the preset with that one setting put back.
OLD_SMOKE = ["augment.cutout_frac=0.4", "scan.select=loss"]  # the smoke preset's values of those days
SMOKE_LEGACY = {"pretext": "d88efe9677e58b5b", "embed": "6860f2a47859da6a", "mine": "15dd536373829ef8",
                "scan": "c021b78a4b2ba5ed", "selflabel": "41a09476a45a3cb6", "evaluate": "3163971deddb909f"}


def test_the_legacy_table_gives_the_hashes_the_version_before_the_split_wrote():
    assert stage_hashes(load_config("smoke", OLD_SMOKE), LEGACY_STAGE_KEYS) == SMOKE_LEGACY
    assert stage_hashes(load_config("smoke", OLD_SMOKE)) != SMOKE_LEGACY  # today's hashes are another family


def _legacy_run(folder, cfg):
    """A run folder as the version before the split left it: config.yaml and every DONE marker with legacy hashes."""
    legacy = stage_hashes(cfg, LEGACY_STAGE_KEYS)
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text(to_yaml(cfg))
    for name in STAGES:
        (folder / name).mkdir()
        (folder / name / "model.pt").write_text(name)
        (folder / name / "DONE").write_text(json.dumps({"config_hash": legacy[name], "seconds": 1.0}))
    return folder


def _runs(cfg, folder):
    return [name for name, action in plan(cfg, folder) if action == "run"]


def test_a_legacy_folder_is_finished_for_its_own_config_and_reused_up_to_the_first_change(tmp_path):
    cfg = load_config("smoke")
    old = _legacy_run(tmp_path / "old", cfg)
    assert _runs(cfg, old) == []
    strong = load_config("smoke", ["augment.strong_ops=6"])
    assert _runs(strong, old) == ["selflabel", "evaluate"]
    assert _runs(load_config("smoke", ["augment.jitter_prob=0.5"]), old) == list(STAGES)
    # --from the legacy folder: the copies carry today's hashes, so the new folder's own config vouches for them.
    forked = load_config("smoke", [f"run.start_from={old}", "augment.strong_ops=6"])
    new = tmp_path / "new"
    assert run_fork.copy_stages(forked, new, logging.getLogger("test")) == ["pretext", "embed", "mine", "scan"]
    write_config(new, forked)
    assert _runs(forked, new) == ["selflabel", "evaluate"]
    current = stage_hashes(forked)
    for name in ("pretext", "embed", "mine", "scan"):
        assert json.loads((new / name / "DONE").read_text())["config_hash"] == current[name]


def test_a_launch_in_a_legacy_folder_upgrades_its_markers_before_replacing_config_yaml(tmp_path):
    cfg = load_config("smoke")
    old = _legacy_run(tmp_path / "old", cfg)
    # One stage finished with other settings than the recorded config's: its marker must stay as it is.
    (old / "selflabel" / "DONE").write_text(json.dumps({"config_hash": "stale", "seconds": 1.0}))
    strong = load_config("smoke", ["augment.strong_ops=6"])
    write_config(old, strong)  # what a launch does first
    assert _runs(strong, old) == ["selflabel", "evaluate"]
    now = stage_hashes(cfg)
    for name in ("pretext", "embed", "mine", "scan", "evaluate"):
        marker = json.loads((old / name / "DONE").read_text())
        assert marker["config_hash"] == now[name]
        assert marker["legacy_config_hash"] == stage_hashes(cfg, LEGACY_STAGE_KEYS)[name]
    assert json.loads((old / "selflabel" / "DONE").read_text())["config_hash"] == "stale"
    # The upgraded folder is still finished for its own config, up to the stage that was not.
    assert _runs(cfg, old) == ["selflabel", "evaluate"]


# Today's smoke hashes as commit e3ffe3b (before mine.pixel_weight existed) wrote them.
SMOKE_E3FFE3B = {"pretext": "3f61fc15b236f21f", "embed": "aca01e11c8f2ccec", "mine": "0c6f72e53bce0523",
                 "scan": "c74e4f19c1a1ae7f", "selflabel": "29bac8e946905711", "evaluate": "48804c8f381e1645"}


def test_a_setting_added_later_at_its_neutral_value_reruns_nothing():
    cfg = load_config("smoke", OLD_SMOKE)
    assert cfg.mine.pixel_weight == ADDED_LATER["mine.pixel_weight"]
    assert cfg.selflabel.teacher_flip == ADDED_LATER["selflabel.teacher_flip"]
    assert cfg.scan.tie_z == ADDED_LATER["scan.tie_z"]
    assert stage_hashes(cfg) == SMOKE_E3FFE3B
    settings = result_settings(dataclasses.asdict(cfg))
    assert "mine.pixel_weight" not in settings and "selflabel.teacher_flip" not in settings  # nor label the report's setups


def test_a_setting_added_later_counts_at_any_other_value():
    cfg = load_config("smoke", [*OLD_SMOKE, "mine.pixel_weight=1.5"])
    hashes = stage_hashes(cfg)
    assert [name for name in STAGES if hashes[name] != SMOKE_E3FFE3B[name]] == ["mine", "scan", "selflabel", "evaluate"]
    assert result_settings(dataclasses.asdict(cfg))["mine.pixel_weight"] == 1.5
    flipped = stage_hashes(load_config("smoke", ["selflabel.teacher_flip=true", "selflabel.ema_decay=0.999"]))
    plain = stage_hashes(load_config("smoke", ["selflabel.ema_decay=0.999"]))
    assert [name for name in STAGES if flipped[name] != plain[name]] == ["selflabel", "evaluate"]
