"""Atomic stage checkpoints for exact resume: model/optimiser states, loop position, running sums.

A checkpoint records the hash of the stage's configuration; one written under another configuration is ignored,
so a changed setting never resumes from stale state. No RNG state is kept: every random choice of a training step
is a counter-based function of (seed, stage, epoch, sample index) (data/sampling.py), so the loop position says it
all, and a checkpoint resumes identically on any number of processes. Everything is a plain dict of tensors and
numbers, so `torch.load(weights_only=True)` reads it.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any


from ..io_utils import load_torch, save_torch


def save_checkpoint(path: Path, config_hash: str, position: dict[str, Any], stateful: dict[str, Any]) -> None:
    """`stateful` maps names to objects with state_dict() (models, optimisers) or to plain data."""
    payload = {
        "config_hash": config_hash,
        "position": position,
        "state": {name: obj.state_dict() if hasattr(obj, "state_dict") else obj for name, obj in stateful.items()},
    }
    save_torch(path, payload)


def load_checkpoint(path: Path, config_hash: str) -> dict[str, Any] | None:
    """The checkpoint at `path` when it exists and was written under the same configuration, else None."""
    if not Path(path).is_file():
        return None
    payload = load_torch(path)
    if payload.get("config_hash") != config_hash:
        return None
    return payload


def restore(payload: dict[str, Any], stateful: dict[str, Any]) -> dict[str, Any]:
    """Load states into the objects of `stateful`; returns the plain-data entries."""
    plain = {}
    for name, saved in payload["state"].items():
        target = stateful.get(name)
        if hasattr(target, "load_state_dict"):
            target.load_state_dict(saved)
        else:
            plain[name] = saved
    return plain
