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


def _version(text: str) -> tuple[int, ...]:
    parts = []
    for piece in text.split("+")[0].split(".")[:3]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits) if digits else 0)
    return tuple(parts)


@functools.lru_cache(maxsize=None)
def interpreter_problem() -> str | None:
    """Why Triton's CPU interpreter cannot run these kernels with the installed packages, or None.

    Triton < 3.7's interpreter turns ``tl.program_id`` into a one-element numpy array, and numpy >= 2.4 no longer
    converts such arrays to Python ints, so every loop bounded by a program-dependent value fails (found running
    the kernel tests on Triton 3.6 with numpy 2.4; Triton 3.7.1 and 3.8 are fine, and so is 3.6 with numpy 2.3).
    Compiled kernels on a GPU are not affected.
    """
    if not triton_importable():
        return "triton is not installed"
    import numpy
    import triton

    if _version(triton.__version__) < (3, 7) and _version(numpy.__version__) >= (2, 4):
        return (f"Triton {triton.__version__}'s interpreter fails with numpy {numpy.__version__} (program ids are "
                "1-element arrays that numpy >= 2.4 will not turn into ints): use numpy<2.4 or triton>=3.7")
    return None


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
        problem = interpreter_problem()
        if problem:
            raise RuntimeError(f"{what}: backend 'triton' on CPU runs in Triton's interpreter, which cannot run here: "
                               f"{problem}; or use backend 'torch'")
        return "triton"
    raise RuntimeError(f"{what}: backend 'triton' needs a CUDA tensor (got one on {tensor.device}); on CPU set "
                       "TRITON_INTERPRET=1 before importing scan_dist (slow; meant for tests) or use backend 'torch'")
