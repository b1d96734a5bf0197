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
stops the cluster only if a fixture started it and no other pytest session on the machine still uses it (a
cluster started by hand is left running), and restores both variables.

When the cluster cannot start (not root and no passwordless sudo, no apt-get, daemons not coming up) the tests that
use the fixture are skipped with the script's error tail — unless SCAN_DIST_REQUIRE_SLURM=1, which makes that a
failure (CI sets it so a broken cluster cannot pass as skipped tests).  SCAN_DIST_SLURM_DIR picks the state
directory (default /tmp/scan_dist_slurm).

The machine's CPUs are the node's CPUs: on the 2-core CI machine one 2-task job fills the node and other jobs queue
behind it, so tests should cancel what they submit (see `SlurmCluster.cancel`).
"""
from __future__ import annotations

import contextlib
import fcntl
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
# last teardown releases the cluster and restores the environment.
#
# Several pytest sessions on one machine (developers, a CI job beside a local run) share the cluster of one state
# dir.  Each session holds a lease (sessions/<pid>) while it uses it; a session that starts the cluster writes
# sessions/started-by-fixture (the slurmctld pid it started), and the cluster is stopped when the last lease goes
# and that slurmctld is still the one running — never a cluster someone started by hand.  A file lock makes a start
# and a stop of different sessions take turns.
_session: dict = {"cluster": None, "users": 0, "started": False, "saved_env": None, "leases": None}


def _proc_start_time(pid: int) -> str | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


@contextlib.contextmanager
def _sessions_lock(state_dir: Path):
    """Yields the sessions dir under an exclusive lock, or None where it cannot be set up (then no leases)."""
    sessions = state_dir / "sessions"
    lock_path = sessions / ".lock"
    try:
        sessions.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(PermissionError):
            sessions.chmod(0o1777)  # other users' sessions may take leases too
        if not lock_path.exists():
            lock_path.touch()
        handle = os.open(lock_path, os.O_RDONLY)  # flock works on a read-only descriptor
    except OSError:
        handle = None
    if handle is None:
        yield None
        return
    try:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield sessions
    finally:
        os.close(handle)


def _live_leases(sessions: Path) -> list:
    live = []
    for lease in sessions.glob("[0-9]*"):
        try:
            recorded = lease.read_text().strip()
        except OSError:
            continue
        if _proc_start_time(int(lease.name)) == recorded and recorded:
            live.append(lease)
        else:
            lease.unlink(missing_ok=True)  # a session that died without its teardown
    return live


def _ctld_pid(state_dir: Path) -> str:
    try:
        return (state_dir / "pids" / "slurmctld.pid").read_text().strip()
    except OSError:
        return ""


def _script(command: str, state_dir: Path, timeout: float) -> subprocess.CompletedProcess:
    env = dict(os.environ, SCAN_DIST_SLURM_DIR=str(state_dir))
    return subprocess.run(["bash", str(SCRIPT), command], env=env, capture_output=True, text=True, timeout=timeout,
                          check=False)


def _start() -> SlurmCluster:
    if not sys.platform.startswith("linux"):
        _unavailable("the local SLURM cluster needs Linux")
    if shutil.which("bash") is None:
        _unavailable("the local SLURM cluster needs bash")
    state_dir = Path(os.environ.get("SCAN_DIST_SLURM_DIR", DEFAULT_STATE_DIR))
    with _sessions_lock(state_dir) as sessions:
        was_running = _script("status", state_dir, 60).returncode == 0
        try:
            proc = _script("start", state_dir, START_TIMEOUT_S)
        except subprocess.TimeoutExpired as exc:
            err = exc.stderr.decode(errors="replace") if isinstance(exc.stderr, bytes) else (exc.stderr or "")
            _unavailable(f"slurm/local-cluster.sh start did not finish in {START_TIMEOUT_S} s:\n{_tail(err)}")
        if proc.returncode != 0:
            why = {3: "this machine cannot run it (root/sudo, apt-get)"}.get(proc.returncode,
                                                                             "the daemons did not come up")
            _unavailable(f"local SLURM cluster not started — {why} (slurm/local-cluster.sh start exited "
                         f"{proc.returncode}):\n{_tail(proc.stderr)}")
        _session["started"] = not was_running
        if sessions is not None:
            if not was_running:
                (sessions / "started-by-fixture").write_text(_ctld_pid(state_dir))
            lease = sessions / str(os.getpid())
            lease.write_text(_proc_start_time(os.getpid()) or "")
            _session["leases"] = sessions
    exports = dict(line[len("export "):].split("=", 1) for line in proc.stdout.splitlines()
                   if line.startswith("export "))
    conf = Path(exports.get("SLURM_CONF", state_dir / "slurm.conf"))
    cluster = SlurmCluster(conf=conf, state_dir=state_dir, bin_dir=state_dir / "bin", partition="debug")
    _session["saved_env"] = {k: os.environ.get(k) for k in ("SLURM_CONF", "PATH")}
    os.environ["SLURM_CONF"] = str(cluster.conf)
    os.environ["PATH"] = f"{cluster.bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"
    return cluster


def _stop() -> None:
    for key, value in (_session["saved_env"] or {}).items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    state_dir = _session["cluster"].state_dir
    if _session["leases"] is None:  # no lease bookkeeping: stop what this session started
        if _session["started"]:
            _script("stop", state_dir, 120)
    else:
        with _sessions_lock(state_dir) as sessions:
            if sessions is not None:
                (sessions / str(os.getpid())).unlink(missing_ok=True)
                marker = sessions / "started-by-fixture"
                if not _live_leases(sessions) and marker.is_file():
                    if marker.read_text().strip() == _ctld_pid(state_dir):
                        _script("stop", state_dir, 120)
                    marker.unlink(missing_ok=True)
    _session.update(cluster=None, started=False, saved_env=None, leases=None)


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
