"""One run per run folder: a live holder refuses a second launch; a dead one's lock is taken over."""
import json
import os
import socket
import subprocess
import sys

import pytest

from scan_dist.errors import ConfigError
from scan_dist.run_lock import LOCK_NAME, RunLock


def test_second_lock_on_a_live_holder_fails_naming_it(tmp_path):
    first = RunLock(tmp_path)
    first.acquire()
    with pytest.raises(ConfigError, match=f"in use by pid {os.getpid()} on {socket.gethostname()}"):
        RunLock(tmp_path).acquire()
    first.release()
    assert not (tmp_path / LOCK_NAME).exists()
    again = RunLock(tmp_path)
    again.acquire()
    again.release()


def test_stale_lock_of_a_dead_process_is_taken_over_and_logged(tmp_path, caplog):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (tmp_path / LOCK_NAME).write_text(json.dumps({"host": socket.gethostname(), "pid": int(dead.stdout),
                                                  "started": "earlier"}))
    import logging

    lock = RunLock(tmp_path, logging.getLogger("test_run_lock"))
    with caplog.at_level(logging.WARNING):
        lock.acquire()
    assert "stale; taking it over" in caplog.text
    assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == os.getpid()
    lock.release()


def test_lock_of_another_host_is_an_error_that_says_how_to_clear_it(tmp_path):
    (tmp_path / LOCK_NAME).write_text(json.dumps({"host": "elsewhere", "pid": 1, "started": "earlier"}))
    with pytest.raises(ConfigError, match="delete"):
        RunLock(tmp_path).acquire()


def test_same_slurm_job_requeued_takes_over(tmp_path, monkeypatch):
    (tmp_path / LOCK_NAME).write_text(json.dumps({"host": "node7", "pid": 1, "slurm_job": "42", "started": "x"}))
    monkeypatch.setenv("SLURM_JOB_ID", "42")
    lock = RunLock(tmp_path)
    lock.acquire()
    assert json.loads((tmp_path / LOCK_NAME).read_text())["slurm_job"] == "42"
    lock.release()
