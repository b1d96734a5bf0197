"""End to end on the smoke preset (real Fashion-MNIST): artifacts, skip of finished stages, kill-and-resume."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from scan_dist.config import load_config
from scan_dist.pipeline import plan

pytestmark = pytest.mark.slow


# The full-network SCAN path (the paper's CIFAR/STL recipe): slow enough per step for a kill to land mid-stage.
FULL_SCAN = ("scan.mode=full", "scan.features=backbone")


def launch(run_dir: Path, *overrides: str, wait: bool = True):
    cmd = [sys.executable, "-m", "scan_dist.launch", "--local", "--run-dir", str(run_dir), "smoke",
           "run.progress=false", *overrides]
    if not wait:
        return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory, fashion_mnist):
    run_dir = tmp_path_factory.mktemp("smoke") / "run"
    result = launch(run_dir, *FULL_SCAN)
    assert result.returncode == 0, result.stdout + result.stderr
    return run_dir, result


def test_artifacts_and_metrics(smoke_run):
    run_dir, result = smoke_run
    for name in ("config.yaml", "metrics.json", "assignments.csv", "report.md", "confusion.png", "prototypes.png",
                 "log.txt"):
        assert (run_dir / name).is_file(), name
    metrics = json.loads((run_dir / "metrics.json").read_text())
    for key in ("acc", "nmi", "ari", "ami"):
        assert isinstance(metrics[key], float)
    assert 0.0 <= metrics["acc"] <= 1.0
    # better than chance (0.1) even after one short epoch per stage
    assert metrics["acc"] > 0.2
    assert set(metrics["stages"]) == {"pretext", "embed", "mine", "scan", "selflabel", "evaluate"}
    assert all(metrics["stages"][s]["seconds"] > 0 for s in metrics["stages"])
    # where each stage ran, in metrics.json and in its DONE marker (the same seed repeats only on the same kind)
    assert set(metrics["machines"]) == set(metrics["stages"])
    for stage, machine in metrics["machines"].items():
        assert machine["cpu"] and machine["threads"] >= 1 and machine["torch"] == torch.__version__, machine
        assert json.loads((run_dir / stage / "DONE").read_text())["machine"] == machine
    assert metrics["baseline_kmeans_pixels"]["acc"] > 0.3
    rows = (run_dir / "assignments.csv").read_text().splitlines()
    assert rows[0] == "index,cluster,confidence" and len(rows) == 1 + 1000
    assert "k-means on pixels" in result.stdout and "total" in result.stdout
    assert "ACC" in (run_dir / "report.md").read_text()
    assert not list(run_dir.rglob(".tmp-*")), "no temporary files may remain"
    assert not list(run_dir.rglob("checkpoint.pt")), "finished stages drop their checkpoints"


def test_rerun_skips_finished_stages(smoke_run):
    run_dir, _ = smoke_run
    cfg = load_config("smoke", ["run.progress=false", *FULL_SCAN])
    assert all(action == "skip (done)" for _, action in plan(cfg, run_dir))
    # a changed SCAN setting re-runs scan and everything after it, not before
    changed = load_config("smoke", ["run.progress=false", *FULL_SCAN, "scan.entropy_weight=4.0"])
    assert dict(plan(changed, run_dir)) == {"pretext": "skip (done)", "embed": "skip (done)", "mine": "skip (done)",
                                           "scan": "run", "selflabel": "run", "evaluate": "run"}


def test_start_from_copies_the_matching_stages_and_runs_the_rest(smoke_run, tmp_path):
    """--from: the same settings end with the source's metrics (only evaluate reran); a SCAN change copies pretext,
    embed and mine and reruns SCAN onward; the same command again copies nothing and runs nothing."""
    source, _ = smoke_run
    same = tmp_path / "same"
    result = launch(same, *FULL_SCAN, f"run.start_from={source}")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "copied pretext, embed, mine, scan, selflabel from" in result.stderr
    ours, theirs = (json.loads((d / "metrics.json").read_text()) for d in (same, source))
    assert ours["final"] == theirs["final"]

    changed = tmp_path / "changed"
    result = launch(changed, *FULL_SCAN, "scan.entropy_weight=4", f"run.start_from={source}")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "copied pretext, embed, mine from" in result.stderr and "stage scan: running" in result.stderr
    assert "stage pretext: running" not in result.stderr
    marker = json.loads((changed / "embed" / "DONE").read_text())
    assert marker["copied_from"] == str(source / "embed")
    assert all(path.startswith(str(changed)) for path in marker["artifacts"].values())
    stages_in_history = {json.loads(line)["stage"] for line in (changed / "history.jsonl").read_text().splitlines()}
    assert {"pretext", "scan", "selflabel"} <= stages_in_history  # the copied pretext's curve came along

    again = launch(changed, *FULL_SCAN, "scan.entropy_weight=4", f"run.start_from={source}")
    assert again.returncode == 0 and "no stage to copy" in again.stderr and ": running" not in again.stderr


def test_mutual_neighbours_rerun_mine_onward_and_keep_only_mutual_pairs(smoke_run, tmp_path):
    """mine.mutual=true: pretext and embed are copied, mine reruns; the plain lists stay as train_knn.npy and the
    lists handed on hold only pairs that list each other (rows without one keep theirs), as the metrics count."""
    source, _ = smoke_run
    run_dir = tmp_path / "mutual"
    result = launch(run_dir, *FULL_SCAN, "mine.mutual=true", f"run.start_from={source}")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "copied pretext, embed from" in result.stderr and "stage mine: running" in result.stderr
    knn = np.load(run_dir / "mine" / "train_knn.npy")
    assert np.array_equal(knn, np.load(source / "mine" / "train_neighbors.npy"))
    kept = np.load(run_dir / "mine" / "train_neighbors.npy")
    listed = {(i, int(j)) for i, row in enumerate(knn) for j in row}
    mutual = np.array([[(int(j), i) in listed for j in row] for i, row in enumerate(knn)])
    lonely = ~mutual.any(axis=1)
    assert np.array_equal(kept[lonely], knn[lonely])
    assert all((int(j), i) in listed for i in np.flatnonzero(~lonely) for j in kept[i])
    mine = json.loads((run_dir / "metrics.json").read_text())["stages"]["mine"]
    assert mine["mutual_pair_share"] == pytest.approx(mutual.mean())
    assert mine["rows_without_mutual"] == pytest.approx(lonely.mean())
    assert 0 < mutual.mean() < 1


def test_sigkill_mid_scan_resumes_to_same_metrics(smoke_run, tmp_path):
    reference = json.loads((smoke_run[0] / "metrics.json").read_text())
    run_dir = tmp_path / "killed"
    proc = launch(run_dir, *FULL_SCAN, wait=False)
    checkpoint = run_dir / "scan" / "checkpoint.pt"
    deadline = time.time() + 300
    while not checkpoint.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before the SCAN stage wrote a checkpoint"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (run_dir / "scan" / "DONE").exists()
    result = launch(run_dir, *FULL_SCAN)
    assert result.returncode == 0, result.stdout + result.stderr
    log = (run_dir / "log.txt").read_text()
    assert "scan: resuming at epoch 1" in log
    assert "stage pretext: skipped" in log
    resumed = json.loads((run_dir / "metrics.json").read_text())
    for key in ("acc", "nmi", "ari", "ami"):
        assert resumed[key] == pytest.approx(reference[key], abs=1e-6), key


def test_candidate_screen_keeps_the_lowest_loss_heads_and_resumes_without_rerunning(smoke_run, tmp_path):
    """scan.candidate_heads: the kept heads are the num_heads of lowest screen loss, recorded in screen.json and
    metrics.json; a run SIGKILLed after the screen, once the main loop has a checkpoint, resumes the kept heads (no
    second screen) and ends with the uninterrupted run's metrics."""
    source, _ = smoke_run
    screen = ("scan.candidate_heads=6", "scan.epochs=10", f"run.start_from={source}")
    whole = tmp_path / "whole"
    result = launch(whole, *screen)
    assert result.returncode == 0, result.stdout + result.stderr
    record = json.loads((whole / "scan" / "screen.json").read_text())
    losses = record["losses"]
    assert len(losses) == 6 and record["epochs"] == 2  # round(0.15 * 10) of the stage's 10 epochs
    assert record["kept"] == sorted(sorted(range(6), key=losses.__getitem__)[:3])
    reference = json.loads((whole / "metrics.json").read_text())
    assert reference["stages"]["scan"]["screen"] == record
    assert not (whole / "scan" / "screen_logits.npy").exists()

    killed = tmp_path / "killed"
    proc = launch(killed, *screen, wait=False)
    checkpoint, deadline = killed / "scan" / "checkpoint.pt", time.time() + 300
    while not checkpoint.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    assert proc.poll() is None, "the run ended before the SCAN stage wrote a checkpoint"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    result = launch(killed, *screen)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "candidate screen done before" in (killed / "log.txt").read_text()
    resumed = json.loads((killed / "metrics.json").read_text())
    assert resumed["stages"]["scan"]["screen"] == record
    for key in ("acc", "nmi", "ari", "ami"):
        assert resumed[key] == pytest.approx(reference[key], abs=1e-6), key


def test_sigkill_at_a_random_point_of_every_stage_resumes_to_same_metrics(smoke_run, tmp_path):
    """One run folder, SIGKILLed at a random moment of each of the six stages in turn (after the stage's start is
    logged), relaunched each time: the final metrics equal the uninterrupted run's."""
    import random

    reference = json.loads((smoke_run[0] / "metrics.json").read_text())
    run_dir, rng, killed_in = tmp_path / "killed", random.Random(0), []
    for stage in ("pretext", "embed", "mine", "scan", "selflabel", "evaluate"):
        proc = launch(run_dir, *FULL_SCAN, wait=False)
        log = run_dir / "log.txt"
        deadline = time.time() + 300
        while proc.poll() is None and time.time() < deadline and f"stage {stage}: running" not in (
                log.read_text() if log.exists() else ""):
            time.sleep(0.02)
        if proc.poll() is not None:  # the run got past this stage before the kill (short stages): nothing to kill
            continue
        time.sleep(rng.uniform(0.0, 1.5))
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        killed_in.append(stage)
    result = launch(run_dir, *FULL_SCAN)
    assert result.returncode == 0, result.stdout + result.stderr
    assert len(killed_in) >= 4, killed_in
    assert "is stale; taking it over" in (run_dir / "log.txt").read_text()  # the killed runs' lock
    resumed = json.loads((run_dir / "metrics.json").read_text())
    for key in ("acc", "nmi", "ari", "ami"):
        assert resumed[key] == pytest.approx(reference[key], abs=1e-6), key


@pytest.mark.parametrize("overrides", [(), ("scan.features=backbone", "scan.head_hidden=0")],
                         ids=["as-shipped", "heads-on-backbone"])
def test_smoke_head_mode(tmp_path, fashion_mnist, overrides):
    """Head-only SCAN end to end: on the mined space (the preset, as the demo) and on frozen backbone features
    (the paper's ImageNet recipe)."""
    run_dir = tmp_path / "run"
    result = launch(run_dir, *overrides)
    assert result.returncode == 0, result.stdout + result.stderr
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["acc"] > 0.2 and metrics["stages"]["scan"]["best_head"] in range(3)


@pytest.mark.parametrize("rank", ["agreement", "loss", "tie"])
def test_the_ensemble_handed_on_is_the_one_scored(tmp_path, fashion_mnist, rank):
    """scan.select=ensemble: the model the later stages load (members' last layers reordered, outputs averaged)
    predicts exactly what the ensemble of the stored evaluation logits predicts, and is what gets scored; its
    members are the most agreeing heads, or (scan.ensemble_rank=loss) those of lowest selection loss, or
    (scan.ensemble_rank=tie) the tie's usable heads, whatever scan.ensemble_size says."""
    import numpy as np
    import torch

    from scan_dist import head_consensus

    run_dir = tmp_path / "run"
    result = launch(run_dir, "scan.select=ensemble", "scan.num_heads=4", "scan.ensemble_size=3",
                    f"scan.ensemble_rank={rank}", "selflabel.enabled=false")
    assert result.returncode == 0, result.stdout + result.stderr
    metrics = json.loads((run_dir / "metrics.json").read_text())
    scan, heads = metrics["stages"]["scan"], metrics["stages"]["evaluate"]["scan_heads"]
    ranking = (np.argsort(scan["selection_losses"], kind="stable") if rank == "loss"
               else np.argsort(-np.asarray(scan["head_agreement"]), kind="stable"))
    if rank == "tie":
        usable = [h for h in scan["tie"] if scan["head_agreement"][h] > -1]
        assert scan["ensemble"] == (usable or [scan["loss_head"]]) and scan["best_head"] == scan["ensemble"][0]
        assert scan["tie"][0] == scan["loss_head"]
    else:
        assert scan["ensemble"] == ranking[:3].tolist() and scan["best_head"] == scan["ensemble"][0]
        assert scan["ensemble"][0] == (scan["loss_head"] if rank == "loss" else scan["consensus_head"])
    assert set(heads["acc_by_rule"]) == {"loss", "consensus", "tie", "ensemble"}
    saved = torch.load(run_dir / "scan" / "model.pt", weights_only=False)
    stored = np.load(run_dir / "scan" / "eval_logits.npy").transpose(1, 0, 2)
    expected = head_consensus.ensemble_log_probs(stored, saved["ensemble"], np.asarray(saved["ensemble_perms"]))
    final = np.load(run_dir / "evaluate" / "final_logits.npy")[:, 0]
    # a one-member ensemble (a tie of one) hands on the head itself: its logits, equal up to a shift per row
    final = torch.log_softmax(torch.from_numpy(final), dim=1).numpy()
    assert np.allclose(final, expected, atol=1e-4)
    assert heads["selected"]["acc"] == heads["acc_by_rule"]["ensemble"]
    # The pseudo-label diagnostic reads the clustering handed on: the ensemble's averaged probabilities.
    threshold = heads["confident_threshold"]
    assert heads["confident_share"] == pytest.approx(float((np.exp(expected.max(axis=1)) > threshold).mean()))
    assert metrics["acc"] == pytest.approx(heads["selected"]["acc"], abs=1e-3)  # a near-tie may flip one image


def test_the_tie_rule_hands_on_the_most_agreeing_head_of_the_tie(tmp_path, fashion_mnist):
    """scan.select=tie: the heads within scan.tie_z paired standard errors of the lowest selection loss form the
    tie (recorded with the errors), and the head handed on and scored is the tie's most agreeing one."""
    import numpy as np

    run_dir = tmp_path / "run"
    result = launch(run_dir, "scan.select=tie", "scan.num_heads=4", "selflabel.enabled=false")
    assert result.returncode == 0, result.stdout + result.stderr
    metrics = json.loads((run_dir / "metrics.json").read_text())
    scan, heads = metrics["stages"]["scan"], metrics["stages"]["evaluate"]["scan_heads"]
    losses, errors = np.asarray(scan["selection_losses"]), np.asarray(scan["selection_standard_errors"])
    agreement, lowest = np.asarray(scan["head_agreement"]), scan["loss_head"]
    assert errors[lowest] == 0 and (errors[np.arange(4) != lowest] > 0).all()
    within = [h for h in range(4) if agreement[h] > -1 and losses[h] - losses[lowest] <= 2.0 * errors[h]]
    assert sorted(scan["tie"]) == sorted({lowest, *within})
    assert scan["best_head"] == scan["tie_head"] == max(scan["tie"], key=lambda h: agreement[h])
    assert heads["selected_head"] == scan["best_head"] and heads["selected"]["acc"] == heads["acc_by_rule"]["tie"]


def test_model_init_depends_on_the_seed_and_stage_only():
    from scan_dist.config import load_config
    from scan_dist.pipeline import STAGES, init_seed, stage_hashes

    base = load_config("smoke", [])
    other = load_config("smoke", ["scan.select=loss", "scan.entropy_weight=3", "data.path=/elsewhere"])
    assert stage_hashes(base)["scan"] != stage_hashes(other)["scan"]  # the stage reruns...
    assert [init_seed(base, s) for s in STAGES] == [init_seed(other, s) for s in STAGES]  # ...from the same weights
    reseeded = load_config("smoke", ["run.seed=1"])
    assert len({init_seed(c, s) for c in (base, reseeded) for s in STAGES}) == 2 * len(STAGES)


def test_loader_settings_do_not_change_stage_hashes():
    """data.workers / prefetch / cache_dir change how fast batches arrive, not what they hold: no stage reruns."""
    from scan_dist.config import load_config
    from scan_dist.pipeline import stage_hashes

    base = stage_hashes(load_config("smoke"))
    assert stage_hashes(load_config("smoke", ["data.workers=3", "data.prefetch=4", "data.cache_dir=/x"])) == base
    assert stage_hashes(load_config("smoke", ["data.resize_size=40"]))["pretext"] != base["pretext"]


import pytest as _pytest

# (stage, a setting of that stage and another value): changing it reruns that stage and what follows, not before.
_INCLUDED = [("pretext", "pretext.lr=0.3"), ("pretext", "augment.crop_scale_min=0.3"),
             ("pretext", "data.resize_size=40"), ("pretext", "dist.precision=bf16"), ("pretext", "run.seed=5"),
             ("embed", "mine.layer=backbone"), ("embed", "mine.grid=3"), ("embed", "data.max_eval_images=500"), ("mine", "mine.k=7"),
             ("scan", "scan.entropy_weight=3.0"), ("scan", "num_clusters=7"), ("scan", "scan.lr=0.01"), ("pretext", "dist.grad_clip=1.0"),
             ("selflabel", "selflabel.threshold=0.95"), ("selflabel", "augment.strong_ops=6"),
             ("evaluate", "run.baseline=false")]
# Settings that change how fast or how a stage runs, never its result: nothing reruns.
_EXCLUDED = ["run.threads=1", "data.workers=0", "data.prefetch=5", "data.cache_dir=/x", "data.finish_on=device",
             "mine.backend=faiss", "mine.precision=fp16", "scan.loss_backend=torch", "run.progress=false",
             "run.eval_batch_size=64", "run.checkpoint_every_steps=3", "run.checkpoint_every_min=1",
             "dist.timeout_s=30", "run.monitor_labels=true", "run.tensorboard=true", "run.kernel_self_check=false",
             "run.deterministic=true", "run.cpu_kernels=avx2", "run.start_from=/x", "augment.translate_frac=0.1"]


@_pytest.mark.parametrize("stage, override", _INCLUDED, ids=[o for _, o in _INCLUDED])
def test_an_included_setting_reruns_its_stage_and_the_ones_after(stage, override):
    from scan_dist.config import load_config
    from scan_dist.pipeline import STAGES, stage_hashes

    base, changed = stage_hashes(load_config("smoke")), stage_hashes(load_config("smoke", [override]))
    order = list(STAGES)
    for name in order:
        assert (base[name] != changed[name]) == (order.index(name) >= order.index(stage)), name


@_pytest.mark.parametrize("override", _EXCLUDED)
def test_an_excluded_setting_reruns_nothing(override):
    from scan_dist.config import load_config
    from scan_dist.pipeline import stage_hashes

    assert stage_hashes(load_config("smoke", [override])) == stage_hashes(load_config("smoke"))


def _permute_labels_in_place(root: Path, seed: int) -> None:
    """Permute every IDX label file under `root` (an 8-byte header, then one byte a label); images stay as they are."""
    import gzip

    import numpy as np

    for path in root.glob("*labels-idx1-ubyte.gz"):
        raw = gzip.decompress(path.read_bytes())
        labels = np.frombuffer(raw[8:], dtype=np.uint8)
        path.write_bytes(gzip.compress(raw[:8] + np.random.default_rng(seed).permutation(labels).tobytes()))


def test_no_label_reaches_any_stage_before_evaluate(tmp_path, fashion_mnist):
    """Every label permuted: each stage before evaluate writes the same bits (mine's diagnostic agreement aside);
    only the scores differ. So no label steers training, mining, head selection or self-labelling."""
    import shutil

    import numpy as np
    import torch

    tiny = ["data.max_images=512", "data.max_eval_images=256", "pretext.batch_size=128", "scan.batch_size=64",
            "selflabel.batch_size=128", "mine.k=5", "mine.eval_k=3", "scan.num_heads=3", "data.format=idx"]
    # One data folder for both runs: data.path is part of every stage's hash, and the hash seeds model init.
    root = tmp_path / "data"
    shutil.copytree(fashion_mnist, root)
    runs = {}
    for name in ("real", "scrambled"):
        if name == "scrambled":
            _permute_labels_in_place(root, seed=1)
        runs[name] = tmp_path / name
        result = launch(runs[name], f"data.path={root}", f"data.cache_dir={tmp_path / 'cache'}", *tiny)
        assert result.returncode == 0, result.stdout + result.stderr
    real, scrambled = runs["real"], runs["scrambled"]
    for artifact in ("mine/train_neighbors.npy", "mine/eval_neighbors.npy", "scan/eval_logits.npy"):
        assert np.array_equal(np.load(real / artifact), np.load(scrambled / artifact)), artifact
    for artifact in ("pretext/model.pt", "scan/model.pt", "selflabel/model.pt"):
        a, b = (torch.load(r / artifact, map_location="cpu", weights_only=False) for r in (real, scrambled))
        for key, value in a["model"].items():
            assert torch.equal(value, b["model"][key]), (artifact, key)
        assert a.get("best_head") == b.get("best_head")
    scores = [json.loads((r / "metrics.json").read_text())["acc"] for r in (real, scrambled)]
    assert scores[0] != scores[1] and scores[1] < 0.3  # the labels did reach the evaluation
