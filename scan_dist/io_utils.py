"""Atomic file writes: every artifact is written to a temporary name in its folder, then renamed into place.

A killed run therefore never leaves a half-written artifact behind, only (at worst) a stray `.tmp-*` file that the
next write of the same artifact replaces.
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from .errors import StorageError


# A full disk, an exceeded quota, a read-only filesystem: a user can fix these, so they are one-line errors.
_STORAGE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS}


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it is renamed to `path`, on error it is removed."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".tmp-{target.name}.", dir=target.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        # mkstemp makes 0600 files; artifacts are shared, so keep the old file's mode or use rw-r--r--
        os.chmod(tmp, target.stat().st_mode & 0o777 if target.exists() else 0o644)
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())  # the rename must never expose a file whose data is not on disk
        os.replace(tmp, target)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        if exc.errno in _STORAGE_ERRNOS:
            raise StorageError(f"{target}: cannot write it ({exc.strerror}); free space in {target.parent} or point "
                               f"--run-dir elsewhere; the previous {target.name}, if any, is unchanged") from None
        raise
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text(path, text: str) -> None:
    """Write UTF-8 text with '\n' line ends, all or nothing."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8", newline="\n")


def write_json(path, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def _json_default(value: Any) -> Any:
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        return float(value)
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def save_numpy(path, array: np.ndarray) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as handle:
            np.save(handle, array)


def save_torch(path, obj: Any) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as handle:  # our file object: a full disk surfaces as an OSError we can name
            try:
                torch.save(obj, handle)
            except RuntimeError as exc:  # torch's zip writer wraps the OSError of the failed write
                cause = _os_error_behind(exc)
                if cause is None:
                    raise
                raise cause from None


def _os_error_behind(exc: BaseException) -> OSError | None:
    seen = exc
    while seen is not None:
        if isinstance(seen, OSError):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


def load_torch(path) -> Any:
    """Checkpoints hold plain dicts of tensors and numbers, so weights_only loading must work."""
    return torch.load(path, map_location="cpu", weights_only=True)
