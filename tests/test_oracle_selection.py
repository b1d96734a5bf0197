"""benchmarks/oracle_selection.py: the oracle copy of a fabricated run folder."""
import json

import pytest
import torch

from benchmarks import oracle_selection


def _run(root, selected=1, per_head=(0.6, 0.7, 0.75), select="loss"):
    run = root / "run"
    for stage in ("pretext", "scan/cache", "selflabel", "evaluate"):
        (run / stage).mkdir(parents=True)
    (run / "pretext" / "DONE").write_text("{}")
    (run / "scan" / "DONE").write_text("{}")
    (run / "scan" / "cache" / "features.npy").write_bytes(b"x" * 10)
    (run / "selflabel" / "DONE").write_text("{}")
    torch.save({"model": {}, "best_head": selected, "select": select}, run / "scan" / "model.pt")
    (run / "metrics.json").write_text(json.dumps({"stages": {"evaluate": {"scan_heads": {
        "selected_head": selected, "acc_per_head": list(per_head)}}}}))
    return run


def test_the_copy_hands_on_the_best_head_and_reruns_from_self_labelling(tmp_path):
    source, target = _run(tmp_path), tmp_path / "oracle"
    record = oracle_selection.prepare(source, target)
    assert (record["selected_head"], record["best_head"], record["best_acc"]) == (1, 2, 0.75)
    assert torch.load(target / "scan" / "model.pt", weights_only=False)["best_head"] == 2
    assert torch.load(source / "scan" / "model.pt", weights_only=False)["best_head"] == 1  # the source untouched
    assert (target / "pretext" / "DONE").is_file() and (target / "scan" / "DONE").is_file()
    assert not any((target / p).exists() for p in ("selflabel", "evaluate", "metrics.json", "scan/cache"))
    assert json.loads((target / oracle_selection.RECORD).read_text())["best_head"] == 2


def test_nothing_is_made_where_the_rule_kept_the_best_head(tmp_path):
    assert oracle_selection.prepare(_run(tmp_path, selected=2), tmp_path / "oracle") is None
    assert not (tmp_path / "oracle").exists()


def test_bad_folders_are_named(tmp_path):
    with pytest.raises(SystemExit, match="no metrics.json"):
        oracle_selection.prepare(tmp_path, tmp_path / "oracle")
    source = _run(tmp_path, select="ensemble")
    with pytest.raises(SystemExit, match="an ensemble"):
        oracle_selection.prepare(source, tmp_path / "oracle")
    (tmp_path / "taken").mkdir()
    with pytest.raises(SystemExit, match="exists"):
        oracle_selection.prepare(_run(tmp_path / "again"), tmp_path / "taken")
