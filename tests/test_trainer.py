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
