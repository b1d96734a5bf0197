"""First-use self-check of the Triton kernels, and the process-wide fallback to the torch reference.

No GPU had run these kernels when this was written, so a user's first GPU run must not depend on them being right.
(On the first H200 run, 2026-12-04, every specialisation passed; the check stays as the guard for other GPUs and
Triton versions; it cost 0.03–1.5 s per specialisation there, compile included.)
The rule, for each kernel family (``"scan_loss"``, ``"knn"``) on each device:

* The first time a process is about to run a Triton kernel specialisation on a device where checks apply (CUDA by
  default, see :data:`DEVICE_TYPES`), it first runs a small case of the *same* specialisation (same dtypes, class
  count or dimension, k and precision) through the Triton path and compares it with the torch reference.  The
  compile happens inside that check, so a compiler crash is caught there too.
* On an exception or a mismatch it logs ONE warning (logger ``scan_dist.kernels``) naming the kernel, the device and
  the Triton version, and every later call of that kernel family on that device takes the torch path.
* While checks apply, the real call is guarded as well: if it raises (e.g. a specialisation the small case did not
  compile, or the backward of the SCAN loss), the same warning is logged once and the call is redone with torch.
  Out-of-memory errors are not a kernel fault and are re-raised.

Switch: ``scan_dist.kernels.configure(self_check=False)`` (the run config's ``run.kernel_self_check``) or the
environment variable ``SCAN_DIST_KERNEL_SELF_CHECK=0`` turns both the check and the guard off, so errors surface
(tests of the kernels themselves, benchmarks of the raw kernels).  :func:`configure` wins over the variable.
:func:`status` tells what happened in this process (benchmarks record it, so a fallback is never timed as Triton).

Tests run the logic on CPU by adding ``"cpu"`` to :data:`DEVICE_TYPES` (kernels then run in Triton's interpreter).
"""
from __future__ import annotations

import logging
import os
import threading
from typing import Callable

import torch

ENV_VAR = "SCAN_DIST_KERNEL_SELF_CHECK"
# Device types on which the check and the guard apply.  CUDA only: on CPU the Triton path exists only under
# TRITON_INTERPRET=1 (tests), where a failure must surface, not be hidden.  Tests monkeypatch this set.
DEVICE_TYPES: frozenset[str] = frozenset({"cuda"})

_log = logging.getLogger("scan_dist.kernels")
_lock = threading.RLock()
_configured: bool | None = None
_passed: set[tuple] = set()           # (family, device, key) checked and found right
_failed: dict[tuple, str] = {}         # (family, device) -> why the family is off on that device


def configure(self_check: bool) -> None:
    """Turn the first-use self-check (and the fallback guard) on or off for this process."""
    global _configured
    if not isinstance(self_check, bool):
        raise TypeError(f"self_check must be a bool, got {type(self_check).__name__}")
    _configured = self_check


def enabled() -> bool:
    """Whether checks are on: :func:`configure` if called, else ``SCAN_DIST_KERNEL_SELF_CHECK`` (default on)."""
    if _configured is not None:
        return _configured
    value = os.environ.get(ENV_VAR, "1").strip().lower()
    return value not in ("0", "false", "no", "off")


def applies(device: torch.device) -> bool:
    """Whether the check and the guard apply to a Triton call on ``device``."""
    return enabled() and torch.device(device).type in DEVICE_TYPES


def _device_key(device: torch.device) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return f"cuda:{index}"
    return device.type


def describe_device(device: torch.device) -> str:
    """Human-readable device: GPU name and compute capability on CUDA."""
    device = torch.device(device)
    if device.type == "cuda":
        try:
            index = device.index if device.index is not None else torch.cuda.current_device()
            major, minor = torch.cuda.get_device_capability(index)
            return f"{torch.cuda.get_device_name(index)} (cuda:{index}, sm_{major}{minor})"
        except Exception:  # noqa: BLE001 - only used in a message
            return str(device)
    return f"{device.type} (Triton interpreter)" if device.type == "cpu" else device.type


def _triton_version() -> str:
    try:
        import triton
        return triton.__version__
    except Exception:  # noqa: BLE001
        return "not importable"


def is_oom(exc: BaseException) -> bool:
    """Out of memory is the caller's problem, not a kernel fault: never a reason to fall back."""
    return isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc).lower()


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    first = text[0] if text else ""
    return f"{type(exc).__name__}: {first[:300]}"


def disabled(family: str, device: torch.device) -> bool:
    """True once ``family`` failed on ``device`` (while checks are on): callers take the torch path."""
    return applies(device) and (family, _device_key(device)) in _failed


def fail(family: str, device: torch.device, reason: str | BaseException) -> None:
    """Record that ``family`` is off on ``device`` and log the one warning (later failures are not logged)."""
    if isinstance(reason, BaseException):
        reason = _short(reason)
    key = (family, _device_key(device))
    with _lock:
        if key in _failed:
            return
        _failed[key] = reason
    _log.warning("Triton kernel %r failed on %s (triton %s): %s. This process uses the torch reference for %s from "
                 "now on (exact, slower). Set %s=0 or run.kernel_self_check=false to make such errors raise instead.",
                 family, describe_device(device), _triton_version(), reason, family, ENV_VAR)


def _capturing(device: torch.device) -> bool:
    # A check synchronises (it compares numbers on the host), which is illegal inside a CUDA graph capture.
    # Graph captures follow warm-up iterations, which ran the check already.
    return torch.device(device).type == "cuda" and torch.cuda.is_current_stream_capturing()


def ensure(family: str, device: torch.device, key: tuple, check: Callable[[], str | None]) -> bool:
    """True when the Triton path may run a call of specialisation ``key`` on ``device``.

    Runs ``check`` (returns None when right, else what was wrong; may raise) the first time ``key`` is seen while
    checks apply.  False means: take the torch path (the family failed here, now or earlier).
    """
    if not applies(device):
        return True
    dev = _device_key(device)
    with _lock:
        if (family, dev) in _failed:
            return False
        if (family, dev, key) in _passed or _capturing(device):
            return True
        try:
            problem = check()
        except Exception as exc:  # noqa: BLE001 - compile errors, launch errors, anything: fall back
            if is_oom(exc):
                raise
            problem = _short(exc)
        if problem:
            fail(family, device, f"self-check {_key_text(key)}: {problem}")
            return False
        _passed.add((family, dev, key))
        return True


def _key_text(key: tuple) -> str:
    return "(" + ", ".join(str(k).replace("torch.", "") for k in key) + ")"


def status() -> dict:
    """What the checks found in this process: ``{"enabled", "device_types", "passed": [...], "failed": {...}}``."""
    with _lock:
        return {"enabled": enabled(), "device_types": sorted(DEVICE_TYPES),
                "passed": [f"{f} on {d}: {_key_text(k)}" for f, d, k in sorted(_passed, key=str)],
                "failed": {f"{f} on {d}": why for (f, d), why in _failed.items()}}


def reset() -> None:
    """Forget every check result and the :func:`configure` setting (tests)."""
    global _configured
    with _lock:
        _passed.clear()
        _failed.clear()
        _configured = None
