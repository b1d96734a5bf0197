"""benchmarks/screen_arms.py: arms paired with the reference by seed (--from), the run order, the budget's SIGTERM,
resuming, one-line errors, the package farm of an uninstalled checkout, and one real screen of the smoke preset."""
import json
import subprocess
import sys
import textwrap
import time

import pytest

from benchmarks.screen_arms import (REFERENCE, Screen, launcher, main, package_farm, parse_args, parse_seeds,
                                    plan_runs)

# A stand-in for `python -m scan_dist.launch`: writes a finished run folder whose ACC is 0.70 + seed/100, plus 0.01
# for the setting `selflabel.class_balance=false`; `run.threads=9` makes it sleep (until SIGTERM: exit 143, as the
# launcher does on preemption); `run.seed=7` on the reference makes it fail. Each call appends to calls.txt.
STUB = textwrap.dedent('''
    import json, signal, sys, time
    from pathlib import Path
    args = sys.argv[1:]
    run_dir = Path(args[args.index("--run-dir") + 1])
    source = args[args.index("--from") + 1] if "--from" in args else None
    settings = dict(a.split("=", 1) for a in args if "=" in a)
    with open(Path(sys.argv[0]).parent / "calls.txt", "a") as f:
        f.write(json.dumps({"run_dir": str(run_dir), "from": source, "settings": settings, "t": time.time()}) + "\\n")
    signal.signal(signal.SIGTERM, lambda *a: sys.exit(143))
    if settings.get("run.threads") == "9":
        time.sleep(60)
    seed = int(settings["run.seed"])
    if seed == 7 and source is None:
        sys.exit(1)
    time.sleep(0.3)
    run_dir.mkdir(parents=True, exist_ok=True)
    balance = settings.get("selflabel.class_balance", "true")
    (run_dir / "config.yaml").write_text(f"name: demo\\nnum_clusters: 10\\nrun: {{seed: {seed}}}\\n"
                                         f"selflabel: {{class_balance: {balance}}}\\n")
    acc = 0.70 + seed / 100 + (0.01 if balance == "false" else 0.0)
    (run_dir / "metrics.json").write_text(json.dumps({"preset": "demo", "acc": acc, "nmi": 0.6, "ari": 0.5,
                                                      "seconds": {"total": 1.0}}))
''')


def stub_screen(tmp_path, seeds, arms, common=(), parallel=2, budget_s=None):
    stub = tmp_path / "stub.py"
    stub.write_text(STUB)
    runs = plan_runs(tmp_path / "runs", seeds, list(common), arms)
    return Screen(runs, "demo", [sys.executable, str(stub)], parallel, budget_s, tmp_path / "out", ["test"],
                  grace_s=10, poll_s=0.05)


def calls(tmp_path):
    path = tmp_path / "calls.txt"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_seeds_take_ranges_and_lists():
    assert parse_seeds("0-3") == [0, 1, 2, 3]
    assert parse_seeds("0-1,5") == [0, 1, 5]
    for bad in ("1,1", "x", "", "0-1,1"):
        with pytest.raises(Exception, match="--seeds"):
            parse_seeds(bad)


def test_arms_start_from_their_seeds_reference_and_the_summary_pairs_them(tmp_path):
    screen = stub_screen(tmp_path, [0, 1], {"nobal": ["selflabel.class_balance=false"]})
    result = screen.run()
    assert [r["status"] for r in result["runs"]] == ["done"] * 4
    assert result["runs"][0]["stage_seconds"] == {"total": 1.0} and result["runs"][0]["wall_s"] > 0
    made = calls(tmp_path)
    for call in made:
        arm, seed = call["run_dir"].split("/")[-2:]
        if arm == REFERENCE:
            assert call["from"] is None and "selflabel.class_balance" not in call["settings"]
        else:
            assert call["from"] == str(tmp_path / "runs" / REFERENCE / seed)
            ref_call = next(c for c in made if c["run_dir"] == call["from"])
            assert ref_call["t"] < call["t"]  # the arm waited for its reference to finish
        assert call["settings"]["run.seed"] == seed.removeprefix("seed")
    nobal = result["arms"]["nobal"]
    assert nobal["paired_delta_final_by_seed"] == {"0": 1.0, "1": 1.0}
    assert nobal["paired"] == 2 and nobal["paired_delta_mean"] == pytest.approx(1.0)
    assert result["arms"][REFERENCE]["final_acc_mean"] == pytest.approx(70.5)
    assert json.loads((tmp_path / "out" / "screen.json").read_text())["arms"] == result["arms"]
    report = (tmp_path / "out" / "report.md").read_text()
    row = next(line for line in report.splitlines() if "class_balance" in line and "+1.0" in line)
    assert "2 of 2" in row  # the report's paired ablation table: better on both seeds
    # A run folder whose metrics.json breaks later: named in screen.json, left out of the report.
    (tmp_path / "runs" / "nobal" / "seed1" / "metrics.json").write_text("{not json")
    broken = stub_screen(tmp_path, [0, 1], {"nobal": ["selflabel.class_balance=false"]}).run()
    assert "cannot read" in broken["runs"][3]["error"] and broken["arms"]["nobal"]["paired"] == 1
    assert "| 1 | 0 |" in (tmp_path / "out" / "report.md").read_text()  # the paired row: n = 1, seed 0
    (tmp_path / "runs" / "nobal" / "seed1" / "metrics.json").unlink()
    calls_before = len(calls(tmp_path))
    stub_screen(tmp_path, [0, 1], {"nobal": ["selflabel.class_balance=false"]}).run()
    assert len(calls(tmp_path)) == calls_before + 1  # the unfinished one runs again
    # The same screen again: every run is finished, nothing is launched.
    again = stub_screen(tmp_path, [0, 1], {"nobal": ["selflabel.class_balance=false"]}).run()
    assert len(calls(tmp_path)) == 5 and again["arms"] == result["arms"]


def test_runs_go_in_pairs_and_never_more_than_parallel_at_once(tmp_path):
    screen = stub_screen(tmp_path, [0, 1, 2], {"a": ["selflabel.class_balance=false"], "b": ["scan.lr=0.01"]},
                         parallel=2)
    assert [(r.arm, r.seed) for r in screen.runs] == [(REFERENCE, 0), ("a", 0), ("b", 0), (REFERENCE, 1), ("a", 1),
                                                      ("b", 1), (REFERENCE, 2), ("a", 2), ("b", 2)]
    peak = 0
    original = screen._launch

    def counting(run):
        nonlocal peak
        original(run)
        peak = max(peak, sum(r.status == "running" for r in screen.runs))

    screen._launch = counting
    result = screen.run()
    assert all(r["status"] == "done" for r in result["runs"]) and peak == 2


def test_the_budget_stops_running_runs_with_sigterm_and_leaves_the_rest_waiting(tmp_path):
    screen = stub_screen(tmp_path, [0, 1], {"a": ["selflabel.class_balance=false"]}, common=["run.threads=9"],
                         parallel=1, budget_s=1.0)
    begin = time.monotonic()
    result = screen.run()
    assert time.monotonic() - begin < 10  # the stub sleeps 60 s unless stopped
    statuses = {(r["arm"], r["seed"]): (r["status"], r["rc"]) for r in result["runs"]}
    assert statuses == {(REFERENCE, 0): ("stopped", 143), ("a", 0): ("waiting", None),
                        (REFERENCE, 1): ("waiting", None), ("a", 1): ("waiting", None)}
    assert not (tmp_path / "out" / "report.md").exists()  # nothing finished, nothing to report


def test_a_failed_reference_skips_its_arms_and_the_others_go_on(tmp_path):
    result = stub_screen(tmp_path, [6, 7], {"a": ["selflabel.class_balance=false"]}).run()
    statuses = {(r["arm"], r["seed"]): r["status"] for r in result["runs"]}
    assert statuses == {(REFERENCE, 6): "done", ("a", 6): "done", (REFERENCE, 7): "failed", ("a", 7): "skipped"}
    assert "$ " in (tmp_path / "out" / "logs" / "ref_seed7.log").read_text()  # each run's command heads its log


def test_bad_arguments_are_refused_by_name(capsys):
    for argv, fragment in ((["r", "--arm", "ref", "scan.lr=1"], "--arm ref"),
                           (["r", "--arm", "x"], "--arm x: give the settings"),
                           (["r", "--arm", "x", "scan.lr"], "--arm x: give the settings"),
                           (["r", "--arm", "x", "scan.lr=1", "--arm", "x", "scan.lr=2"], "--arm x"),
                           (["r", "--set", "run.seed=3"], "--set"),
                           (["r", "--parallel", "0"], "--parallel")):
        with pytest.raises(SystemExit):
            parse_args(argv)
        assert fragment in capsys.readouterr().err
    args = parse_args(["runs/s", "--arm", "nobal", "selflabel.class_balance=false", "--set", "data.workers=2"])
    assert args.arms == {"nobal": ["selflabel.class_balance=false"]} and str(args.out) == "runs/s"


def test_a_misspelt_setting_stops_the_screen_before_any_run(tmp_path):
    with pytest.raises(SystemExit) as stop:
        main([str(tmp_path / "r"), "--seeds", "0", "--arm", "x", "scan.nope=1"])
    assert "arm x" in str(stop.value) and "scan.nope" in str(stop.value)
    assert not (tmp_path / "r").exists()


def test_an_uninstalled_checkout_runs_the_launcher_through_a_package_farm(tmp_path):
    farm = package_farm(force=True)
    assert (farm / "scan_dist" / "kernels" / "__init__.py").is_file()
    # The farm comes first on the path, before an installed or checked-out scan_dist.
    where = subprocess.run([*launcher(farm)[:2], "import sys; sys.path.insert(0, sys.argv[1]); import scan_dist.kernels;"
                            " print(scan_dist.kernels.__file__)", str(farm)],
                           capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert where.stdout.strip() == str(farm / "scan_dist" / "kernels" / "__init__.py"), where.stderr
    result = subprocess.run([*launcher(farm), "--help"], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert result.returncode == 0 and "usage: python -m scan_dist.launch" in result.stdout, result.stderr


@pytest.mark.slow
def test_a_real_screen_of_the_smoke_preset_reruns_only_what_the_arm_changes(tmp_path, fashion_mnist):
    tiny = ["data.max_images=512", "data.max_eval_images=256", "pretext.batch_size=128", "scan.batch_size=64",
            "selflabel.batch_size=128", "mine.k=5", "mine.eval_k=3", "scan.num_heads=2", "run.progress=false"]
    argv = [sys.executable, "-m", "benchmarks.screen_arms", str(tmp_path / "runs"), "--preset", "smoke", "--seeds",
            "0", "--parallel", "2", "--out", str(tmp_path / "out"), "--arm", "nobal", "selflabel.class_balance=false"]
    for setting in tiny:
        argv += ["--set", setting]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    summary = json.loads((tmp_path / "out" / "screen.json").read_text())
    assert [r["status"] for r in summary["runs"]] == ["done", "done"]
    arm_log = (tmp_path / "out" / "logs" / "nobal_seed0.log").read_text()
    for stage in ("pretext", "embed", "mine", "scan"):  # copied from the reference's folder by --from
        assert f"stage {stage}: done in" not in arm_log, stage
    assert "stage selflabel: done in" in arm_log
    assert summary["arms"]["nobal"]["paired"] == 1
    assert "class_balance" in (tmp_path / "out" / "report.md").read_text()
