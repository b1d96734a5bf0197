"""Tests for scan_dist.report: PNG/Markdown writers, terminal tables, all-or-nothing writes and the run comparison."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from scan_dist import report
from scan_dist import run_report
from scan_dist.report import PAPER_RESULTS, format_comparison_md, load_run, mean_std
from scan_dist.run_report import (
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
    real = run_report._images_nchw

    def spy(imgs, indices):
        seen["indices"] = list(indices)
        return real(imgs, indices)

    monkeypatch.setattr(run_report, "_images_nchw", spy)
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

    monkeypatch.setattr(run_report.os, "replace", broken_replace)
    with pytest.raises(OSError, match="interrupted"):
        write_report_md(out, METRICS, STAGES, {})
    assert out.read_text() == "old report"
    assert _leftovers(tmp_path, "report.md") == []


def test_failed_markdown_build_leaves_no_file(tmp_path, monkeypatch):
    def broken_md_cell(value):
        raise ValueError("bad value")

    monkeypatch.setattr(run_report, "_md_cell", broken_md_cell)
    with pytest.raises(ValueError):
        write_report_md(tmp_path / "report.md", METRICS, STAGES, {})
    assert os.listdir(tmp_path) == []


def test_import_has_no_backend_side_effect():
    import subprocess
    import sys

    code = ("import matplotlib, scan_dist.report, scan_dist.run_report, scan_dist.metrics; "
            "import sys; assert 'matplotlib.pyplot' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)


# ---------------------------------------------------------------- python -m scan_dist.report (comparison of runs)

def _scores(acc, nmi, ari, m2o, clusters, classes=10):
    return {"acc": acc, "nmi": nmi, "ari": ari, "ami": nmi - 0.01, "acc_many_to_one": m2o,
            "num_clusters": clusters, "num_classes": classes}


def _fake_run(root, name, preset="cifar10", k=10, seed=0, acc=0.8, nmi=0.7, ari=0.6, m2o=0.81, scan_acc=0.75,
              selflabel=True, kmeans_acc=0.22, threads=2, mine_k=None, scan_seconds=30.0, other_head=0.5,
              pretext_lr=None, machines=None):
    """A run folder shaped like pipeline.summarize's metrics.json and the launcher's config.yaml; ``machines``
    (stage -> reproducibility.machine() record) is left out of metrics.json when None, as an old run's."""
    run = root / name
    run.mkdir(parents=True)
    final = _scores(acc, nmi, ari, m2o, k)
    seconds = {"pretext": 100.0 + seed, "embed": 5.0, "mine": 2.0, "scan": scan_seconds}
    if selflabel:
        seconds["selflabel"] = 40.0
    seconds["evaluate"] = 3.0
    stages = {name_: {"seconds": sec} for name_, sec in seconds.items()}
    stages["evaluate"].update({"num_images": 10000, "final": final,
                               "scan_heads": {"selected_head": 0, "selected": _scores(scan_acc, nmi, ari, m2o, k),
                                              "acc_per_head": [scan_acc, other_head]},
                               "kmeans_pixels": _scores(kmeans_acc, 0.1, 0.05, 0.3, 10)})
    metrics = {"acc": acc, "nmi": nmi, "ari": ari, "ami": nmi - 0.01, "final": final,
               "baseline_kmeans_pixels": stages["evaluate"]["kmeans_pixels"], "stages": stages,
               "seconds": {**seconds, "total": sum(seconds.values())}, "preset": preset, "world_size": 1}
    if machines is not None:
        metrics["machines"] = machines
    (run / "metrics.json").write_text(json.dumps(metrics))
    (run / "config.yaml").write_text(f"# git commit: abc\nname: {preset}\nnum_clusters: {k}\n"
                                     f"data:\n  path: data/x\nrun:\n  seed: {seed}\n  threads: {threads}\n"
                                     + ("" if mine_k is None else f"mine:\n  k: {mine_k}\n  backend: auto\n")
                                     + ("" if pretext_lr is None else f"pretext:\n  lr: {pretext_lr}\n"))
    return run


@pytest.fixture
def fake_runs(tmp_path):
    """cifar10 with K = 10 (seeds 0, 1) and K = 20 (seeds 0, 1)."""
    root = tmp_path / "runs"
    return [
        _fake_run(root, "c10_k10_s0", k=10, seed=0, acc=0.80, nmi=0.70, ari=0.60, m2o=0.82, scan_acc=0.75),
        _fake_run(root, "c10_k10_s1", k=10, seed=1, acc=0.84, nmi=0.72, ari=0.64, m2o=0.86, scan_acc=0.79,
                  other_head=0.81),
        _fake_run(root, "c10_k20_s0", k=20, seed=0, acc=0.60, nmi=0.68, ari=0.50, m2o=0.86, scan_acc=0.55),
        _fake_run(root, "c10_k20_s1", k=20, seed=1, acc=0.64, nmi=0.70, ari=0.52, m2o=0.88, scan_acc=0.58,
                  selflabel=False),
    ]


def test_mean_std_arithmetic():
    mean, std, n = mean_std([0.80, 0.84])
    assert n == 2 and mean == pytest.approx(0.82) and std == pytest.approx(0.0282842712)  # sample std, ddof=1
    assert mean_std([0.5, None, 0.7, 0.9])[1:] == (pytest.approx(0.2), 3)
    assert mean_std([0.4]) == (pytest.approx(0.4), None, 1)
    assert mean_std([None, float("nan")]) == (None, None, 0)


def test_paper_values():
    expected = {"cifar10": (88.3, 79.7, 77.2), "cifar20": (50.7, 48.6, 33.3), "stl10": (80.9, 69.8, 64.6),
                "imagenet50": (76.8, 82.2, 66.1), "imagenet100": (68.9, 80.8, 57.6),
                "imagenet200": (58.1, 77.2, 47.0), "imagenet1k": (39.9, 72.0, 27.5)}
    assert {k: v["selflabel"] for k, v in PAPER_RESULTS.items()} == expected
    assert [PAPER_RESULTS[k]["k"] for k in expected] == [10, 20, 10, 50, 100, 200, 1000]


def test_load_run(fake_runs):
    run = load_run(fake_runs[1])
    assert (run["preset"], run["num_clusters"], run["seed"], run["label"]) == ("cifar10", 10, 1, "c10_k10_s1")
    assert (run["acc"], run["scan_acc"], run["kmeans_acc"], run["acc_many_to_one"]) == (0.84, 0.79, 0.22, 0.86)
    assert run["best_head_acc"] == 0.81 and load_run(fake_runs[0])["best_head_acc"] == 0.75
    assert run["selflabel"] and run["seconds"]["total"] == pytest.approx(181.0)
    assert not load_run(fake_runs[3])["selflabel"]


def test_comparison_cli(fake_runs, tmp_path, capsys):
    out, plots = tmp_path / "cmp" / "compare.md", tmp_path / "plots"
    assert report.main([*map(str, fake_runs), "--out", str(out), "--plots", str(plots)]) == 0
    printed = capsys.readouterr().out
    text = out.read_text()
    assert printed == text
    # mean ± sample std over the 2 seeds, the paper's row and ours − paper (only where K = the paper's 10)
    assert ("| cifar10 | 10 | 2 | 0, 1 | 82.0 ± 2.8 | 71.0 ± 1.4 | 62.0 ± 2.8 | 88.3 | 79.7 | 77.2 "
            "| -6.3 | -8.7 | -15.2 |") in text
    assert "| cifar10 | 20 | 2 | 0, 1 | 62.0 ± 2.8 | 69.0 ± 1.4 | 51.0 ± 1.4 | — | — | — | — | — | — |" in text
    # per stage over the seeds: k-means, SCAN stage, best head (seed 1's other head beats its selected one), final,
    # self-label gain, worst seed (the K=20 group has one run with self-labelling: its gain has no std)
    assert "| cifar10 | 10 | 2 | 0, 1 | 22.0 ± 0.0 | 77.0 ± 2.8 | 78.0 ± 4.2 | 82.0 ± 2.8 | +5.0 ± 0.0 | 80.0 |" in text
    assert "| cifar10 | 20 | 2 | 0, 1 | 22.0 ± 0.0 | 56.5 ± 2.1 | 56.5 ± 2.1 | 62.0 ± 2.8 | +5.0 | 60.0 |" in text
    # per run: k-means, SCAN head, final, self-label gain, paper SCAN step, seconds per stage and total
    assert ("| c10_k10_s1 | cifar10 | 10 | 1 | 22.0 | 79.0 | 84.0 | +5.0 | 81.6 | 101.0 | 5.0 | 2.0 | 30.0 "
            "| 40.0 | 3.0 | 181.0 |") in text
    # no self-labelling stage: no gain, and its stage time is a dash
    assert "| c10_k20_s1 | cifar10 | 20 | 1 | 22.0 | 58.0 | 64.0 | — | — | 101.0 | 5.0 | 2.0 | 30.0 | — | 3.0 | 141.0 |" \
        in text
    # the unknown-K table: Hungarian (one-to-one on the best clusters) vs many-to-one vs NMI
    assert "## Overclustering / unknown K" in text
    assert "| cifar10 | 10 | 2 | 10 | 10 | 82.0 ± 2.8 | 84.0 ± 2.8 | 71.0 ± 1.4 |" in text
    assert "| cifar10 | 20 | 2 | 10 | 20 | 62.0 ± 2.8 | 87.0 ± 1.4 | 69.0 ± 1.4 |" in text
    for name in ("stage_accuracy.png", "acc_vs_k-cifar10.png"):
        _assert_png(plots / name)
        assert f"](../plots/{name})" in text  # linked relative to the Markdown file
    assert sorted(os.listdir(plots)) == ["acc_vs_k-cifar10.png", "stage_accuracy.png"]


def test_comparison_defaults_single_k(fake_runs, capsys):
    assert report.main([str(fake_runs[0]), str(fake_runs[1])]) == 0
    plots = fake_runs[0] / "report_plots"
    _assert_png(plots / "stage_accuracy.png")
    assert not (plots / "acc_vs_k-cifar10.png").exists()
    text = (plots / "report.md").read_text()
    assert "Overclustering" not in text and "](stage_accuracy.png)" in text
    assert capsys.readouterr().out == text


def test_comparison_without_paper_row(tmp_path):
    run = load_run(_fake_run(tmp_path, "smoke_run", preset="smoke", k=10, acc=0.397, nmi=0.409, ari=0.2836))
    text = format_comparison_md([run])
    assert "| smoke | 10 | 1 | 0 | 39.7 | 40.9 | 28.4 | — | — | — | — | — | — |" in text  # single run: no ±


def test_comparison_errors(tmp_path, capsys):
    assert report.main([str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "run folder not found" in err and "missing" in err

    (tmp_path / "empty").mkdir()
    assert report.main([str(tmp_path / "empty")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no metrics.json" in err

    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "metrics.json").write_text("{not json")
    assert report.main([str(tmp_path / "broken")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cannot read" in err


def test_comparison_module_exit_code(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "scan_dist.report", str(tmp_path / "nope")],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"scan_dist.report: error: run folder not found: {tmp_path / 'nope'}"]


def test_setups_group_by_result_settings_and_changes_pair_by_seed(tmp_path):
    """Runs that differ only in threads are one setup's seeds; a run with another mine.k is another setup, named by
    the setting it changes, and the ablation table pairs it with the reference seed by seed."""
    root = tmp_path / "runs"
    reference = [_fake_run(root, "ref_s0", seed=0, acc=0.70, scan_acc=0.69, mine_k=20),
                 _fake_run(root, "ref_s1", seed=1, acc=0.74, scan_acc=0.72, mine_k=20, threads=8),
                 _fake_run(root, "ref_s2", seed=2, acc=0.72, scan_acc=0.71, mine_k=20)]
    changed = [_fake_run(root, "k10_s0", seed=0, acc=0.73, scan_acc=0.71, mine_k=10, scan_seconds=40.0),
               _fake_run(root, "k10_s1", seed=1, acc=0.73, scan_acc=0.74, mine_k=10, scan_seconds=40.0),
               _fake_run(root, "k10_s7", seed=7, acc=0.99, scan_acc=0.99, mine_k=10)]  # no reference: unpaired
    runs = [load_run(p) for p in reference + changed]
    assert runs[0]["setup"]["mine.k"] == 20 and "mine.backend" not in runs[0]["setup"]  # not a result setting
    assert "run.threads" not in runs[0]["setup"] and "run.seed" not in runs[0]["setup"]
    text = format_comparison_md(runs)
    # two setups, not one group of six runs: threads=8 is a seed of the reference
    assert "| cifar10 | 10 | 3 | 0, 1, 2 | 72.0 ± 2.0 |" in text
    assert "| cifar10 mine.k=10 | 10 | 3 | 0, 1, 7 | 81.7 ± 15.0 |" in text
    # paired: seeds 0 and 1 only; final +3.0 and -1.0, SCAN stage +2.0 and +2.0; 10 s more per run
    assert "## Changes against the reference setup" in text
    # the 95 % interval: 1.0 ± t(0.975, 1) · 2.83 / √2 = 1.0 ± 12.71 · 2.0
    assert ("| cifar10 | 10 | mine.k=10 | by seed | 2 | 0, 1 | +2.0 ± 0.0 | +1.0 ± 2.8 | [-24.4, +26.4] | +3.0, -1.0 "
            "| 1 of 2 | +10 |" in text)
    assert "| k10_s1 | cifar10 mine.k=10 | 10 | 1 |" in text and "| ref_s1 | cifar10 | 10 | 1 |" in text


def test_a_simclr_change_is_compared_unpaired_over_all_seeds(tmp_path):
    """A pretext-stage change retrains the backbone, so its row compares the two setups' means over all their seeds
    (the reference's unpartnered seeds too) with Welch's interval, while a later change in the same call stays
    paired by seed."""
    from scipy.stats import ttest_ind

    root = tmp_path / "runs"
    ref_acc = {0: 0.70, 1: 0.76, 2: 0.72, 3: 0.75}
    reference = [_fake_run(root, f"ref_s{s}", seed=s, acc=a, scan_acc=a - 0.01, pretext_lr=0.4)
                 for s, a in ref_acc.items()]
    arm_acc = {0: 0.74, 1: 0.71, 5: 0.73}  # seed 5 has no reference partner and still counts
    simclr = [_fake_run(root, f"lr_s{s}", seed=s, acc=a, scan_acc=a - 0.02, pretext_lr=0.6)
              for s, a in arm_acc.items()]
    later = [_fake_run(root, f"k_s{s}", seed=s, acc=ref_acc[s] + 0.01, scan_acc=ref_acc[s], pretext_lr=0.4,
                       mine_k=10) for s in (0, 1)]
    runs = [load_run(p) for p in reference + simclr + later]
    assert runs[0]["simclr_setup"]["pretext.lr"] == 0.4 and "run.seed" not in runs[0]["simclr_setup"]
    assert "mine.k" not in runs[-1]["simclr_setup"]
    text = format_comparison_md(runs)
    ours, theirs = [100 * a for a in arm_acc.values()], [100 * a for a in ref_acc.values()]
    low, high = ttest_ind(ours, theirs, equal_var=False).confidence_interval(0.95)
    # final means 72.67 and 73.25: -0.6; SCAN stage 70.67 - 72.25 = -1.6; run seconds (pretext 100 + seed) 102 - 101.5
    assert (f"| cifar10 | 10 | pretext.lr=0.6 | unpaired (SimCLR retrained) | 3 vs 4 | 0, 1, 5 | -1.6 | -0.6 "
            f"| [{low:+.1f}, {high:+.1f}] | — | — | +0 |") in text
    assert "| cifar10 | 10 | mine.k=10 | by seed | 2 | 0, 1 | +1.0 ± 0.0 | +1.0 ± 0.0 | [+1.0, +1.0] |" in text


def test_welch_interval_needs_two_runs_a_side():
    assert report._welch_interval([72.0], [70.0, 74.0]) == "—"
    assert report._welch_interval([72.0, 72.0], [70.0, 70.0]) == "[+2.0, +2.0]"
    # equal spreads and sizes: Welch's degrees of freedom are n_a + n_b - 2, as Student's
    assert report._welch_interval([1.0, 3.0], [0.0, 2.0]) == "[-5.1, +7.1]"


def test_one_setup_has_no_ablation_table_and_a_missing_key_is_unset(tmp_path, fake_runs):
    assert "## Changes against the reference setup" not in format_comparison_md([load_run(p) for p in fake_runs])
    old = load_run(_fake_run(tmp_path, "old", seed=0))  # a config.yaml without the mine section
    new = load_run(_fake_run(tmp_path, "new", seed=0, acc=0.9, mine_k=10))
    text = format_comparison_md([new, old])
    assert "| cifar10 mine.k=(unset) | 10 | 1 | 0 |" in text
    assert "| cifar10 | 10 | mine.k=(unset) | by seed | 1 | 0 | +0.0 | -10.0 | — | -10.0 | 0 of 1 | +0 |" in text


EPYC_AVX2 = {"cpu": "AMD EPYC", "cpu_capability": "AVX2", "cpus": 2, "threads": 2, "torch": "2.14.1",
             "python": "3.11.7"}
EPYC_AVX512 = {**EPYC_AVX2, "cpu_capability": "AVX512"}
STAGE_NAMES = ("pretext", "embed", "mine", "scan", "selflabel", "evaluate")


def _on(machine, **per_stage):
    """A machines record: every stage on ``machine`` but those named (stage=record)."""
    return {stage: per_stage.get(stage, machine) for stage in STAGE_NAMES}


def test_pairs_across_machine_kinds_are_counted_and_the_kinds_listed(tmp_path):
    """A --from arm whose rerun stage ran on a CPU with another instruction set is a pair of two draws: the changes
    table counts it out of "Same machine", and a Machines table names each kind with its runs. A record without
    cpu_capability (an older run) is not held against a newer one; a run without records is unknown."""
    root = tmp_path / "runs"
    reference = [_fake_run(root, f"ref_s{s}", seed=s, acc=0.70 + s / 100, mine_k=20, machines=_on(EPYC_AVX2))
                 for s in range(3)]
    old_record = {k: v for k, v in EPYC_AVX2.items() if k != "cpu_capability"}
    arm = [_fake_run(root, "k10_s0", seed=0, acc=0.71, mine_k=10, machines=_on(EPYC_AVX2)),
           _fake_run(root, "k10_s1", seed=1, acc=0.72, mine_k=10,
                     machines=_on(EPYC_AVX2, mine=EPYC_AVX512, scan=EPYC_AVX512)),
           _fake_run(root, "k10_s2", seed=2, acc=0.73, mine_k=10, machines=_on(old_record))]
    runs = [load_run(p) for p in reference + arm]
    assert runs[4]["machines"]["scan"]["cpu_capability"] == "AVX512"
    assert [report.same_machine(runs[i], runs[3 + i]) for i in range(3)] == [True, False, True]
    text = format_comparison_md(runs)
    assert "| Same machine |" in text
    assert "| cifar10 | 10 | mine.k=10 | by seed | 3 | 0, 1, 2 |" in text
    row = next(line for line in text.splitlines() if line.startswith("| cifar10 | 10 | mine.k=10 | by seed"))
    assert row.endswith("| 2 of 3 |")
    assert "## Machines" in text
    # the record without an instruction set joins the kind it does not contradict, named by the richer record
    assert "| AMD EPYC (AVX2), 2 threads, torch 2.14.1 | 5 | ref_s0, ref_s1, ref_s2, k10_s0, k10_s2 |" in text
    assert ("| AMD EPYC (AVX2), 2 threads, torch 2.14.1 + AMD EPYC (AVX512), 2 threads, torch 2.14.1 | 1 | k10_s1 |"
            in text)
    assert report.run_machine(runs[5]) == "AMD EPYC, 2 threads, torch 2.14.1"

    unknown = load_run(_fake_run(root, "k10_s9", seed=0, acc=0.75, mine_k=10))  # metrics.json without machines
    assert unknown["machines"] == {} and report.same_machine(unknown, runs[0]) is None
    row = next(line for line in format_comparison_md(runs[:3] + [unknown]).splitlines()
               if line.startswith("| cifar10 | 10 | mine.k=10 | by seed"))
    assert row.endswith("| 0 of 1 (1 unknown) |")


def test_one_machine_kind_has_no_machines_table(tmp_path):
    """Records made before `cpu_capability` existed and a --from run that added newer ones are one kind."""
    root = tmp_path / "runs"
    old_record = {k: v for k, v in EPYC_AVX2.items() if k != "cpu_capability"}
    runs = [load_run(_fake_run(root, "s0", seed=0, machines=_on(old_record))),
            load_run(_fake_run(root, "s1", seed=1, machines=_on(old_record, selflabel=EPYC_AVX2))),
            load_run(_fake_run(root, "s2", seed=2, machines=_on(EPYC_AVX2)))]
    assert [len(report.machine_kinds(run)) for run in runs] == [1, 1, 1]
    assert report.run_machine(runs[1]) == "AMD EPYC (AVX2), 2 threads, torch 2.14.1"
    assert "## Machines" not in format_comparison_md(runs)


def test_an_unpaired_row_counts_runs_on_the_reference_kind(tmp_path):
    """A SimCLR change is compared over all seeds: its "Same machine" counts its runs whose every stage matches
    every reference run's machine."""
    root = tmp_path / "runs"
    reference = [_fake_run(root, f"ref_s{s}", seed=s, pretext_lr=0.4, machines=_on(EPYC_AVX2)) for s in range(2)]
    arm = [_fake_run(root, "lr_s0", seed=0, pretext_lr=0.6, machines=_on(EPYC_AVX2)),
           _fake_run(root, "lr_s1", seed=1, pretext_lr=0.6, machines=_on(EPYC_AVX512))]
    row = next(line for line in format_comparison_md([load_run(p) for p in reference + arm]).splitlines()
               if "unpaired" in line)
    assert row.endswith("| 1 of 2 |")


def test_a_seed_on_two_kinds_of_machine_splits_its_setup(tmp_path):
    """The same seeds run with AVX-512 and with AVX2 kernels are two draws each: two setups, the second named by
    its instruction set, compared unpaired; seeds on one kind each, however mixed the kinds, stay one setup."""
    root = tmp_path / "runs"
    wide = [_fake_run(root, f"wide_s{s}", seed=s, acc=0.74 + s / 100, machines=_on(EPYC_AVX512)) for s in range(2)]
    capped = [_fake_run(root, f"avx2_s{s}", seed=s, acc=0.77 - s / 100, machines=_on(EPYC_AVX2)) for s in range(2)]
    runs = [load_run(p) for p in wide + capped]
    assert report.run_changes(runs) == ["", "", "[cpu_capability=AVX2]", "[cpu_capability=AVX2]"]
    text = format_comparison_md(runs)
    assert "| cifar10 [cpu_capability=AVX2] | 10 | 2 | 0, 1 |" in text
    row = next(line for line in text.splitlines() if "unpaired (another machine)" in line)
    assert "| 2 vs 2 | 0, 1 |" in row and "| +2.0 |" in row and row.endswith("| 0 of 2 |")
    mixed = [load_run(p) for p in (wide[0], capped[1])]  # seeds 0 and 1, one kind each: one setup
    assert report.run_changes(mixed) == ["", ""]


def test_a_run_on_two_kinds_is_named_by_the_entry_that_differs(tmp_path):
    """A --from run whose later stages ran with the other kernel width: its tag lists the widths in stage order."""
    root = tmp_path / "runs"
    runs = [load_run(_fake_run(root, "wide_s0", seed=0, machines=_on(EPYC_AVX512))),
            load_run(_fake_run(root, "crossed_s0", seed=0, machines=_on(EPYC_AVX2, scan=EPYC_AVX512,
                                                                            selflabel=EPYC_AVX512,
                                                                            evaluate=EPYC_AVX512)))]
    assert report.run_changes(runs) == ["", "[cpu_capability=AVX2 + AVX512]"]
