"""Compute kernels for scan_dist: the SCAN loss and exact k-NN mining.

Installed as ``scan_dist.kernels``.  Everything here is currently pure torch
(exact, fp32); Triton kernels are pending and will slot in behind the same
public functions.
"""

from .knn import knn, knn_faiss, knn_reference, knn_sharded, select_backend
from .scan_loss import partial_sums, scan_loss, scan_loss_reference

__all__ = [
    "scan_loss",
    "scan_loss_reference",
    "partial_sums",
    "knn",
    "knn_reference",
    "knn_sharded",
    "knn_faiss",
    "select_backend",
]
