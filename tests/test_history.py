"""history.jsonl: one point per read, continued without duplicates after a resume; torn lines skipped; curves.png
and the local status read it."""
import json

import pytest

from scan_dist.curves import write_curves_png
from scan_dist.history import HISTORY_FILE, format_status, read_history
from test_trainer import Crash, FakeContext, train


def positions(run_dir):
    return [(p["stage"], p["epoch"], p["step"]) for p in read_history(run_dir)]


def test_points_cover_every_read_with_window_means_and_throughput(tmp_path):
    ctx = FakeContext(tmp_path, every=2)
    _, history, _ = train(ctx)
    points = read_history(tmp_path)
    # 3 epochs of 5 steps (read interval 1 for 5-step epochs): a point per step, the epoch-end one included
    assert positions(tmp_path) == [("stage", e, s) for e in range(3) for s in range(1, 6)]
    for point in points:
        assert {"loss", "lr", "images_per_s", "wall_s", "global_step", "data_wait_fraction"} <= set(point)
        assert point["images_per_s"] > 0 and point["global_step"] == point["epoch"] * 5 + point["step"]
    epoch0 = [p["loss"] for p in points if p["epoch"] == 0]
    assert sum(epoch0) / len(epoch0) == pytest.approx(history[0]["loss"])  # window means average to the epoch's


def test_resume_continues_the_history_without_duplicates(tmp_path):
    train(FakeContext(tmp_path / "whole", every=2))
    ctx = FakeContext(tmp_path / "killed", every=2)
    with pytest.raises(Crash):
        train(ctx, crash_at=8)  # epoch 2, step 3: points up to step 3 logged, the checkpoint is at step 2
    assert ("stage", 1, 3) in positions(ctx.run_dir)
    with open(ctx.run_dir / HISTORY_FILE, "a") as handle:
        handle.write('{"stage": "stage", "epoch": 1, "st')  # a kill mid-write: a torn last line
    train(ctx)
    assert positions(ctx.run_dir) == positions(tmp_path / "whole")  # no duplicate, no gap, torn line gone
    whole = read_history(tmp_path / "whole")
    resumed = read_history(ctx.run_dir)
    assert [p["loss"] for p in resumed] == pytest.approx([p["loss"] for p in whole])


def test_curves_png_and_local_status(tmp_path):
    ctx = FakeContext(tmp_path, every=2)
    train(ctx)
    assert write_curves_png(tmp_path / "curves.png", tmp_path)
    assert (tmp_path / "curves.png").stat().st_size > 10_000
    status = format_status(tmp_path)
    assert "stage" in status and "epoch 3/3, step 5/5" in status and "img/s" in status
    assert not write_curves_png(tmp_path / "none.png", tmp_path / "empty")


def test_read_history_skips_foreign_lines(tmp_path):
    (tmp_path / HISTORY_FILE).write_text('not json\n[1, 2]\n{"stage": "x", "epoch": 0, "step": 1}\n')
    assert read_history(tmp_path) == [json.loads('{"stage": "x", "epoch": 0, "step": 1}')]


@pytest.mark.slow
def test_monitor_labels_leaves_training_bit_identical(tmp_path):
    """run.monitor_labels=true adds label scores to the history and changes nothing else: the same weights."""
    import subprocess
    import sys

    import torch

    runs = {}
    for flag in ("false", "true"):
        run_dir = tmp_path / flag
        result = subprocess.run([sys.executable, "-m", "scan_dist.launch", "--run-dir", str(run_dir), "smoke",
                                 "run.progress=false", "pretext.epochs=0", "scan.mode=full", "scan.features=backbone",
                                 "selflabel.threshold=0.2", f"run.monitor_labels={flag}"],
                                capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stderr[-3000:]
        runs[flag] = run_dir
    for stage in ("scan", "selflabel"):
        a = torch.load(runs["false"] / stage / "model.pt", weights_only=True)["model"]
        b = torch.load(runs["true"] / stage / "model.pt", weights_only=True)["model"]
        assert all(torch.equal(a[k], b[k]) for k in a), stage
    monitored = [p for p in read_history(runs["true"]) if "acc_best" in p]
    assert {p["stage"] for p in monitored} == {"scan", "selflabel"}
    assert not any("acc_best" in p for p in read_history(runs["false"]))
    assert any("neighbor_agreement" in p for p in read_history(runs["false"]))  # label-free ones always
