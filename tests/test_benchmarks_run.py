"""Tests for benchmarks/run.py: discovery, failure isolation, JSON collection, the combined file and the plots."""
import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from benchmarks import run as runner

REPO = Path(__file__).resolve().parent.parent
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

_WRITER = """
import argparse, json, os, sys
from pathlib import Path
parser = argparse.ArgumentParser()
parser.add_argument("--small", action="store_true")
{out_flag}
args = parser.parse_args()
print("running {name}, small =", args.small)
payload = {{"environment": {{"device_type": "{device_type}", "device": "fake"}},
            "config": {{"small": args.small, "baselines": ["base"]}},
            "results": [{{"impl": "base", "shape": "s1", "median_ms": 4.0}},
                        {{"impl": "ours", "shape": "s1", "median_ms": 1.0, "interpreter": True}},
                        {{"impl": "base", "shape": "s2", "median_ms": 9.0}},
                        {{"impl": "ours", "shape": "s2", "median_ms": 3.0}}]}}
out = {out_dir}
out.mkdir(parents=True, exist_ok=True)
(out / "{name}-{device_type}-20990101-000000.json").write_text(json.dumps(payload))
"""


def _script(folder: Path, name: str, body: str) -> None:
    (folder / f"bench_{name}.py").write_text(textwrap.dedent(body))


def _writer(name: str, device_type: str = "cpu", with_out: bool = True) -> str:
    return _WRITER.format(
        name=name, device_type=device_type,
        out_flag='parser.add_argument("--out", type=Path, default=None)' if with_out else "",
        out_dir="args.out" if with_out else 'Path(os.environ["FAKE_RESULTS"])')


def _png(path: Path) -> None:
    assert path.read_bytes()[:8] == PNG_MAGIC


@pytest.fixture
def scripts(tmp_path, monkeypatch):
    folder = tmp_path / "scripts"
    folder.mkdir()
    _script(folder, "aaa_crash", 'import sys\nprint("about to fail")\nsys.exit("boom: out of memory")\n')
    _script(folder, "good", _writer("good"))
    _script(folder, "gpu", _writer("gpu", device_type="cuda"))
    # no --out flag: writes to the results folder, collected by name and modification time
    results = tmp_path / "results"
    results.mkdir()
    (results / "noout-cpu-19990101-000000.json").write_text('{"stale": true}')  # older than the run: ignored
    monkeypatch.setenv("FAKE_RESULTS", str(results))
    monkeypatch.setattr(runner, "RESULTS_DIR", results)
    _script(folder, "noout", _writer("noout", with_out=False))
    old = time.time() - 3600
    os.utime(results / "noout-cpu-19990101-000000.json", (old, old))
    _script(folder, "silent", "print('forgot to write JSON')\n")
    _script(folder, "slowpoke", "import time\ntime.sleep(60)\n")
    (folder / "helper.py").write_text("raise SystemExit('not a benchmark')\n")
    return folder


def test_discover_and_flags(scripts):
    assert list(runner.discover(scripts)) == ["aaa_crash", "good", "gpu", "noout", "silent", "slowpoke"]
    assert runner.script_flags(scripts / "bench_good.py") == {"--small", "--out"}
    assert runner.script_flags(scripts / "bench_noout.py") == {"--small"}
    real = runner.discover(REPO / "benchmarks")
    assert {"knn", "pipeline", "scan_loss", "train_step"} <= set(real)
    for path in real.values():
        assert {"--small", "--out"} <= runner.script_flags(path)
    for name in ("knn", "scan_loss", "train_step", "scan_epoch", "host_memory"):  # sized by --budget-s
        assert "--budget-s" in runner.script_flags(real[name])


def test_failures_are_reported_and_others_run(scripts, tmp_path, capsys):
    out = tmp_path / "out"
    code = runner.main(["--small", "--scripts-dir", str(scripts), "--out-dir", str(out), "--timeout-s", "3",
                        "--only", "aaa_crash", "good", "gpu", "noout", "silent", "slowpoke"])
    assert code == 1  # something failed, but everything ran and the combined files exist
    printed = capsys.readouterr().out
    assert "[good] running good, small = True" in printed

    cpu = list(out.glob("all-cpu-*.json"))
    cuda = list(out.glob("all-cuda-*.json"))
    assert len(cpu) == 1 and len(cuda) == 1  # one file per device type
    combined = json.loads(cpu[0].read_text())
    assert combined["environment"]["device_type"] == "cpu"
    benches = combined["benchmarks"]
    assert sorted(benches) == ["aaa_crash", "good", "noout", "silent", "slowpoke"]
    assert benches["aaa_crash"]["error"] == "exit status 1"
    assert "boom: out of memory" in benches["aaa_crash"]["output_tail"]
    assert benches["silent"]["error"] == "finished but wrote no JSON"
    assert benches["slowpoke"]["error"].startswith("timed out")
    assert benches["good"]["config"]["small"] is True and len(benches["good"]["results"]) == 4
    assert benches["noout"]["results"][0]["impl"] == "base"  # collected from results/, the stale file skipped
    assert list(json.loads(cuda[0].read_text())["benchmarks"]) == ["gpu"]

    stem = cpu[0].stem
    _png(out / f"{stem}-good.png")
    _png(out / f"{stem}-noout.png")
    _png(out / f"{cuda[0].stem}-gpu.png")
    assert not (out / f"{stem}-aaa_crash.png").exists()


def test_budget_shares(tmp_path, monkeypatch, capsys):
    """--budget-s: a script that declares it gets its share (less start-up), one that does not is killed at its
    share, and the whole run ends within the budget."""
    assert runner.share_s(90, {"big": 2.0}, ["big", "a", "b"]) == 45.0
    assert runner.share_s(90, {"big": 2.0}, ["a", "big", "b"]) == 22.5
    assert runner.share_s(-5, {}, ["a"]) == 0.0
    folder = tmp_path / "scripts"
    folder.mkdir()
    _script(folder, "a_budgeted", textwrap.dedent("""
        import argparse, json
        from pathlib import Path
        parser = argparse.ArgumentParser()
        parser.add_argument("--out", type=Path)
        parser.add_argument("--budget-s", type=float, default=None)
        args = parser.parse_args()
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "x.json").write_text(json.dumps({"environment": {"device_type": "cpu"},
                                                     "config": {"budget_s": args.budget_s}, "results": []}))
    """))
    _script(folder, "b_sleepy", "import time\ntime.sleep(60)\n")
    monkeypatch.setattr(runner, "_RUNNER_RESERVE_S", 0.0)
    monkeypatch.setattr(runner, "_STARTUP_S", 0.0)
    start = time.perf_counter()
    code = runner.main(["--scripts-dir", str(folder), "--out-dir", str(tmp_path / "out"), "--budget-s", "8",
                        "--no-plots"])
    elapsed = time.perf_counter() - start
    assert code == 1 and elapsed < 8 + 2.0, elapsed
    (combined,) = (tmp_path / "out").glob("all-cpu-*.json")
    benches = json.loads(combined.read_text())["benchmarks"]
    assert benches["a_budgeted"]["config"]["budget_s"] == 4.0  # half of 8 s, less 10 %, rounded
    assert benches["b_sleepy"]["error"].startswith("timed out")
    assert "no --budget-s flag" in benches["b_sleepy"]["runner_notes"][0]


def test_unknown_name_is_a_usage_error(scripts, tmp_path, capsys):
    assert runner.main(["--scripts-dir", str(scripts), "--out-dir", str(tmp_path), "--only", "nope"]) == 2
    assert "unknown benchmark(s) nope" in capsys.readouterr().err
    assert runner.main(["--scripts-dir", str(tmp_path / "none"), "--out-dir", str(tmp_path)]) == 2


def test_plot_series_throughput_and_labels():
    payload = {"config": {}, "results": [
        {"impl": "tv2", "pipeline": "simclr", "views_per_s": 100.0, "median_ms": 5.0, "workers": 2},
        {"impl": "dali", "pipeline": "simclr", "views_per_s": 250.0, "threads": 2},
        {"impl": "dali", "pipeline": "selflabel", "views_per_s": 200.0, "threads": 2}]}
    metric, unit, cases = runner.plot_series("pipeline", payload)
    assert metric == "views_per_s" and "higher" in unit
    assert [(b[0], b[1], b[2]) for b in cases["simclr"]] == [("tv2 workers=2", 100.0, True),
                                                             ("dali threads=2", 250.0, False)]
    assert list(cases) == ["simclr", "selflabel"]


@pytest.mark.slow
def test_real_scan_loss_small(tmp_path):
    """The real runner on the fastest benchmark (repeats cut down so it stays well under a minute)."""
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "benchmarks.run", "--small", "--only", "scan_loss",
                           "--out-dir", str(tmp_path), "--script-args", "scan_loss", "--repeats 3 --warmup 1"],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    elapsed = time.perf_counter() - start
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (combined,) = tmp_path.glob("all-*.json")
    data = json.loads(combined.read_text())
    payload = data["benchmarks"]["scan_loss"]
    assert "error" not in payload and payload["config"]["small"] is True
    assert {r["impl"] for r in payload["results"]} >= {"torch", "triton"}
    assert data["environment"]["device_type"] == payload["environment"]["device_type"]
    _png(tmp_path / f"{combined.stem}-scan_loss.png")
    assert elapsed < 180, f"took {elapsed:.0f} s"
