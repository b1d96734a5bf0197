"""The one epoch loop shared by the training stages: seeded shuffling, LR schedule, progress, exact resume.

A stage supplies `step_fn(indices) -> dict of floats` (forward, backward, optimiser step on one batch); the loop
owns everything around it. Checkpoints every `run.checkpoint_every_steps` steps and at each epoch end hold the
loop position, the running loss sums and the RNG states, so a run killed at any point resumes to the same result.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
from tqdm import tqdm

from .dist.checkpoint import load_checkpoint, restore, save_checkpoint


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

    def apply(self, optimizer: torch.optim.Optimizer, step: int) -> None:
        factor = self.factor(step)
        for group, base in zip(optimizer.param_groups, self.base_lrs):
            group["lr"] = base * factor


def steps_per_epoch(num_items: int, batch_size: int) -> int:
    """Full batches only (as the paper's loaders drop the last one); a set smaller than a batch is one step."""
    return max(1, num_items // batch_size)


def epoch_order(num_items: int, seed: int, epoch: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(num_items, generator=generator)


def run_epochs(ctx, stage: str, config_hash: str, stateful: dict, num_items: int, batch_size: int, epochs: int,
               step_fn: Callable[[torch.Tensor], dict], optimizer: torch.optim.Optimizer | None = None,
               schedule: Schedule | None = None) -> list[dict]:
    """Train for `epochs` epochs; returns one dict of mean step values per epoch (also stored for resume)."""
    ckpt_path = Path(ctx.stage_dir(stage)) / "checkpoint.pt"
    per_epoch = steps_per_epoch(num_items, batch_size)
    batch = min(batch_size, num_items)
    epoch, step, history, sums = 0, 0, [], {}
    payload = load_checkpoint(ckpt_path, config_hash)
    if payload is not None:
        restore(payload, stateful)
        epoch, step = payload["position"]["epoch"], payload["position"]["step"]
        history, sums = payload["position"]["history"], payload["position"]["sums"]
        ctx.log.info("%s: resuming at epoch %d, step %d from %s", stage, epoch + 1, step, ckpt_path)

    def checkpoint():
        save_checkpoint(ckpt_path, config_hash,
                        {"epoch": epoch, "step": step, "history": history, "sums": sums}, stateful)

    every = max(1, ctx.cfg.run.checkpoint_every_steps)
    while epoch < epochs:
        order = epoch_order(num_items, ctx.cfg.run.seed, epoch)
        bar = tqdm(total=per_epoch, initial=step, desc=f"{stage} epoch {epoch + 1}/{epochs}", unit="step",
                   disable=not ctx.cfg.run.progress, leave=False, dynamic_ncols=True)
        while step < per_epoch:
            if schedule is not None and optimizer is not None:
                schedule.apply(optimizer, epoch * per_epoch + step)
            values = step_fn(order[step * batch:(step + 1) * batch])
            for key, value in values.items():
                total, count = sums.get(key, (0.0, 0))
                sums[key] = (total + float(value), count + 1)
            step += 1
            bar.update(1)
            bar.set_postfix({k: f"{t / max(c, 1):.4f}" for k, (t, c) in sums.items()}, refresh=False)
            if step % every == 0 and step < per_epoch:
                checkpoint()
        bar.close()
        means = {key: total / max(count, 1) for key, (total, count) in sums.items()}
        history.append(means)
        ctx.log.info("%s epoch %d/%d: %s", stage, epoch + 1, epochs,
                     ", ".join(f"{k}={v:.4f}" for k, v in means.items()))
        epoch, step, sums = epoch + 1, 0, {}
        checkpoint()
    return history
