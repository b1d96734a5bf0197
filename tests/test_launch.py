"""The command line: one-line errors with exit status 2, --dry-run, --nodes without SLURM, unlabelled folders."""
import csv
import json
import os
import platform
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

from scan_dist import reproducibility
from scan_dist.launch import main


def run_cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "scan_dist.launch", *args], capture_output=True, text=True,
                          timeout=300, env=env)


def assert_one_line_error(result, *fragments, alone=True):
    """Exit status 2, no traceback, the error as the last line (and the only one when `alone`: failed at once)."""
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines[-1].startswith("error: "), result.stderr
    assert len(lines) == 1 or not alone, result.stderr
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in lines[-1], (fragment, lines[-1])


def test_unknown_key_is_one_line(tmp_path):
    assert_one_line_error(run_cli("--run-dir", str(tmp_path), "smoke", "scan.epoch=2"), "scan.epoch",
                          "scan.epochs")


def test_missing_data_path_names_it(tmp_path):
    missing = tmp_path / "nowhere"
    result = run_cli("--run-dir", str(tmp_path / "run"), "cifar10", f"data.path={missing}")
    assert_one_line_error(result, str(missing), "cifar-10-batches-py")


def test_nodes_without_slurm_points_to_local(tmp_path):
    # A PATH without sbatch, even where CI runs a local cluster.
    env = {k: v for k, v in os.environ.items() if k not in ("SLURM_CONF",)}
    env["PATH"] = str(tmp_path)
    result = run_cli("--nodes", "2", "--run-dir", str(tmp_path / "run"), "smoke", env=env)
    assert_one_line_error(result, "sbatch", "--local", "--dry-run")


def test_dry_run_prints_plan(tmp_path, capsys):
    assert main(["--dry-run", "--run-dir", str(tmp_path), "smoke", "scan.epochs=3"]) == 0
    out = capsys.readouterr().out
    assert "epochs: 3" in out and "pretext" in out and "run" in out
    assert not (tmp_path / "config.yaml").exists()


def test_num_clusters_larger_than_images(tmp_path, fashion_mnist):
    result = run_cli("--run-dir", str(tmp_path), "smoke", "data.max_images=20", "num_clusters=50",
                     "run.progress=false")
    assert_one_line_error(result, "num_clusters=50", "20", alone=False)


def _write_images(folder, count, size, seed=0):
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    for i in range(count):
        # three visually distinct families so clustering has something to find
        family = i % 3
        base = np.full((size, size + 3), 40 + 90 * family, dtype=np.uint8)
        noise = rng.integers(0, 30, base.shape, dtype=np.uint8)
        Image.fromarray(base + noise).convert("RGB").save(folder / f"img_{i:03d}.png")


def _truncated_jpeg(path):
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(path, quality=95)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


@pytest.mark.slow
def test_unlabelled_folder_end_to_end(tmp_path):
    _write_images(tmp_path / "photos", 48, 20)
    _truncated_jpeg(tmp_path / "photos" / "broken.jpg")
    run_dir = tmp_path / "run"
    args = ["--run-dir", str(run_dir), "smoke", f"data.path={tmp_path / 'photos'}", "data.format=auto",
            "data.image_size=16", "num_clusters=3", "mine.k=5", "mine.eval_k=3", "scan.batch_size=16",
            "pretext.batch_size=16", "selflabel.batch_size=16", "run.progress=false"]
    failed = run_cli(*args)
    assert_one_line_error(failed, "broken.jpg", alone=False)
    assert not (run_dir / "metrics.json").exists()
    result = run_cli(*args, "data.on_bad_image=skip")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "skipped 1 unreadable image(s), first: broken.jpg" in (run_dir / "log.txt").read_text()
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["acc"] is None and metrics["nmi"] is None
    with open(run_dir / "assignments.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert list(rows[0]) == ["path", "cluster", "confidence"]
    assert len(rows) == 49 and rows[1]["path"].endswith("img_000.png")
    skipped = [r for r in rows if r["path"] == "broken.jpg"]  # listed, with no cluster: left out of the results
    assert len(skipped) == 1 and skipped[0]["cluster"] == "-1"
    assert all(0 <= int(r["cluster"]) < 3 for r in rows if r["path"] != "broken.jpg")
    assert metrics["stages"]["evaluate"]["skipped_images"] == 1
    for name in ("report.md", "confusion.png", "prototypes.png"):
        assert (run_dir / name).is_file()


@pytest.mark.parametrize("torchrun_rank", [True, False])
def test_exit_process_skips_teardown_only_for_torchrun_ranks(torchrun_rank):
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "TORCHELASTIC_RUN_ID")}
    if torchrun_rank:
        env.update(WORLD_SIZE="2", TORCHELASTIC_RUN_ID="test")
    code = ("import atexit, logging\n"
            "from scan_dist.launch import exit_process\n"
            "atexit.register(lambda: print('teardown ran', flush=True))\n"
            "logging.getLogger('scan_dist').warning('logged before exit')\n"
            "exit_process(3)\n")
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 3
    assert "logged before exit" in proc.stderr
    assert ("teardown ran" in proc.stdout) is not torchrun_rank


@pytest.mark.slow
def test_diverging_loss_stops_the_stage_with_one_error_line(tmp_path):
    """pretext.lr=1e12 makes every loss NaN: the stage stops at the next read of the logged values with one
    `error:` line naming stage, epoch, steps, value and setting; exit 2; no DONE; nothing after it runs."""
    run_dir = tmp_path / "run"
    failed = run_cli("--run-dir", str(run_dir), "smoke", "pretext.lr=1e12", "run.progress=false")
    assert_one_line_error(failed, "pretext: loss became nan in epoch 1", alone=False)
    assert "pretext.lr=1000000000000.0 is the most likely cause" in failed.stderr
    assert not (run_dir / "pretext" / "DONE").exists() and not (run_dir / "embed").exists()


@pytest.mark.slow
def test_second_launch_on_a_busy_run_folder_fails_at_once(tmp_path):
    run_dir = tmp_path / "run"
    first = subprocess.Popen([sys.executable, "-m", "scan_dist.launch", "--run-dir", str(run_dir), "smoke",
                              "run.progress=false", "pretext.epochs=3"], stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while not (run_dir / ".lock").exists() and time.time() < deadline and first.poll() is None:
            time.sleep(0.05)
        second = run_cli("--run-dir", str(run_dir), "smoke", "run.progress=false")
        assert_one_line_error(second, "is in use by pid", str(first.pid), alone=False)
    finally:
        first.kill()
        first.wait()


@pytest.mark.slow
def test_readme_example_a_preset_pointed_at_a_photo_folder(tmp_path):
    """README: `python -m scan_dist.launch demo data.path=/data/photos num_clusters=5` -- here in its quick form (the
    smoke preset, tiny images): the preset's own data.format (idx) gives way to detection, which is logged."""
    _write_images(tmp_path / "photos", 40, 20)
    run_dir = tmp_path / "run"
    result = run_cli("--run-dir", str(run_dir), "smoke", f"data.path={tmp_path / 'photos'}", "num_clusters=3",
                     "data.image_size=16", "mine.k=5", "mine.eval_k=3", "scan.batch_size=16", "pretext.batch_size=16",
                     "selflabel.batch_size=16", "run.progress=false")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "data.format=auto: flat detected" in (run_dir / "log.txt").read_text()
    assert json.loads((run_dir / "metrics.json").read_text())["acc"] is None  # no labels in a flat folder


TINY = ["data.max_images=512", "data.max_eval_images=256", "pretext.batch_size=128", "scan.batch_size=64",
        "selflabel.batch_size=128", "mine.k=5", "mine.eval_k=3", "scan.num_heads=2", "run.progress=false"]


@pytest.mark.slow
def test_seeds_make_one_run_folder_each_and_a_mean_std_report(tmp_path, fashion_mnist):
    base = tmp_path / "runs"
    result = run_cli("--seeds", "3,4", "--run-dir", str(base), "smoke", *TINY)
    assert result.returncode == 0, result.stdout + result.stderr
    accs = []
    for seed in (3, 4):
        folder = base / f"seed{seed}"
        assert f"seed: {seed}" in (folder / "config.yaml").read_text()
        metrics = json.loads((folder / "metrics.json").read_text())
        accs.append(metrics["acc"])
        scan = metrics["stages"]["scan"]
        assert scan["select"] == "tie"  # the demo's rule, inherited by the smoke preset
        assert scan["loss_head"] == int(np.argmin(scan["selection_losses"])) == scan["tie"][0]
        assert scan["best_head"] == scan["tie_head"] and scan["tie_head"] in scan["tie"]
        assert scan["ensemble"][0] == scan["consensus_head"]
        rules = {"loss", "consensus", "tie", "ensemble"}
        assert set(metrics["stages"]["evaluate"]["scan_heads"]["acc_by_rule"]) == rules
    report = (base / "report.md").read_text()
    assert result.stdout.endswith(report)  # the report printed last is the one written
    row = next(line for line in report.splitlines() if line.startswith("| smoke") and "3, 4" in line)
    mean = 100 * sum(accs) / 2
    assert f"{mean:.1f} ±" in row, (row, accs)
    # the same command again resumes: every stage of both runs is skipped
    again = run_cli("--seeds", "3,4", "--run-dir", str(base), "smoke", *TINY)
    assert again.returncode == 0 and again.stdout.endswith(report)
    assert again.stderr.count("skipped (done with the same config)") == 12, again.stderr


def test_seeds_errors_are_one_line(tmp_path):
    for bad in ("1,x", "1,1", ","):
        result = run_cli("--seeds", bad, "smoke")
        assert result.returncode == 2 and "--seeds" in result.stderr and "Traceback" not in result.stderr
    result = run_cli("--seeds", "1,2", "--resume", str(tmp_path))
    assert result.returncode == 2 and "rerun the same --seeds command" in result.stderr


def test_from_is_run_start_from_and_a_bad_one_stops_before_anything(tmp_path, capsys):
    from scan_dist.launch import parse_args

    assert parse_args(["--from", "runs/a", "demo", "scan.lr=0.1"]).overrides == ["scan.lr=0.1", "run.start_from=runs/a"]
    assert main(["--dry-run", "--from", str(tmp_path / "nowhere"), "--run-dir", str(tmp_path / "b"), "smoke"]) == 2
    assert "run.start_from=" in capsys.readouterr().err and not (tmp_path / "b").exists()  # refused before anything
    # --seeds: every seed's source is checked before the first seed runs
    (tmp_path / "seeds" / "seed0").mkdir(parents=True)
    (tmp_path / "seeds" / "seed0" / "config.yaml").write_text("name: smoke\n")
    assert main(["--dry-run", "--seeds", "0,1", "--from", str(tmp_path / "seeds"), "--run-dir", str(tmp_path / "c"),
                 "smoke"]) == 2
    assert "seed1/ for run.seed=1" in capsys.readouterr().err and not (tmp_path / "c").exists()


@pytest.mark.skipif(platform.machine().lower() not in ("x86_64", "amd64"), reason="run.cpu_kernels caps x86 kernels")
def test_cpu_kernels_restarts_the_command_with_the_cap_in_place(tmp_path):
    """torch picks its CPU kernels before the config is read, so the command restarts itself once with the cap."""
    env = {k: v for k, v in os.environ.items() if k not in reproducibility.CPU_KERNEL_ENV["avx2"]}
    capped = run_cli("--dry-run", "--run-dir", str(tmp_path), "smoke", "run.cpu_kernels=avx2", env=env)
    assert capped.returncode == 0, capped.stderr
    assert capped.stderr.count("run.cpu_kernels: restarting with ATEN_CPU_CAPABILITY=avx2") == 1
    native = run_cli("--dry-run", "--run-dir", str(tmp_path), "smoke", env=env)
    assert "restarting" not in native.stderr
    widest = native.stdout.split("CPU kernels: ")[1].split()[0]
    if widest in ("AVX2", "AVX512"):  # a processor without AVX2 has nothing to cap
        assert "CPU kernels: AVX2 (run.cpu_kernels=avx2)" in capped.stdout, capped.stdout
    # Given the variables, the command does not restart again.
    again = run_cli("--dry-run", "--run-dir", str(tmp_path), "smoke", "run.cpu_kernels=avx2",
                    env={**env, **reproducibility.CPU_KERNEL_ENV["avx2"]})
    assert again.returncode == 0 and "restarting" not in again.stderr
