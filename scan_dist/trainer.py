"""The one epoch loop shared by the training stages: seeded shuffling, LR schedule, progress, exact resume.

A stage supplies `step_fn(indices) -> dict of scalars` (forward, backward, optimiser step on one batch; 0-d tensors
left on the device, or floats); the loop owns everything around it. The logged values are summed where they are and
read every `READ_EVERY` steps, at checkpoints and at epoch ends: a step itself never waits for the device or for the
other ranks just to log. Checkpoints every `run.checkpoint_every_steps` steps and at each epoch end hold the
loop position, the running loss sums and the RNG states, so a run killed at any point resumes to the same result.

Distributed: `batch_size` is the global batch. Every rank walks the same seeded order and takes its contiguous
slice of each global batch; inside `global_batch()` its per-sample random draws are those one process makes for
the same rows, so N processes train on exactly the batches (and views) one process would. Logged values are
averaged over ranks when they are read (one small all-reduce). Rank 0 writes the checkpoint (ranks share one RNG
stream by construction, so its RNG state is every rank's and a run may resume on a different number of processes);
a DeepSpeed engine with ZeRO shards also saves its own sharded checkpoint from every rank.
"""
from __future__ import annotations

import math
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
from tqdm import tqdm

from .data.batch_rng import global_batch
from .dist import comm
from .dist.checkpoint import load_checkpoint, restore, save_checkpoint
from .errors import ConfigError


@dataclass
class Schedule:
    """Learning rate per step: linear warm-up, then cosine to `min_ratio`·lr, or constant."""

    base_lrs: Sequence[float]
    total_steps: int
    warmup_steps: int = 0
    cosine: bool = False
    min_ratio: float = 0.0

    def factor(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        if not self.cosine:
            return 1.0
        progress = (step - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps)
        return self.min_ratio + (1 - self.min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    def apply(self, target, step: int) -> None:
        """Set the learning rates of `target`: a torch optimizer, or an Engine (which knows its wrapped one)."""
        factor = self.factor(step)
        if hasattr(target, "set_lr"):
            target.set_lr([base * factor for base in self.base_lrs])
            return
        for group, base in zip(target.param_groups, self.base_lrs):
            group["lr"] = base * factor


# Steps between reads of the logged values (progress bar): each read is one host sync and one small all-reduce.
READ_EVERY = 20


class RunningMeans:
    """Per-key sums of the logged step values: read totals (floats, equal on every rank) plus unread device sums.

    Every rank must log the same keys in the same steps (the stages skip steps globally, never per rank).
    """

    def __init__(self, totals: dict | None = None):
        self.totals = {key: tuple(value) for key, value in (totals or {}).items()}  # key -> (sum, steps)
        self._unread: dict = {}  # key -> [sum as a float64 tensor or float, steps]

    def add(self, values: dict) -> None:
        for key, value in values.items():
            if isinstance(value, torch.Tensor):
                value = value.detach().to(torch.float64)
            entry = self._unread.setdefault(key, [0.0, 0])
            entry[0] = entry[0] + value
            entry[1] += 1

    def read(self) -> dict[str, float]:
        """Fold the unread sums in (averaged over ranks) and return the running mean of each key."""
        if self._unread:
            sums = comm.mean_over_ranks({key: entry[0] for key, entry in self._unread.items()})
            for key, entry in self._unread.items():
                total, count = self.totals.get(key, (0.0, 0))
                self.totals[key] = (total + sums[key], count + entry[1])
            self._unread = {}
        return {key: total / max(count, 1) for key, (total, count) in self.totals.items()}


def steps_per_epoch(num_items: int, batch_size: int) -> int:
    """Full batches only (as the paper's loaders drop the last one); a set smaller than a batch is one step."""
    return max(1, num_items // batch_size)


def epoch_order(num_items: int, seed: int, epoch: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(num_items, generator=generator)


def run_epochs(ctx, stage: str, config_hash: str, stateful: dict, num_items: int, batch_size: int, epochs: int,
               step_fn: Callable[[torch.Tensor], dict], optimizer=None, schedule: Schedule | None = None) -> list[dict]:
    """Train for `epochs` epochs; returns one dict of mean step values per epoch (also stored for resume).

    `optimizer` is what the schedule sets learning rates on: a torch optimizer or an Engine. An Engine with sharded
    (DeepSpeed ZeRO) state also checkpoints itself under the stage folder.
    """
    ckpt_path = Path(ctx.stage_dir(stage)) / "checkpoint.pt"
    shard_dir = Path(ctx.stage_dir(stage)) / "checkpoint_shards"
    sharded = bool(getattr(optimizer, "uses_sharded_checkpoints", False))
    per_epoch = steps_per_epoch(num_items, batch_size)
    batch = min(batch_size, num_items)
    world, rank = comm.world_size(), comm.rank()
    if batch % world:
        raise ConfigError(f"{stage}: the global batch of {batch} does not split over {world} processes; "
                          f"use a batch size divisible by {world}")
    local = batch // world
    epoch, step, history, running = 0, 0, [], RunningMeans()
    payload = load_checkpoint(ckpt_path, config_hash)
    if payload is not None and sharded and not optimizer.load_sharded(shard_dir, payload["position"].get("shard_tag")):
        payload = None  # the position file without its shards cannot be resumed
    if payload is not None:
        restore(payload, stateful)
        epoch, step = payload["position"]["epoch"], payload["position"]["step"]
        history, running = payload["position"]["history"], RunningMeans(payload["position"]["sums"])
        ctx.log.info("%s: resuming at epoch %d, step %d from %s", stage, epoch + 1, step, ckpt_path)

    def checkpoint():
        running.read()
        position = {"epoch": epoch, "step": step, "history": history, "sums": running.totals}
        if sharded:
            # A new tag per checkpoint: the position file (written last, atomically) names complete shards only;
            # a kill during a shard save leaves the previous pair intact.
            position["shard_tag"] = f"epoch{epoch}_step{step}"
            optimizer.save_sharded(shard_dir, position["shard_tag"])
        if comm.is_main():
            save_checkpoint(ckpt_path, config_hash, position, stateful)
            if sharded:
                for old in shard_dir.iterdir():
                    if old.is_dir() and old.name != position["shard_tag"]:
                        shutil.rmtree(old, ignore_errors=True)
        comm.barrier()  # nobody runs ahead of a checkpoint that is still being written

    every = max(1, ctx.cfg.run.checkpoint_every_steps)
    while epoch < epochs:
        order = epoch_order(num_items, ctx.cfg.run.seed, epoch)
        bar = tqdm(total=per_epoch, initial=step, desc=f"{stage} epoch {epoch + 1}/{epochs}", unit="step",
                   disable=not (ctx.cfg.run.progress and comm.is_main()), leave=False, dynamic_ncols=True)
        while step < per_epoch:
            if schedule is not None and optimizer is not None:
                schedule.apply(optimizer, epoch * per_epoch + step)
            indices = order[step * batch:(step + 1) * batch][rank * local:(rank + 1) * local]
            with global_batch(batch, rank * local):
                running.add(step_fn(indices))
            step += 1
            bar.update(1)
            if step % READ_EVERY == 0:
                bar.set_postfix({k: f"{v:.4f}" for k, v in running.read().items()}, refresh=False)
            if step % every == 0 and step < per_epoch:
                checkpoint()
        bar.close()
        means = running.read()
        history.append(means)
        ctx.log.info("%s epoch %d/%d: %s", stage, epoch + 1, epochs,
                     ", ".join(f"{k}={v:.4f}" for k, v in means.items()))
        epoch, step, running = epoch + 1, 0, RunningMeans()
        checkpoint()
    return history
