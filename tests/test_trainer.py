"""The shared epoch loop: schedules, seeded order, and bit-exact resume from a mid-epoch checkpoint."""
import logging
from types import SimpleNamespace

import pytest
import torch

from scan_dist.trainer import Schedule, epoch_order, run_epochs, steps_per_epoch


class FakeContext:
    def __init__(self, run_dir, every):
        self.run_dir = run_dir
        self.cfg = SimpleNamespace(run=SimpleNamespace(seed=3, checkpoint_every_steps=every, progress=False))
        self.log = logging.getLogger("test")

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

    def step(indices):
        if crash_at is not None and len(calls) == crash_at:
            raise Crash()
        calls.append(indices.tolist())
        noise = torch.randn(len(indices), 1) * 0.1  # consumes the RNG: resume must restore it
        loss = ((model(data[indices]) - noise) ** 2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        return {"loss": loss.item()}

    history = run_epochs(ctx, "stage", "hash", {"model": model, "optimizer": optimizer}, 40, 8, 3, step,
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


def test_checkpoint_of_other_config_is_ignored(tmp_path):
    ctx = FakeContext(tmp_path, every=1)
    with pytest.raises(Crash):
        train(ctx, crash_at=3)
    (tmp_path / "stage" / "checkpoint.pt").rename(tmp_path / "stage" / "keep.pt")
    from scan_dist.dist.checkpoint import load_checkpoint
    assert load_checkpoint(tmp_path / "stage" / "keep.pt", "other-hash") is None
    assert load_checkpoint(tmp_path / "stage" / "keep.pt", "hash") is not None


def test_schedule_shapes():
    s = Schedule([1.0], total_steps=10, warmup_steps=2, cosine=True, min_ratio=0.1)
    assert s.factor(0) == pytest.approx(0.5) and s.factor(1) == pytest.approx(1.0)
    assert s.factor(2) == pytest.approx(1.0) and s.factor(10) == pytest.approx(0.1)
    assert Schedule([1.0], total_steps=10).factor(7) == 1.0


def test_epoch_order_is_seeded_per_epoch():
    assert torch.equal(epoch_order(20, 1, 0), epoch_order(20, 1, 0))
    assert not torch.equal(epoch_order(20, 1, 0), epoch_order(20, 1, 1))
    assert sorted(epoch_order(20, 1, 0).tolist()) == list(range(20))
    assert steps_per_epoch(5, 8) == 1 and steps_per_epoch(17, 8) == 2


def test_logged_values_are_read_every_few_steps_not_every_step(tmp_path, monkeypatch):
    from scan_dist import trainer

    reads = []
    real = trainer.comm.mean_over_ranks

    def counting(values):
        reads.append(sorted(values))
        return real(values)

    monkeypatch.setattr(trainer.comm, "mean_over_ranks", counting)
    values = torch.arange(90, dtype=torch.float32)  # one value per step of 2 epochs of 45 steps

    def step(indices):
        n = len(reads_per_step)
        reads_per_step.append(len(reads))
        # tensors (left unread on the device) and a key that only some steps log, as self-labelling's skipped steps
        out = {"loss": values[n].clone()}
        if n % 3 == 0:
            out["rare"] = 2.0 * n
        return out

    reads_per_step = []
    history = run_epochs(FakeContext(tmp_path, every=1000), "stage", "hash", {}, 45, 1, 2, step)
    per_epoch = 45 // trainer.READ_EVERY + 1  # every READ_EVERY steps, then the epoch end (the checkpoint: nothing new)
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
