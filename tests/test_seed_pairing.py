"""benchmarks/seed_pairing.py: the correlation of paired runs' final ACC, on fabricated --seeds folders."""
import json

import numpy as np
import pytest

from benchmarks import seed_pairing


def _seeds(root, name, accs):
    folder = root / name
    for seed, acc in accs.items():
        (folder / f"seed{seed}").mkdir(parents=True)
        (folder / f"seed{seed}" / "metrics.json").write_text(
            json.dumps({"acc": acc, "stages": {"evaluate": {"final": {"acc": acc}}}}))
    return folder


def test_an_arm_that_follows_the_reference_correlates_and_a_new_draw_does_not(tmp_path, capsys):
    reference = {0: 0.70, 1: 0.74, 2: 0.72, 3: 0.76}
    _seeds(tmp_path, "base", reference)
    _seeds(tmp_path, "shifted", {s: a + 0.03 for s, a in reference.items()})  # a pure effect, seed kept
    _seeds(tmp_path, "redrawn", {0: 0.74, 1: 0.70, 2: 0.76, 3: 0.72})
    (tmp_path / "redrawn" / "seed9").mkdir()  # an unfinished seed is left out
    seed_pairing.main([str(tmp_path / "base"), "--group", "kept", str(tmp_path / "shifted"),
                       "--group", "new", str(tmp_path / "redrawn")])
    kept, new = (json.loads(line) for line in capsys.readouterr().out.splitlines())
    assert kept == {"group": "kept", "pairs": 4, "corr": 1.0, "corr_within_arms": 1.0}
    expected = np.corrcoef([0.70, 0.74, 0.72, 0.76], [0.74, 0.70, 0.76, 0.72])[0, 1]
    assert new["pairs"] == 4 and new["corr"] == pytest.approx(expected, abs=1e-3) and new["corr"] < 0


def test_within_arms_an_arm_effect_does_not_pass_for_agreement(tmp_path):
    reference = {0: 0.70, 1: 0.71, 2: 0.75, 3: 0.76}
    # Two arms on different seeds, the better arm on the reference's better seeds, each against it within itself.
    arms = {"low": {0: 0.61, 1: 0.60}, "high": {2: 0.81, 3: 0.80}}
    row = seed_pairing.pairing(reference, arms)
    assert row["corr"] > 0.9 and row["corr_within_arms"] == -1.0
    flat = seed_pairing.pairing(reference, {"low": {0: 0.6, 1: 0.6}, "high": {2: 0.8, 3: 0.8}})
    assert flat["corr_within_arms"] is None  # undefined, not NaN in the JSON


def test_too_few_shared_seeds_an_empty_reference_and_a_broken_file_are_named(tmp_path):
    _seeds(tmp_path, "base", {0: 0.7, 1: 0.72})
    _seeds(tmp_path, "arm", {0: 0.7, 5: 0.72})
    with pytest.raises(SystemExit, match="--group g: 1 .*at least 3"):
        seed_pairing.main([str(tmp_path / "base"), "--group", "g", str(tmp_path / "arm")])
    with pytest.raises(SystemExit, match="no seed<S>/metrics.json"):
        seed_pairing.main([str(tmp_path / "arm" / "seed0"), "--group", "g", str(tmp_path / "arm")])
    (tmp_path / "arm" / "seed5" / "metrics.json").write_text("{not json")
    with pytest.raises(SystemExit, match="--group g: cannot read .*seed5.metrics.json"):
        seed_pairing.main([str(tmp_path / "base"), "--group", "g", str(tmp_path / "arm")])
