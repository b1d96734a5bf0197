"""Config tree: presets, _base_ chains, dotted overrides, unknown keys with suggestions, value checks."""
import pytest

from scan_dist.config import available_presets, load_config, section_hash, to_yaml
from scan_dist.errors import ConfigError


def test_every_preset_loads():
    names = available_presets()
    for required in ("demo", "smoke", "fashion_mnist", "cifar10", "cifar20", "stl10", "imagenet50", "imagenet100",
                     "imagenet200", "imagenet1k"):
        assert required in names
    for name in names:
        cfg = load_config(name)
        assert cfg.name == name


def test_base_chain_and_overrides():
    cfg = load_config("smoke", ["scan.epochs=7", "num_clusters=12", "data.image_size=32", "mine.features=pixels"])
    assert cfg.scan.epochs == 7 and cfg.num_clusters == 12 and cfg.data.image_size == 32
    assert cfg.mine.features == "pixels"
    assert cfg.data.format == "idx"  # inherited from demo through _base_
    assert cfg.data.max_images == 3000  # smoke's own value


def test_unknown_key_lists_close_keys():
    with pytest.raises(ConfigError) as info:
        load_config("demo", ["scan.epoch=3"])
    assert "scan.epoch" in str(info.value) and "scan.epochs" in str(info.value)
    with pytest.raises(ConfigError, match="num_clusters"):
        load_config("demo", ["num_cluster=3"])


def test_unknown_key_in_yaml_names_the_file(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("data:\n  pth: /x\n")
    with pytest.raises(ConfigError, match=r"data\.pth.*mine\.yaml.*data\.path|mine\.yaml.*data\.path"):
        load_config(str(path))


@pytest.mark.parametrize("override, fragment", [
    ("scan.epochs=abc", "scan.epochs"),
    ("scan.mode=fast", "scan.mode"),
    ("scan.init=imagenet", "scan.init"),
    ("num_clusters=1", "num_clusters"),
    ("selflabel.threshold=1.5", "selflabel.threshold"),
    ("data.on_bad_image=ignore", "data.on_bad_image"),
    ("data.channels=2", "data.channels"),
    ("mine.layer=stem", "mine.layer"),
    ("mine.grid=0", "mine.grid"),
    ("scan.tie_z=-1", "scan.tie_z"),
    ("scan.select=lowest", "scan.select"),
    ("noequals", "key=value"),
])
def test_bad_values_name_the_key(override, fragment):
    with pytest.raises(ConfigError, match=fragment.replace(".", r"\.")):
        load_config("demo", [override])


def test_unknown_preset_suggests():
    with pytest.raises(ConfigError, match="demo"):
        load_config("dmeo")
    with pytest.raises(ConfigError, match="does not exist"):
        load_config("/nonexistent/x.yaml")


def test_yaml_file_and_bad_yaml(tmp_path):
    good = tmp_path / "good.yaml"
    good.write_text("_base_: smoke\nname: mine\nscan:\n  epochs: 2\n")
    cfg = load_config(str(good))
    assert cfg.name == "mine" and cfg.scan.epochs == 2 and cfg.data.max_images == 3000
    bad = tmp_path / "bad.yaml"
    bad.write_text("scan: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(str(bad))


def test_resolved_yaml_round_trips(tmp_path):
    cfg = load_config("demo", ["scan.lr=0.01"])
    path = tmp_path / "resolved.yaml"
    path.write_text(to_yaml(cfg))
    again = load_config(str(path))
    assert again == cfg


def test_section_hash_is_stable_and_sensitive():
    assert section_hash({"a": 1}, "x") == section_hash({"a": 1}, "x")
    assert section_hash({"a": 1}) != section_hash({"a": 2})


@pytest.mark.parametrize("overrides, fragment", [
    (["scan.candidate_heads=30"], "must exceed scan.num_heads=30"),
    (["scan.candidate_heads=90", "scan.mode=full", "scan.features=backbone"], "needs scan.mode=head or cached"),
    (["scan.candidate_heads=90", "scan.screen_fraction=1.0"], r"scan.screen_fraction must be in \(0, 1\)"),
])
def test_candidate_heads_settings_are_checked(overrides, fragment):
    with pytest.raises(ConfigError, match=fragment):
        load_config("demo", overrides)
    assert load_config("demo", ["scan.candidate_heads=90"]).scan.candidate_heads == 90


def test_random_init_needs_full_mode():
    with pytest.raises(ConfigError, match="scan.init=random"):
        load_config("demo", ["scan.init=random", "scan.mode=head"])


def test_overriding_data_path_redetects_the_format_unless_it_is_given():
    from scan_dist.config import load_config

    assert load_config("demo").data.format == "idx"
    assert load_config("demo", ["data.path=/my/photos"]).data.format == "auto"
    assert load_config("demo", ["data.path=/my/photos", "data.format=flat"]).data.format == "flat"
