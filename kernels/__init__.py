"""Compute kernels for scan_dist: the SCAN loss and exact k-NN mining.

Installed as ``scan_dist.kernels``.  Each public function takes ``backend=auto|triton|torch``
(see ``_dispatch.py``): ``auto`` runs the Triton kernel on CUDA and the exact pure-torch reference
elsewhere.  The Triton code lives in ``scan_loss_triton.py`` and ``knn_triton.py`` and is imported
only when used, so the package works where Triton is not installed.

On CUDA every Triton kernel checks itself against the torch reference the first time a process uses it, and falls
back to torch (one warning) if it is wrong or fails to compile (``_selfcheck.py``).  ``configure(self_check=False)``
or ``SCAN_DIST_KERNEL_SELF_CHECK=0`` turns that off; ``kernel_status()`` says what the checks found.
"""

from ._selfcheck import configure
from ._selfcheck import status as kernel_status
from .knn import knn, knn_faiss, knn_reference, knn_sharded, select_backend
from .scan_loss import partial_sums, scan_loss, scan_loss_reference

__all__ = [
    "configure",
    "kernel_status",
    "scan_loss",
    "scan_loss_reference",
    "partial_sums",
    "knn",
    "knn_reference",
    "knn_sharded",
    "knn_faiss",
    "select_backend",
]
