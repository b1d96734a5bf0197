"""The `slurm_cluster` fixture: a real one-node SLURM cluster on this machine for the session (slurm/local-cluster.sh).

Use it from a test module (tests/ is on sys.path, as for gloo.py):

    from slurm_cluster import slurm_cluster  # noqa: F401  (a fixture)

    @pytest.mark.slurm
    def test_something(slurm_cluster):
        subprocess.run(["sbatch", "-p", slurm_cluster.partition, ...])

The fixture runs `slurm/local-cluster.sh start` once per session (installs slurm-wlm and munge with apt-get the
first time on a machine, ~10-15 s; the daemons are idle within a second), then puts SLURM_CONF and PATH — with
the cluster's `sacct` stand-in first, so submitit can read job states without an accounting database — into
os.environ for the rest of the session; job subprocesses and submitit inherit them.  At the end of the session it
stops the cluster only if it started it (a cluster already running, e.g. started by hand, is left running) and
restores both variables.

When the cluster cannot start (not root and no passwordless sudo, no apt-get, daemons not coming up) the tests that
use the fixture are skipped with the script's error tail — unless SCAN_DIST_REQUIRE_SLURM=1, which makes that a
failure (CI sets it so a broken cluster cannot pass as skipped tests).  SCAN_DIST_SLURM_DIR picks the state
directory (default /tmp/scan_dist_slurm).

The machine's CPUs are the node's CPUs: on the 2-core CI machine one 2-task job fills the node and other jobs queue
behind it, so tests should cancel what they submit (see `SlurmCluster.cancel`).
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "slurm" / "local-cluster.sh"
DEFAULT_STATE_DIR = "/tmp/scan_dist_slurm"
START_TIMEOUT_S = 900  # includes apt-get install on a fresh machine
TAIL_LINES = 30


@dataclass(frozen=True)
class SlurmCluster:
    conf: Path  # slurm.conf (SLURM_CONF)
    state_dir: Path  # everything the cluster writes: logs in log/, pids in pids/, jobcomp.txt
    bin_dir: Path  # holds the sacct stand-in; first on PATH for the session
    partition: str  # the only partition (also the default)

    def env(self, **extra: str) -> dict:
        """os.environ with this cluster's SLURM_CONF and PATH (already set for the session) plus `extra`."""
        env = dict(os.environ, SLURM_CONF=str(self.conf))
        if not env.get("PATH", "").startswith(str(self.bin_dir) + os.pathsep):
            env["PATH"] = f"{self.bin_dir}{os.pathsep}{env.get('PATH', '')}"
        env.update(extra)
        return env

    def cancel(self, *job_ids: str) -> None:
        """scancel, ignoring errors (for finally blocks)."""
        ids = [str(j) for j in job_ids if j]
        if ids:
            subprocess.run(["scancel", *ids], env=self.env(), capture_output=True, timeout=30, check=False)

    def log_tail(self, lines: int = TAIL_LINES) -> str:
        """The end of slurmctld's and slurmd's logs, for assertion messages."""
        out = []
        for name in ("slurmctld.log", "slurmd.log"):
            path = self.state_dir / "log" / name
            if path.is_file():
                text = path.read_text(errors="replace").splitlines()[-lines:]
                out.append(f"---- {path}\n" + "\n".join(text))
        return "\n".join(out)


def _tail(text: str, lines: int = TAIL_LINES) -> str:
    """The script's ERROR lines, then its last `lines` lines (the log tails it prints on failure)."""
    all_lines = text.strip().splitlines()
    errors = [line for line in all_lines[:-lines] if "ERROR" in line]
    return "\n".join(errors + all_lines[-lines:])


def _unavailable(reason: str) -> None:
    if os.environ.get("SCAN_DIST_REQUIRE_SLURM") == "1":
        pytest.fail(f"SCAN_DIST_REQUIRE_SLURM=1 but {reason}", pytrace=False)
    pytest.skip(reason)


# The module is imported once per session, so several test modules importing the fixture share one start; the
# last teardown stops the cluster (if this session started it) and restores the environment.
_session: dict = {"cluster": None, "users": 0, "started": False, "saved_env": None}


def _start() -> SlurmCluster:
    if not sys.platform.startswith("linux"):
        _unavailable("the local SLURM cluster needs Linux")
    if shutil.which("bash") is None:
        _unavailable("the local SLURM cluster needs bash")
    state_dir = Path(os.environ.get("SCAN_DIST_SLURM_DIR", DEFAULT_STATE_DIR))
    env = dict(os.environ, SCAN_DIST_SLURM_DIR=str(state_dir))
    was_running = subprocess.run(["bash", str(SCRIPT), "status"], env=env, capture_output=True,
                                 timeout=60).returncode == 0
    try:
        proc = subprocess.run(["bash", str(SCRIPT), "start"], env=env, capture_output=True, text=True,
                              timeout=START_TIMEOUT_S)
    except subprocess.TimeoutExpired as exc:
        err = exc.stderr.decode(errors="replace") if isinstance(exc.stderr, bytes) else (exc.stderr or "")
        _unavailable(f"slurm/local-cluster.sh start did not finish in {START_TIMEOUT_S} s:\n{_tail(err)}")
    if proc.returncode != 0:
        why = {3: "this machine cannot run it (root/sudo, apt-get)"}.get(proc.returncode, "the daemons did not come up")
        _unavailable(f"local SLURM cluster not started — {why} (slurm/local-cluster.sh start exited "
                     f"{proc.returncode}):\n{_tail(proc.stderr)}")
    exports = dict(line[len("export "):].split("=", 1) for line in proc.stdout.splitlines()
                   if line.startswith("export "))
    conf = Path(exports.get("SLURM_CONF", state_dir / "slurm.conf"))
    cluster = SlurmCluster(conf=conf, state_dir=state_dir, bin_dir=state_dir / "bin", partition="debug")
    _session["saved_env"] = {k: os.environ.get(k) for k in ("SLURM_CONF", "PATH")}
    os.environ["SLURM_CONF"] = str(cluster.conf)
    os.environ["PATH"] = f"{cluster.bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"
    _session["started"] = not was_running
    return cluster


def _stop() -> None:
    for key, value in (_session["saved_env"] or {}).items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    if _session["started"]:
        env = dict(os.environ, SCAN_DIST_SLURM_DIR=str(_session["cluster"].state_dir))
        subprocess.run(["bash", str(SCRIPT), "stop"], env=env, capture_output=True, timeout=120, check=False)
    _session.update(cluster=None, started=False, saved_env=None)


@pytest.fixture(scope="session")
def slurm_cluster():
    """A running one-node SLURM cluster; SLURM_CONF and PATH (sacct stand-in first) set in os.environ."""
    if _session["cluster"] is None:
        _session["cluster"] = _start()
    _session["users"] += 1
    try:
        yield _session["cluster"]
    finally:
        _session["users"] -= 1
        if _session["users"] == 0 and _session["cluster"] is not None:
            _stop()
