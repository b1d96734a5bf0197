"""One run per run folder: `RUN_DIR/.lock` names the holder (host, pid, SLURM job, start time).

A second launch on a folder in use fails at once with one error line naming the holder, instead of two runs
writing the same checkpoints. A lock left by a process that is gone (same host, pid not alive) or by an earlier
allocation of the same SLURM job (a requeue) is taken over, and the takeover is logged. A lock from another host
that we cannot check stays an error that says how to clear it.
"""
from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

from .errors import ConfigError

LOCK_NAME = ".lock"


def _holder() -> dict:
    return {"host": socket.gethostname(), "pid": os.getpid(), "slurm_job": os.environ.get("SLURM_JOB_ID"),
            "started": time.strftime("%Y-%m-%d %H:%M:%S")}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


class RunLock:
    def __init__(self, run_dir: Path, log=None):
        self.path = Path(run_dir) / LOCK_NAME
        self.log = log
        self.held = False

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        me = _holder()
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                self._take_over_if_stale(me)
                continue
            with os.fdopen(fd, "w") as handle:
                json.dump(me, handle)
            self.held = True
            return
        raise ConfigError(f"run folder {self.path.parent}: could not take its lock {self.path}; remove it if no run "
                          "uses this folder")

    def _take_over_if_stale(self, me: dict) -> None:
        try:
            other = json.loads(self.path.read_text() or "{}")
        except (OSError, json.JSONDecodeError):
            other = {}
        same_host = other.get("host") == me["host"]
        same_job = me["slurm_job"] is not None and other.get("slurm_job") == me["slurm_job"]
        if other and not same_job and (not same_host or _alive(int(other.get("pid", -1)))):
            where = f"pid {other.get('pid')} on {other.get('host')}"
            if other.get("slurm_job"):
                where += f" (SLURM job {other['slurm_job']})"
            hint = "" if same_host else f"; if no run is active there, delete {self.path}"
            raise ConfigError(f"run folder {self.path.parent} is in use by {where} since {other.get('started')}; "
                              f"wait for it to end or choose another --run-dir{hint}")
        if self.log is not None:
            self.log.warning("run folder lock %s of %s (pid %s, %s) is stale; taking it over", self.path,
                             other.get("host", "?"), other.get("pid", "?"),
                             "same SLURM job, requeued" if same_job else "no longer running")
        self.path.unlink(missing_ok=True)

    def release(self) -> None:
        if self.held:
            try:
                if json.loads(self.path.read_text()).get("pid") == os.getpid():
                    self.path.unlink()
            except (OSError, json.JSONDecodeError):
                pass
            self.held = False
