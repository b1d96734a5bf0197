"""run.start_from: which stages are copied (a matching prefix, never evaluate, not those already here), what a copy
holds, and the errors that name the setting. Run folders are built by hand from the config's own stage hashes;
tests/test_pipeline.py runs the real thing end to end."""
import json
import logging

import pytest

from scan_dist import run_fork
from scan_dist.config import load_config
from scan_dist.errors import ConfigError
from scan_dist.pipeline import stage_hashes

LOG = logging.getLogger("test")
ORDER = ["pretext", "embed", "mine", "scan", "selflabel", "evaluate"]


def fake_run(run_dir, cfg, done=ORDER, wrong=()):
    """A run folder whose stages in `done` are finished (with a wrong hash for those in `wrong`)."""
    hashes = stage_hashes(cfg)
    (run_dir).mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text("name: smoke\n")
    lines = []
    for name in done:
        stage = run_dir / name
        stage.mkdir()
        (stage / "model.pt").write_text(f"{run_dir.name} {name}")
        (stage / "checkpoint.pt").write_text("stale")
        marker = {"config_hash": "x" if name in wrong else hashes[name], "seconds": 1.0,
                  "artifacts": {"model": str(stage / "model.pt")}}
        (stage / "DONE").write_text(json.dumps(marker))
        lines.append(json.dumps({"stage": name, "epoch": 1, "step": 1}))
    (run_dir / "history.jsonl").write_text("\n".join(lines) + "\n")
    return run_dir


def cfg_from(source, *overrides):
    return load_config("smoke", [f"run.start_from={source}", *overrides])


def test_the_matching_prefix_is_copied_and_never_evaluate(tmp_path):
    source = fake_run(tmp_path / "src", load_config("smoke"))
    cfg = cfg_from(source)
    assert run_fork.stages_to_copy(cfg, tmp_path / "dst") == ORDER[:-1]
    # A SCAN setting changes the hashes from scan on: pretext, embed and mine still match.
    assert run_fork.stages_to_copy(cfg_from(source, "scan.entropy_weight=3"), tmp_path / "dst") == ORDER[:3]
    # The chain stops at the first stage that does not match, even if a later one would.
    broken = fake_run(tmp_path / "broken", load_config("smoke"), wrong=("embed",))
    assert run_fork.stages_to_copy(cfg_from(broken), tmp_path / "dst") == ["pretext"]


def test_a_copy_is_whole_and_points_at_its_new_folder(tmp_path):
    source = fake_run(tmp_path / "src", load_config("smoke"))
    dst = tmp_path / "dst"
    copied = run_fork.copy_stages(cfg_from(source, "scan.entropy_weight=3"), dst, LOG)
    assert copied == ORDER[:3]
    for name in copied:
        assert (dst / name / "model.pt").read_text() == f"src {name}"
        assert not (dst / name / "checkpoint.pt").exists()  # a finished stage's spare checkpoint stays behind
        marker = json.loads((dst / name / "DONE").read_text())
        assert marker["artifacts"]["model"] == str(dst / name / "model.pt")
        assert marker["copied_from"] == str(source / name)
    assert not (dst / "scan").exists() and not list(dst.glob(".*.copying"))
    assert [json.loads(line)["stage"] for line in (dst / "history.jsonl").read_text().splitlines()] == ORDER[:3]
    assert (source / "pretext" / "checkpoint.pt").exists()  # the source is untouched


def test_finished_stages_here_are_kept_and_a_half_done_one_is_replaced(tmp_path):
    cfg = load_config("smoke")
    source = fake_run(tmp_path / "src", cfg)
    dst = fake_run(tmp_path / "dst", cfg, done=["pretext"])  # finished here, same hash: kept as it is
    (dst / "embed").mkdir()
    (dst / "embed" / "checkpoint.pt").write_text("half")  # killed half-way: the source's finished one is better
    assert run_fork.copy_stages(cfg_from(source, "scan.entropy_weight=3"), dst, LOG) == ["embed", "mine"]
    assert (dst / "pretext" / "model.pt").read_text() == "dst pretext"
    assert not (dst / "embed" / "checkpoint.pt").exists() and (dst / "embed" / "DONE").is_file()
    assert run_fork.stages_to_copy(cfg_from(source, "scan.entropy_weight=3"), dst) == []  # the same command again


def test_a_seeds_folder_is_read_per_seed(tmp_path):
    seeds = tmp_path / "seeds"
    fake_run(seeds / "seed3", load_config("smoke", ["run.seed=3"]))
    cfg = cfg_from(seeds, "run.seed=3")
    assert run_fork.source_folder(cfg) == seeds / "seed3"
    assert run_fork.stages_to_copy(cfg, tmp_path / "dst") == ORDER[:-1]
    with pytest.raises(ConfigError, match="run.start_from=.*not a run folder.*seed4/ for run.seed=4"):
        run_fork.source_folder(cfg_from(seeds, "run.seed=4"))


def test_errors_name_the_setting(tmp_path):
    with pytest.raises(ConfigError, match="run.start_from=.*no such folder"):
        run_fork.stages_to_copy(cfg_from(tmp_path / "missing"), tmp_path / "dst")
    source = fake_run(tmp_path / "src", load_config("smoke"))
    with pytest.raises(ConfigError, match="is the run folder itself"):
        run_fork.stages_to_copy(cfg_from(source), source)
    assert run_fork.stages_to_copy(load_config("smoke"), tmp_path / "dst") == []  # not set: nothing to do


def test_a_started_run_goes_on_when_its_source_is_gone(tmp_path):
    started = fake_run(tmp_path / "dst", load_config("smoke"), done=["pretext"])
    assert run_fork.copy_stages(cfg_from(tmp_path / "deleted"), started, LOG) == []
