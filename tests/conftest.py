"""Shared fixtures: the real Fashion-MNIST location and a skip when Debian's package is absent.

Without CUDA, Triton kernels are tested in Triton's CPU interpreter.  Triton reads TRITON_INTERPRET when a kernel
is decorated, so it is set here, before any test module imports scan_dist.kernels.  (Kernel dispatch with
backend="auto" still picks the torch reference on CPU, so the pipeline tests stay fast.)
"""
import os
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")


@pytest.fixture(scope="session")
def fashion_mnist() -> Path:
    if not (FASHION_MNIST / "train-images-idx3-ubyte.gz").is_file():
        pytest.skip("Fashion-MNIST not installed (apt-get install dataset-fashion-mnist; `make test` does it)")
    return FASHION_MNIST
