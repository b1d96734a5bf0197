"""Checkpoint at the signal: USR2 (SLURM's time-limit warning, preemption) and SIGTERM stop a training loop at its
next read of the logged values, after a checkpoint, instead of losing the steps since the last periodic one.

`install()` (called once per process by the launcher) records the signal in a flag. A training loop that is
running (`in_training_loop()`) agrees with the other ranks at its next read whether any rank was signalled (the
flag rides on the all-reduce that already averages the logged values, so ranks never disagree on the step), writes
its checkpoint and raises `Preempted`. Then, for USR2 under submitit, the handler submitit had installed runs
(rank 0 requeues the job, exactly as before); for SIGTERM the process ends and SLURM (or whoever sent it) decides.
Outside a training loop there is no step boundary to wait for: USR2 goes straight to submitit's handler, SIGTERM to
the default action, as before this module existed.
"""
from __future__ import annotations

import contextlib
import signal
import time
from typing import Callable

from .errors import ScanDistError


REQUEUE_GRACE_S = 300  # how long a non-zero rank waits for rank 0's requeue to end it


class Preempted(ScanDistError):
    """The running stage checkpointed at a signal; relaunching (or the requeued job) resumes it."""


_state: dict = {"signal": None, "previous": {}, "in_loop": 0, "installed": False}


STOP_SIGNALS = (signal.SIGUSR2, signal.SIGTERM)


def install(signals=STOP_SIGNALS) -> None:
    """Route these signals through `_handler` (idempotent); remembers the handlers installed before."""
    if _state["installed"]:
        return
    for signum in signals:
        _state["previous"][signum] = signal.getsignal(signum)
        signal.signal(signum, _handler)
    _state["installed"] = True


def ignore_in_data_worker(_worker_id: int) -> None:
    """DataLoader `worker_init_fn`: a data worker ignores the stop signals; the main process owns the stop.

    Why: SLURM signals every process of a job step, and `timeout`, `kill -- -PGID` and a terminal's process group
    do the same. A worker left to the default action dies first, and the main process then fails with "DataLoader
    worker ... is killed by signal: Terminated" instead of checkpointing at the signal (seen on the H200 with 3
    workers; README, "Reliability, fault by fault"). Ignoring it, the worker keeps serving batches until the main
    process checkpoints and shuts the loader down; a worker whose main process is gone exits on its own (torch's
    parent watchdog)."""
    for signum in STOP_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)


def uninstall() -> None:
    for signum, previous in _state["previous"].items():
        signal.signal(signum, previous)
    _state.update(signal=None, previous={}, in_loop=0, installed=False)


def _handler(signum, frame) -> None:
    if _state["in_loop"]:
        _state["signal"] = signum  # the loop checkpoints at its next read, then hands over (see handover)
        return
    _call_previous(signum, frame)


def _call_previous(signum, frame) -> None:
    previous = _state["previous"].get(signum)
    if callable(previous):
        previous(signum, frame)
    elif previous in (signal.SIG_DFL, None):
        signal.signal(signum, signal.SIG_DFL)
        signal.raise_signal(signum)


def pending() -> bool:
    """Whether this process was signalled since the loop started (to be agreed over ranks by the caller)."""
    return _state["signal"] is not None


@contextlib.contextmanager
def in_training_loop():
    _state["in_loop"] += 1
    try:
        yield
    finally:
        _state["in_loop"] = max(0, _state["in_loop"] - 1)


def handover(where: str, log_fn: Callable[[str], None] | None = None) -> None:
    """After the checkpoint that a signal asked for: let the original handler act (submitit requeues on USR2),
    then stop this process's pipeline with `Preempted`."""
    signum = _state["signal"] or signal.SIGUSR2
    _state["signal"] = None
    name = signal.Signals(signum).name
    if log_fn is not None:
        log_fn(f"{name}: checkpointed {where}; the stage resumes there when the run is relaunched or requeued")
    _state["in_loop"] = 0  # the previous handler runs as if outside the loop
    if signum == signal.SIGUSR2 and callable(_state["previous"].get(signum)):
        _state["previous"][signum](signum, None)  # submitit: rank 0 requeues and exits; other ranks return
        # Another rank of a submitit job: the requeue ends this task; failing first could mark the job failed.
        time.sleep(REQUEUE_GRACE_S)
    raise Preempted(f"{name} received: checkpointed {where}; relaunch the same command (or wait for the requeue) "
                    "to resume")
