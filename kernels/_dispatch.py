"""Which implementation a kernel call runs: the Triton kernel or the pure-torch reference.

One rule for every kernel in this package, chosen by a ``backend`` argument:

* ``"auto"``   -> Triton when the tensor is on CUDA and Triton imports; the torch reference otherwise.
* ``"triton"`` -> Triton, or a clear error: on CPU it needs ``TRITON_INTERPRET=1`` (Triton's interpreter, which
  runs the same kernel code with numpy; this is how CI tests the kernels without a GPU).
* ``"torch"``  -> the reference.

``auto`` deliberately never picks the interpreter on CPU: it is orders of magnitude slower than torch and exists
for testing, so a CPU run stays fast even when ``TRITON_INTERPRET`` happens to be set.  Triton reads
``TRITON_INTERPRET`` when a kernel is *decorated*, so the variable must be set before the ``*_triton`` modules are
first imported (``tests/conftest.py`` does it on machines without CUDA).  The Triton code lives in sibling
``*_triton`` modules imported only here, so the package imports on machines without Triton (e.g. macOS).
"""
from __future__ import annotations

import functools
import os

from torch import Tensor

BACKENDS = ("auto", "triton", "torch")


@functools.lru_cache(maxsize=None)
def triton_importable() -> bool:
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except ImportError:
        return False
    return True


def interpreting() -> bool:
    """True when Triton kernels run in the CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() not in ("", "0", "false", "no")


def resolve(backend: str, tensor: Tensor, what: str) -> str:
    """``"triton"`` or ``"torch"`` for a call on ``tensor``; ``what`` names the kernel in error messages."""
    if backend not in BACKENDS:
        raise ValueError(f"{what}: backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "torch":
        return "torch"
    if backend == "auto":
        return "triton" if tensor.is_cuda and triton_importable() else "torch"
    if not triton_importable():
        raise RuntimeError(f"{what}: backend 'triton' needs the triton package (pip install triton), "
                           "or use backend 'torch'")
    if tensor.is_cuda:
        return "triton"
    if tensor.device.type == "cpu" and interpreting():
        return "triton"
    raise RuntimeError(f"{what}: backend 'triton' needs a CUDA tensor (got one on {tensor.device}); on CPU set "
                       "TRITON_INTERPRET=1 before importing scan_dist (slow; meant for tests) or use backend 'torch'")
