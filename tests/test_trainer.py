"""The shared epoch loop: schedules, seeded order, and bit-exact resume from a mid-epoch checkpoint (with no RNG
state in the checkpoint: the step's randomness is counter-based)."""
import json
import logging
from types import SimpleNamespace

import pytest
import torch


from scan_dist.data.loaders import EpochRequests
from scan_dist.data.sampling import stream_key, uniform
from scan_dist.data.sampling import steps_per_epoch
from scan_dist.trainer import IndexSource, Schedule, run_epochs


class FakeContext:
    def __init__(self, run_dir, every):
        self.run_dir = run_dir
        self.cfg = SimpleNamespace(run=SimpleNamespace(seed=3, checkpoint_every_steps=every, progress=False))
        self.log = logging.getLogger("test")
        self.stage_stats = {}

    def stage_dir(self, name):
        path = self.run_dir / name
        path.mkdir(parents=True, exist_ok=True)
        return path


class Crash(RuntimeError):
    pass


def train(ctx, crash_at=None):
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.05)
    data = torch.randn(40, 4)
    schedule = Schedule([0.05], total_steps=3 * steps_per_epoch(40, 8), warmup_steps=2, cosine=True)
    calls = []

    def step(batch):
        indices = batch["index"]
        if crash_at is not None and len(calls) == crash_at:
            raise Crash()
        calls.append(indices.tolist())
        # per-sample randomness as the stages draw it: a function of (seed, stage, epoch, sample), no RNG state
        u = uniform(stream_key(3, "stage", batch["epoch"]), indices.numpy(), 0)
        noise = torch.from_numpy(u).float().unsqueeze(1) * 0.1
        loss = ((model(data[indices]) - noise) ** 2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        return {"loss": loss.item()}

    source = IndexSource(EpochRequests(40, 8, seed=3, stream="stage", rank=0, world=1))
    history = run_epochs(ctx, "stage", "hash", {"model": model, "optimizer": optimizer}, source, 3, step,
                         optimizer, schedule)
    return model, history, calls


def test_resume_after_crash_is_bit_exact(tmp_path):
    reference, ref_history, ref_calls = train(FakeContext(tmp_path / "a", every=2))
    ctx = FakeContext(tmp_path / "b", every=2)
    with pytest.raises(Crash):
        train(ctx, crash_at=8)  # 5 steps per epoch: crashes at epoch 2 step 3; last checkpoint after step 2
    resumed, history, calls = train(ctx)
    assert calls == ref_calls[7:]
    assert torch.equal(resumed.weight, reference.weight) and torch.equal(resumed.bias, reference.bias)
    assert history == ref_history
    assert "rng" not in torch.load(ctx.run_dir / "stage" / "checkpoint.pt", weights_only=True)


def test_checkpoint_of_other_config_is_ignored(tmp_path):
    ctx = FakeContext(tmp_path, every=1)
    with pytest.raises(Crash):
        train(ctx, crash_at=3)
    (tmp_path / "stage" / "checkpoint.pt").rename(tmp_path / "stage" / "keep.pt")
    from scan_dist.distributed.checkpoint import load_checkpoint
    assert load_checkpoint(tmp_path / "stage" / "keep.pt", "other-hash") is None
    assert load_checkpoint(tmp_path / "stage" / "keep.pt", "hash") is not None


def test_schedule_shapes():
    s = Schedule([1.0], total_steps=10, warmup_steps=2, cosine=True, min_ratio=0.1)
    assert s.factor(0) == pytest.approx(0.5) and s.factor(1) == pytest.approx(1.0)
    assert s.factor(2) == pytest.approx(1.0) and s.factor(10) == pytest.approx(0.1)
    assert Schedule([1.0], total_steps=10).factor(7) == 1.0


def test_each_epoch_walks_a_new_permutation(tmp_path):
    seen = []
    run_epochs(FakeContext(tmp_path, every=1000), "stage", "hash", {},
               IndexSource(EpochRequests(20, 4, seed=1, stream="stage", rank=0, world=1)), 2,
               lambda batch: seen.append(batch["index"].tolist()) or {})
    first, second = sum(seen[:5], []), sum(seen[5:], [])
    assert sorted(first) == sorted(second) == list(range(20)) and first != second
    assert steps_per_epoch(5, 8) == 1 and steps_per_epoch(17, 8) == 2


def test_data_wait_is_recorded_per_stage(tmp_path):
    ctx = FakeContext(tmp_path, every=1000)
    run_epochs(ctx, "stage", "hash", {}, IndexSource(EpochRequests(8, 4, 0, "stage", 0, 1)), 1, lambda batch: {})
    stats = ctx.stage_stats["stage"]
    assert set(stats) >= {"data_wait_s", "loop_s", "data_wait_fraction"} and 0 <= stats["data_wait_fraction"] <= 1


def test_logged_values_are_read_every_few_steps_not_every_step(tmp_path, monkeypatch):
    from scan_dist import trainer

    reads = []
    real = trainer.comm.mean_over_ranks

    def counting(values):
        reads.append(sorted(values))
        return real(values)

    monkeypatch.setattr(trainer.comm, "mean_over_ranks", counting)
    values = torch.arange(90, dtype=torch.float32)  # one value per step of 2 epochs of 45 steps

    def step(batch):
        n = len(reads_per_step)
        reads_per_step.append(len(reads))
        # tensors (left unread on the device) and a key that only some steps log, as self-labelling's skipped steps
        out = {"loss": values[n].clone()}
        if n % 3 == 0:
            out["rare"] = 2.0 * n
        return out

    reads_per_step = []
    history = run_epochs(FakeContext(tmp_path, every=1000), "stage", "hash", {},
                         IndexSource(EpochRequests(45, 1, 0, "stage", 0, 1)), 2, step)
    # every read_interval steps, the epoch end, and its checkpoint (no new values, but the signal/timer flags ride along)
    per_epoch = (45 - 1) // trainer.read_interval(45) + 2
    assert len(reads) == 2 * per_epoch
    assert history[0]["loss"] == pytest.approx(float(values[:45].mean()))
    assert history[1]["loss"] == pytest.approx(float(values[45:].mean()))
    assert history[0]["rare"] == pytest.approx(sum(2.0 * n for n in range(0, 45, 3)) / 15)


def test_running_means_resume_from_saved_totals():
    from scan_dist.trainer import RunningMeans

    first = RunningMeans()
    for value in (1.0, torch.tensor(2.0), torch.tensor(6.0)):
        first.add({"loss": value})
    assert first.read() == {"loss": pytest.approx(3.0)}
    resumed = RunningMeans(first.totals)  # what a checkpoint holds
    resumed.add({"loss": torch.tensor(7.0)})
    assert resumed.read() == {"loss": pytest.approx(4.0)}
    assert resumed.totals["loss"][1] == 4


def test_a_signal_checkpoints_at_the_next_read_and_the_resume_redoes_nothing(tmp_path):
    """SIGTERM mid-epoch (every 1000 steps a periodic checkpoint: none in this epoch) stops the loop at its next read
    after a checkpoint there; the relaunch starts at that step and ends where an uninterrupted run ends."""
    import os
    import signal

    from scan_dist import preemption, trainer

    reference, ref_history, _ = train(FakeContext(tmp_path / "a", every=1000))
    ctx = FakeContext(tmp_path / "b", every=1000)
    preemption.install()
    try:
        calls_before = []

        def train_with_signal():
            torch.manual_seed(0)
            model = torch.nn.Linear(4, 1)
            optimizer = torch.optim.Adam(model.parameters(), lr=0.05)
            data = torch.randn(40, 4)

            def step(batch):
                calls_before.append(batch["index"].tolist())
                if len(calls_before) == 3:
                    os.kill(os.getpid(), signal.SIGTERM)
                loss = (model(data[batch["index"]]) ** 2).mean()
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                return {"loss": loss.item()}

            source = IndexSource(EpochRequests(40, 1, seed=3, stream="stage", rank=0, world=1))
            run_epochs(ctx, "stage", "hash", {"model": model, "optimizer": optimizer}, source, 1, step, optimizer)

        interval = trainer.read_interval(40)  # 5 for 40 steps per epoch
        with pytest.raises(preemption.Preempted, match=f"SIGTERM.*epoch 1, step {interval}"):
            train_with_signal()
        assert len(calls_before) == interval  # stopped at the first read after the signal (step 3)
        saved = torch.load(ctx.run_dir / "stage" / "checkpoint.pt", weights_only=True)
        assert saved["position"]["step"] == interval
    finally:
        preemption.uninstall()
    assert ref_history  # the reference ran to the end undisturbed


def test_min_steps_raises_epochs_only_when_an_epoch_is_short():
    from scan_dist.trainer import scaled_epochs

    assert scaled_epochs(8, 0, 4) == 8  # off
    assert scaled_epochs(8, 900, 117) == 8  # 60k images at batch 512: 936 steps already
    assert scaled_epochs(8, 900, 4) == 225  # 2,000 images: 4 steps an epoch -> 225 epochs = 900 steps
    assert scaled_epochs(8, 901, 4) == 226  # rounds up: at least min_steps


@pytest.mark.parametrize("epochs, expected", [(5, [1, 2, 3, 4, 5]), (60, list(range(3, 61, 3))),
                                              (26, list(range(2, 27, 2)))])
def test_diagnostics_run_on_at_most_25_evenly_spaced_epochs_and_the_last(tmp_path, epochs, expected):
    """min_steps can give a small dataset hundreds of one-step epochs; the per-epoch diagnostics (an inference pass
    over 1,024 images and their neighbours) must not then cost more than the training."""
    seen = []

    def epoch_end():
        seen.append(len(seen))
        return {"diagnosed": 1.0}

    ctx = FakeContext(tmp_path, every=1000)
    ctx.cfg.run.checkpoint_every_min = 0
    run_epochs(ctx, "stage", "hash", {}, IndexSource(EpochRequests(8, 4, 0, "stage", 0, 1)), epochs,
               lambda batch: {"loss": 0.0}, epoch_end=epoch_end)
    points = [json.loads(line) for line in (tmp_path / "history.jsonl").read_text().splitlines()]
    diagnosed = [p["epoch"] + 1 for p in points if "diagnosed" in p]
    assert len(seen) == len(expected) and diagnosed == expected
