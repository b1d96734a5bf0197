"""Tests for scan_dist.report: PNG/Markdown writers, terminal tables and all-or-nothing writes."""

import os

import numpy as np
import pytest
import torch

from scan_dist import report
from scan_dist.report import (
    atomic_write_text,
    format_metrics_table,
    format_time_table,
    write_confusion_png,
    write_prototypes_png,
    write_report_md,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

METRICS = {
    "acc": 0.81234, "nmi": 0.7123, "ari": 0.66666, "ami": None,
    "acc_many_to_one": 0.85, "top5": 0.9912, "num_clusters": 10, "num_classes": 10,
    "stages": {
        "pretext": {"knn_acc": 0.75, "loss": 3.14159},
        "scan": {"acc": 0.80, "nmi": 0.70, "epochs": 50},
    },
}
BASELINE = {"acc": 0.2251, "nmi": 0.0849, "ari": 0.0512, "ami": 0.0843, "seconds": 12.3}
STAGES = {"pretext": 125.4, "mine": 3.2, "scan": 61.0, "selflabel": 599.6}


def _assert_png(path, min_bytes=1000):
    with open(path, "rb") as fh:
        data = fh.read()
    assert data[:8] == PNG_MAGIC
    assert len(data) > min_bytes


def _leftovers(folder, target_name):
    return [n for n in os.listdir(folder) if n != target_name]


def test_confusion_png(tmp_path):
    conf = np.array([[5, 1, 0, 2], [0, 7, 1, 0], [1, 0, 6, 0]])
    out = tmp_path / "confusion.png"
    write_confusion_png(out, conf, class_names=["cat", "dog", "car"], title="test")
    _assert_png(out)
    assert _leftovers(tmp_path, "confusion.png") == []
    write_confusion_png(tmp_path / "big.png", np.random.default_rng(0).integers(0, 9, (50, 60)))
    _assert_png(tmp_path / "big.png")


@pytest.mark.parametrize("channels", [1, 3])
def test_prototypes_png(tmp_path, channels):
    rng = np.random.default_rng(channels)
    n, k = 40, 4
    images = torch.from_numpy(rng.integers(0, 256, (n, channels, 12, 12), dtype=np.uint8))
    preds = np.arange(n) % 3
    preds[:2] = 3  # cluster 3 gets only 2 of per_cluster=5 images, leaving blank cells
    conf = rng.random(n)
    out = tmp_path / "prototypes.png"
    write_prototypes_png(out, images, preds, conf, num_clusters=k, per_cluster=5,
                         class_names=["a", "b", "c", "d"], cluster_names={0: 2, 1: "bee", 3: 0})
    _assert_png(out)
    assert _leftovers(tmp_path, "prototypes.png") == []


def test_prototypes_picks_most_confident(tmp_path, monkeypatch):
    images = np.zeros((6, 1, 4, 4), dtype=np.uint8)
    for i in range(6):
        images[i] = i * 40  # pixel value identifies the image
    preds = np.array([0, 0, 0, 1, 1, 1])
    conf = np.array([0.1, 0.9, 0.5, 0.3, 0.2, 0.8])
    seen = {}
    real = report._images_nchw

    def spy(imgs, indices):
        seen["indices"] = list(indices)
        return real(imgs, indices)

    monkeypatch.setattr(report, "_images_nchw", spy)
    write_prototypes_png(tmp_path / "p.png", images, preds, conf, num_clusters=2, per_cluster=2)
    assert seen["indices"] == [1, 2, 5, 3]


def test_time_table_total():
    table = format_time_table(STAGES)
    lines = table.splitlines()
    assert lines[0].split() == ["stage", "seconds", "m:ss"]
    assert lines[-1].split() == ["total", "789.2", "13:09"]
    assert "pretext" in table and "2:05" in table and "10:00" in table
    # Right-aligned numbers end in the same column.
    assert len({len(line) for line in lines[2:]}) == 1
    # An explicit total (wall clock) wins over the sum.
    assert format_time_table({"a": 1.0, "total": 5.0}).splitlines()[-1].split() == ["total", "5.0", "0:05"]


def test_metrics_table():
    table = format_metrics_table(METRICS, BASELINE)
    lines = table.splitlines()
    assert lines[0].split() == ["method", "ACC", "NMI", "ARI", "AMI"]
    assert lines[2].split() == ["SCAN", "(ours)", "81.2", "71.2", "66.7", "n/a"]
    assert lines[3].split() == ["k-means", "on", "pixels", "22.5", "8.5", "5.1", "8.4"]
    assert "k-means" not in format_metrics_table(METRICS, None)


def test_report_md(tmp_path):
    out = tmp_path / "report.md"
    config = {"dataset": "cifar10", "model": {"backbone": "resnet18"}, "num_heads": 10}
    write_report_md(out, METRICS, STAGES, config, baseline=BASELINE)
    text = out.read_text()
    assert text.startswith("# ")
    assert "| SCAN (ours) | 81.2 | 71.2 | 66.7 | n/a |" in text
    assert "| k-means on pixels | 22.5 | 8.5 | 5.1 | 8.4 |" in text
    assert "| pretext | 125.4 | 2:05 |" in text
    assert "| selflabel | 599.6 | 10:00 |" in text
    assert "| **Total** | **789.2** | **13:09** |" in text
    # Per-stage metrics: fractions in %, other numbers as they are.
    assert "| pretext | knn_acc: 75.0, loss: 3.142 |" in text
    assert "| scan | acc: 80.0, nmi: 70.0, epochs: 50 |" in text
    for name in ("confusion.png", "prototypes.png", "assignments.csv"):
        assert f"]({name})" in text
    assert "| model.backbone | resnet18 |" in text and "| dataset | cifar10 |" in text
    assert "85.0%" in text and "99.1%" in text
    assert _leftovers(tmp_path, "report.md") == []


def test_report_md_without_baseline_or_labels(tmp_path):
    out = tmp_path / "report.md"
    write_report_md(out, {"acc": None, "nmi": None, "ari": None, "ami": None}, {}, {})
    text = out.read_text()
    assert "| SCAN (ours) | n/a | n/a | n/a | n/a |" in text
    assert "k-means" not in text
    assert "| **Total** | **0.0** | **0:00** |" in text


def test_atomic_write_text_replaces(tmp_path):
    out = tmp_path / "sub" / "a.txt"
    atomic_write_text(out, "one")
    atomic_write_text(out, "two")
    assert out.read_text() == "two"
    assert _leftovers(out.parent, "a.txt") == []
    assert os.stat(out).st_mode & 0o777 == 0o644


def test_failed_png_leaves_nothing(tmp_path, monkeypatch):
    from matplotlib.figure import Figure

    def broken_savefig(self, fname, **kwargs):
        with open(fname, "wb") as fh:
            fh.write(PNG_MAGIC + b"half")
        raise RuntimeError("disk full")

    monkeypatch.setattr(Figure, "savefig", broken_savefig)
    with pytest.raises(RuntimeError, match="disk full"):
        write_confusion_png(tmp_path / "confusion.png", np.eye(3))
    with pytest.raises(RuntimeError, match="disk full"):
        write_prototypes_png(tmp_path / "prototypes.png", np.zeros((3, 1, 4, 4), np.uint8), [0, 1, 1],
                             [1.0, 0.5, 0.2], num_clusters=2)
    assert os.listdir(tmp_path) == []


def test_failed_text_write_keeps_old_file(tmp_path, monkeypatch):
    out = tmp_path / "report.md"
    out.write_text("old report")

    def broken_replace(src, dst):
        raise OSError("interrupted")

    monkeypatch.setattr(report.os, "replace", broken_replace)
    with pytest.raises(OSError, match="interrupted"):
        write_report_md(out, METRICS, STAGES, {})
    assert out.read_text() == "old report"
    assert _leftovers(tmp_path, "report.md") == []


def test_failed_markdown_build_leaves_no_file(tmp_path, monkeypatch):
    def broken_md_cell(value):
        raise ValueError("bad value")

    monkeypatch.setattr(report, "_md_cell", broken_md_cell)
    with pytest.raises(ValueError):
        write_report_md(tmp_path / "report.md", METRICS, STAGES, {})
    assert os.listdir(tmp_path) == []


def test_import_has_no_backend_side_effect():
    import subprocess
    import sys

    code = ("import matplotlib, scan_dist.report, scan_dist.metrics; "
            "import sys; assert 'matplotlib.pyplot' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)
