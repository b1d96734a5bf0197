"""Shared fixtures: the real Fashion-MNIST location and a skip when Debian's package is absent.

Without CUDA, Triton kernels are tested in Triton's CPU interpreter.  Triton reads TRITON_INTERPRET when a kernel
is decorated, so it is set here, before any test module imports scan_dist.kernels.  (Kernel dispatch with
backend="auto" still picks the torch reference on CPU, so the pipeline tests stay fast.)

The kernels' first-use self-check (scan_dist.kernels._selfcheck) is switched off for the suite: on a GPU it would
replace a failing kernel by the torch reference, and a parity test would then compare torch with torch and pass.
Tests of the check itself switch it on explicitly (tests/test_kernel_selfcheck.py).

Array datasets are decoded once into a cache folder (data.cache_dir); the suite uses one temporary folder for
all its tests and the runs they start (SCAN_DIST_CACHE_DIR, inherited by subprocesses), never ~/.cache.
"""
import atexit
import os
import shutil
import tempfile
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("SCAN_DIST_KERNEL_SELF_CHECK", "0")
if "SCAN_DIST_CACHE_DIR" not in os.environ:
    _CACHE = tempfile.mkdtemp(prefix="scan_dist_test_cache-")
    os.environ["SCAN_DIST_CACHE_DIR"] = _CACHE
    atexit.register(shutil.rmtree, _CACHE, ignore_errors=True)

FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")


@pytest.fixture(scope="session")
def fashion_mnist() -> Path:
    if not (FASHION_MNIST / "train-images-idx3-ubyte.gz").is_file():
        pytest.skip("Fashion-MNIST not installed (apt-get install dataset-fashion-mnist; `make test` does it)")
    return FASHION_MNIST
