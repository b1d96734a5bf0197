"""host_memory.tune_malloc: glibc serves mid-sized tensors from its heap and keeps freed memory, in a fresh process."""
import json
import platform
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                                reason="the tuning applies to glibc only")

# A fresh interpreter per case: mallopt settings are per process and glibc's adaptive threshold remembers history.
_PROBE = r"""
import ctypes, json, sys
import torch
from scan_dist.host_memory import tune_malloc

class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]

libc = ctypes.CDLL(None)
libc.mallinfo2.restype = MallInfo2
message = tune_malloc() if sys.argv[1] == "tuned" else "default"
before = libc.mallinfo2()
block = torch.ones(6 * 1024 * 1024)  # 24 MiB: above glibc's initial mmap threshold, below the tuned one
during = libc.mallinfo2()
del block
after = libc.mallinfo2()
print(json.dumps({"message": message, "again": tune_malloc() if sys.argv[1] == "tuned" else "default",
                  "mmapped_growth": during.hblkhd - before.hblkhd,
                  "heap_kept": after.arena - before.arena}))
"""


def _probe(mode: str) -> dict:
    result = subprocess.run([sys.executable, "-c", _PROBE, mode], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_tuned_process_serves_and_keeps_mid_sized_blocks_on_its_heap():
    tuned = _probe("tuned")
    assert tuned["message"].startswith("host allocator: glibc keeps freed memory"), tuned
    assert tuned["again"] == tuned["message"]  # applied once, reported the same
    assert tuned["mmapped_growth"] == 0  # the 24 MiB block came from the heap, not a fresh mmap
    assert tuned["heap_kept"] >= 24 * 1024 * 1024  # and its pages stayed with the process after the free


def test_default_process_maps_the_same_block_and_returns_it():
    default = _probe("default")
    assert default["mmapped_growth"] >= 24 * 1024 * 1024  # what the tuning avoids: a fresh mapping, faulted anew
    assert default["heap_kept"] < 24 * 1024 * 1024
