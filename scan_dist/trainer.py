"""The one epoch loop shared by the training stages: batches from a source, LR schedule, progress, exact resume.

A stage supplies a batch source (`ctx.batches(...)`: augmented views built by loader workers; or `IndexSource`
for stages that train on stored features) and `step_fn(batch) -> dict of scalars` (forward, backward, optimiser
step on one batch; 0-d tensors left on the device, or floats); the loop owns everything around it. The logged
values are summed where they are and read every `read_interval()` steps (at most READ_EVERY), at checkpoints and at epoch ends: a step
itself never waits for the device or for the other ranks just to log. Checkpoints every
`run.checkpoint_every_steps` steps and at each epoch end hold the loop position and the running loss sums with
the model and optimiser states. No RNG state: every random choice of a batch (order, views, neighbours) is a
function of (seed, stage, epoch, sample index), so (epoch, step) is the whole position and a run killed at any
point resumes to the same result, on any number of processes (DDP; ZeRO shards need the same number).

Distributed: batch sizes are global. The source gives each rank its contiguous slice of every global batch, so N
processes train on exactly the batches (and views) one process would. Logged values are averaged over ranks when
they are read (one small all-reduce). Rank 0 writes the checkpoint; a DeepSpeed engine with ZeRO shards also saves
its own sharded checkpoint from every rank. The time the loop waits for data is logged per epoch and kept in the
stage's metrics (`data_wait_s`, `data_wait_fraction`).
"""
from __future__ import annotations

import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
from tqdm import tqdm

from .distributed import comm
from .distributed.checkpoint import load_checkpoint, restore, save_checkpoint
from . import preemption
from .errors import ConfigError, TrainingError
from .history import HistoryWriter


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


def scaled_epochs(epochs: int, min_steps: int, steps_per_epoch: int) -> int:
    """`epochs`, raised so that the stage runs at least `min_steps` optimiser steps: a dataset of 2,000 images gets
    4 steps per epoch at batch 512, too few for any schedule written in epochs (`<stage>.min_steps`)."""
    if min_steps <= 0 or steps_per_epoch <= 0:
        return epochs
    return max(epochs, -(-min_steps // steps_per_epoch))


MAX_DIAGNOSED_EPOCHS = 25


# Steps between reads of the logged values (progress bar, history point, signal check): each read is one host sync
# and one small all-reduce. Short epochs read more often, so a small run still draws a curve.
READ_EVERY = 20


def read_interval(per_epoch: int) -> int:
    return max(1, min(READ_EVERY, per_epoch // 8))


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

    def read(self, flags: dict[str, float] | None = None) -> dict[str, float]:
        """Fold the unread sums in (averaged over ranks) and return the running mean of each key. `flags` (floats)
        ride on the same all-reduce: their means over ranks are returned under the same keys, not stored."""
        flags = dict(flags or {})
        if self._unread or flags:
            sums = comm.mean_over_ranks({**{key: entry[0] for key, entry in self._unread.items()}, **flags})
            for key in flags:
                flags[key] = sums.pop(key)
            for key, entry in self._unread.items():
                total, count = self.totals.get(key, (0.0, 0))
                self.totals[key] = (total + sums[key], count + entry[1])
            self._unread = {}
        return {**{key: total / max(count, 1) for key, (total, count) in self.totals.items()}, **flags}


class IndexSource:
    """Batches of sample indices only (stages that train on stored features): {"epoch", "index"}."""

    def __init__(self, sampler):
        self.sampler, self.wait_s, self.bad = sampler, 0.0, []

    def epoch(self, epoch: int, start_step: int = 0):
        self.sampler.set_epoch(epoch, start_step)
        for request in self.sampler:
            yield {"epoch": request.epoch, "index": torch.from_numpy(request.indices)}

    def close(self) -> None:
        pass


def run_epochs(ctx, stage: str, config_hash: str, stateful: dict, source, epochs: int,
               step_fn: Callable[[dict], dict], optimizer=None, schedule: Schedule | None = None,
               epoch_end: Callable[[], dict] | None = None) -> list[dict]:
    """Train for `epochs` epochs over `source`; returns one dict of mean step values per epoch (kept for resume).

    `optimizer` is what the schedule sets learning rates on: a torch optimizer or an Engine. An Engine with sharded
    (DeepSpeed ZeRO) state also checkpoints itself under the stage folder. `epoch_end()` (rank 0 only, e.g.
    diagnostics.head_diagnostics) returns values added to an epoch's last history point, on at most
    MAX_DIAGNOSED_EPOCHS evenly spaced epochs and always the last.
    """
    ckpt_path = Path(ctx.stage_dir(stage)) / "checkpoint.pt"
    shard_dir = Path(ctx.stage_dir(stage)) / "checkpoint_shards"
    sharded = bool(getattr(optimizer, "uses_sharded_checkpoints", False))
    sampler = source.sampler
    per_epoch, batch, world = sampler.steps, sampler.batch, comm.world_size()
    if batch % world:
        raise ConfigError(f"{stage}: the global batch of {batch} does not split over {world} processes; "
                          f"use a batch size divisible by {world}")
    epoch, step, history, running = 0, 0, [], RunningMeans()
    payload = load_checkpoint(ckpt_path, config_hash)
    if payload is None and ckpt_path.is_file():
        ctx.log.warning("%s: ignoring the checkpoint %s: it was written under other settings (the stage starts over)",
                        stage, ckpt_path)
    if payload is not None and sharded and not optimizer.load_sharded(shard_dir, payload["position"].get("shard_tag")):
        payload = None  # the position file without its shards cannot be resumed
    if payload is not None:
        restore(payload, stateful)
        epoch, step = payload["position"]["epoch"], payload["position"]["step"]
        history, running = payload["position"]["history"], RunningMeans(payload["position"]["sums"])
        ctx.log.info("%s: resuming at epoch %d, step %d from %s", stage, epoch + 1, step, ckpt_path)

    last_read = [step]
    every_s = 60.0 * float(getattr(ctx.cfg.run, "checkpoint_every_min", 0) or 0)
    last_saved = [time.monotonic()]

    def read() -> tuple[dict[str, float], bool, bool]:
        """(running means, stop at a signal, a timed checkpoint is due), the same on every rank: the flags ride on
        the all-reduce of the logged values. A non-finite mean stops the stage (every rank reads the same values,
        so all stop)."""
        due = every_s > 0 and time.monotonic() - last_saved[0] >= every_s
        means = running.read({"_stop": float(preemption.pending()), "_due": float(due)})
        stop, due = means.pop("_stop") > 0, means.pop("_due") > 0
        bad = {key: value for key, value in means.items() if not math.isfinite(value)}
        if bad:
            key, value = next(iter(bad.items()))
            raise TrainingError(f"{stage}: {key} became {value} in epoch {epoch + 1}, steps {last_read[0] + 1}-{step}; "
                                f"{_likely_cause(ctx.cfg, stage)}; the stage stopped without marking itself done and "
                                "resumes from its last good checkpoint once the setting is fixed")
        last_read[0] = step
        return means, stop, due

    def checkpoint():
        read()
        last_saved[0] = time.monotonic()
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
    read_every = read_interval(per_epoch)
    started, waited = time.perf_counter(), source.wait_s
    history_writer = HistoryWriter(ctx.run_dir, stage, comm.is_main(), getattr(ctx.cfg.run, "tensorboard", False),
                                   ctx.log)
    history_writer.start(epoch, step)
    first_step = epoch * per_epoch + step
    window = {"time": started, "wait": source.wait_s, "step": first_step, "totals": dict(running.totals)}
    device = getattr(ctx, "device", torch.device("cpu"))

    def log_point(means: dict, extra: Callable[[], dict] | None = None) -> dict:
        """Append the point of the steps since the previous one (plus `extra()`, timed apart) to history.jsonl."""
        now, gstep = time.perf_counter(), epoch * per_epoch + step
        window.setdefault("spent", 0.0)
        steps, seconds = gstep - window["step"], max(now - window["time"], 1e-9)
        point = {"epoch": epoch, "step": step, "global_step": gstep, "epochs": epochs, "steps_per_epoch": per_epoch,
                 "wall_s": round(now - started, 3), "steps_per_s": round(steps / seconds, 4),
                 "images_per_s": round(steps * batch / seconds, 2),
                 "data_wait_fraction": round((source.wait_s - window["wait"]) / seconds, 4)}
        for key, (total, count) in running.totals.items():
            old_total, old_count = window["totals"].get(key, (0.0, 0))
            if count > old_count:
                point[key] = (total - old_total) / (count - old_count)
        if schedule is not None:
            point["lr"] = schedule.base_lrs[0] * schedule.factor(max(0, gstep - 1))
        if device.type == "cuda":
            point["gpu_peak_gb"] = round(torch.cuda.max_memory_allocated(device) / 1e9, 3)
        if extra is not None:
            point.update(extra())
        if steps > 0:
            history_writer.add(point)
        done = time.perf_counter()
        window["spent"] += done - now  # the cost of watching: diagnostics and the history line
        window.update(time=done, wait=source.wait_s, step=gstep, totals=dict(running.totals))
        return point
    # Diagnostics cost a fixed amount per call: a small dataset raised to hundreds of epochs by min_steps runs them
    # on at most MAX_DIAGNOSED_EPOCHS evenly spaced epochs (always the last), not on every one.
    diagnose_every = -(-epochs // MAX_DIAGNOSED_EPOCHS)
    try:
        with preemption.in_training_loop():  # a signal now waits for the next read (checkpoint there)
            while epoch < epochs:
                epoch_start, epoch_wait = time.perf_counter(), source.wait_s
                bar = tqdm(total=per_epoch, initial=step, desc=f"{stage} epoch {epoch + 1}/{epochs}", unit="step",
                           disable=not (ctx.cfg.run.progress and comm.is_main()), leave=False, dynamic_ncols=True)
                for batch_data in source.epoch(epoch, step):
                    if schedule is not None and optimizer is not None:
                        schedule.apply(optimizer, epoch * per_epoch + step)
                    running.add(step_fn(batch_data))
                    step += 1
                    bar.update(1)
                    if step % read_every == 0 and step < per_epoch:
                        means, stop, due = read()
                        point = log_point(means)
                        bar.set_postfix({**{k: f"{v:.4f}" for k, v in means.items()},
                                         "img/s": f"{point['images_per_s']:.0f}"}, refresh=False)
                        if stop or due:
                            checkpoint()
                            if stop:
                                bar.close()
                                preemption.handover(f"{stage} at epoch {epoch + 1}, step {step}", ctx.log.warning)
                            continue
                    if step % every == 0 and step < per_epoch:
                        checkpoint()
                bar.close()
                means, stop, _ = read()
                diagnose = (epoch + 1) % diagnose_every == 0 or epoch + 1 == epochs
                log_point(means, epoch_end if comm.is_main() and diagnose else None)
                history.append(means)
                wall, wait = time.perf_counter() - epoch_start, source.wait_s - epoch_wait
                ctx.log.info("%s epoch %d/%d: %s; %.0f img/s; waited %.1f s for data (%.1f%% of %.1f s)", stage,
                             epoch + 1, epochs, ", ".join(f"{k}={v:.4f}" for k, v in means.items()),
                             per_epoch * batch / max(wall, 1e-9), wait, 100 * wait / max(wall, 1e-9), wall)
                epoch, step, running = epoch + 1, 0, RunningMeans()
                window["totals"] = {}
                last_read[0] = 0
                checkpoint()
                if stop:
                    preemption.handover(f"{stage} at the end of epoch {epoch}", ctx.log.warning)
    finally:
        source.close()
        history_writer.close()
    record_data_wait(ctx, stage, time.perf_counter() - started, source.wait_s - waited,
                     (epochs * per_epoch - first_step) * batch)
    ctx.stage_stats[stage]["history_s"] = round(window.get("spent", 0.0), 3)
    if hasattr(ctx, "report_skips"):
        ctx.report_skips(stage, "train", source.bad)
    return history


def _likely_cause(cfg, stage: str) -> str:
    """The setting most likely at fault for a diverged stage, as advice."""
    section = getattr(cfg, stage, None)
    lr = getattr(section, "lr", None)
    advice = f"{stage}.lr={lr} is the most likely cause: lower it" if lr is not None else "lower the learning rate"
    precision = getattr(getattr(cfg, "dist", None), "precision", "fp32")
    if precision == "fp16":
        advice += " (or use dist.precision=bf16: fp16 overflows easily)"
    return advice


def record_data_wait(ctx, stage: str, wall_s: float, wait_s: float, images: int = 0) -> None:
    """Keep the time a stage's loop waited for data and its throughput (in ctx.stage_stats, merged into its DONE
    marker)."""
    stats = ctx.stage_stats.setdefault(stage, {})
    stats["images"] = stats.get("images", 0) + int(images)
    stats["data_wait_s"] = round(stats.get("data_wait_s", 0.0) + wait_s, 3)
    stats["loop_s"] = round(stats.get("loop_s", 0.0) + wall_s, 3)
    stats["data_wait_fraction"] = round(stats["data_wait_s"] / max(stats["loop_s"], 1e-9), 4)
    stats["images_per_s"] = round(stats["images"] / max(stats["loop_s"], 1e-9), 1)
