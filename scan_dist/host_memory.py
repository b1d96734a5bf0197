"""Host-allocator tuning for CPU runs: keep freed tensor memory in the process for the next step to reuse.

Why: on Linux, glibc's malloc serves large blocks with mmap and hands freed ones, and the free top of its heaps, back
to the kernel. A training step frees its activations and the next step allocates the same sizes again, so every
page is faulted in anew: 32 steps of the demo's pretext stage (2 cores) took 2.9-3.7 million minor page faults and
5.5-8.2 s of system time in 12.7-14.6 s, varying from run to run with the allocator's adaptive threshold.
Raising the mmap threshold to glibc's maximum (32 MiB) and the trim threshold to 2 GiB keeps that memory for
reuse: median 13.3 s -> 10.2 s and 3.5 -> 0.95 million faults for the same steps (benchmarks/bench_host_memory.py).
Peak memory is what the step needs anyway; it is simply not returned between steps.

Only glibc is tuned (other C libraries and macOS are left alone); `run.tune_malloc=false` turns it off.
"""
from __future__ import annotations

import ctypes
import platform

# mallopt() parameter numbers from glibc's <malloc.h>.
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
# glibc refuses an mmap threshold above HEAP_MAX_SIZE / 2, which is 32 MiB on 64-bit builds.
MMAP_THRESHOLD = 32 * 1024 * 1024
TRIM_THRESHOLD = 2**31 - 1  # mallopt takes an int: 2 GiB of free heap top before any is returned

_applied: str | None = None


def tune_malloc() -> str:
    """Apply the tuning once per process; returns what was done, for the log."""
    global _applied
    if _applied is not None:
        return _applied
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        _applied = f"host allocator left as is ({platform.system()}, {platform.libc_ver()[0] or 'unknown libc'})"
        return _applied
    try:
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError) as exc:  # a static or unusual build: nothing to tune
        _applied = f"host allocator left as is (no mallopt: {exc})"
        return _applied
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    ok = mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1 and mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
    _applied = ("host allocator: glibc keeps freed memory for reuse (mmap threshold 32 MiB, trim threshold 2 GiB)" if ok
                else "host allocator left as is (glibc refused mallopt)")
    return _applied
