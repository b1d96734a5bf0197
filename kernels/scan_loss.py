"""SCAN clustering loss (Van Gansbeke et al., 2020), exact and in log space.

For every clustering head ``h`` with anchor logits ``a`` and neighbour logits
``n`` of shape ``[B, C]``::

    consistency_h = -mean_b log <softmax(a_b), softmax(n_b)>
    entropy_h     = -sum_c pbar_c log(max(pbar_c, eps)),  pbar = mean_b softmax(a_b)
    total_h       = consistency_h - entropy_weight * entropy_h

The dot product is evaluated as ``logsumexp_c(log_softmax(a) + log_softmax(n))``
so it stays finite and exact for logits of any magnitude (the original code
clamps the similarity and feeds it to BCE, which saturates at ``log 0``).
All arithmetic is fp32 for fp32/bf16/fp16 inputs (float64 inputs stay
float64, for gradcheck); gradients reach both inputs.

Distributed: ``scan_loss(..., process_group=g)`` makes ``pbar`` and the
consistency mean run over the *global* batch (see :func:`scan_loss`).

Backend status: two implementations of the per-rank local terms
(``consistency_sum [H]`` and ``prob_sum [H, C]``), chosen by
``scan_loss(..., backend=...)`` through :func:`._dispatch.resolve`:

* ``"triton"``: fused Triton forward/backward kernels in
  :mod:`.scan_loss_triton` (imported lazily, so the package imports without
  Triton); the default (``"auto"``) on CUDA.  On CUDA each new kernel
  specialisation is first checked against the reference on a small case, and
  a failure switches the process to the torch path with one warning
  (:mod:`._selfcheck`; off with ``configure(self_check=False)``).
* ``"torch"``: :func:`_local_terms_torch`, the exact reference; the default on
  CPU, and always used for float64 inputs (gradcheck), whatever ``backend`` says.

The distributed all-reduce and :func:`_finish` (entropy, means) are shared, so
``process_group`` works the same with both.  :func:`scan_loss_reference` and
:func:`partial_sums` are torch only: the former is the reference by
definition, and the latter (anchors only, a monitoring helper outside the
training step) would need a separate single-input kernel for a saving that
does not matter there.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import _dispatch, _selfcheck
from ._collectives import all_reduce_sum

__all__ = ["scan_loss", "scan_loss_reference", "partial_sums"]


def _check_logits(name: str, logits: Tensor) -> None:
    if not isinstance(logits, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(logits).__name__}")
    if logits.ndim != 3:
        raise ValueError(f"{name} must have shape [heads, batch, classes] (ndim 3), got shape {tuple(logits.shape)}")
    if not logits.is_floating_point():
        raise TypeError(f"{name} must be floating point, got {logits.dtype}")


def _check_inputs(anchor_logits: Tensor, neighbor_logits: Tensor | None = None) -> None:
    _check_logits("anchor_logits", anchor_logits)
    if anchor_logits.shape[2] < 1:
        raise ValueError("anchor_logits needs at least one class (shape[2] >= 1)")
    if neighbor_logits is None:
        return
    _check_logits("neighbor_logits", neighbor_logits)
    if neighbor_logits.shape != anchor_logits.shape:
        raise ValueError(
            "anchor_logits and neighbor_logits must have the same shape [heads, batch, classes], "
            f"got {tuple(anchor_logits.shape)} and {tuple(neighbor_logits.shape)}"
        )
    if neighbor_logits.device != anchor_logits.device:
        raise ValueError(
            f"anchor_logits is on {anchor_logits.device} but neighbor_logits is on {neighbor_logits.device}"
        )


def _compute_dtype(tensor: Tensor) -> torch.dtype:
    # fp32 for fp32/bf16/fp16; float64 stays float64 so gradcheck is meaningful.
    return torch.promote_types(tensor.dtype, torch.float32)


def _select_backend(backend: str, anchor_logits: Tensor, neighbor_logits: Tensor) -> str:
    """``"triton"`` or ``"torch"`` for the local terms (see the module docstring)."""
    if anchor_logits.dtype == torch.float64 or neighbor_logits.dtype == torch.float64:
        # The kernels accumulate in fp32; float64 exists for gradcheck, so it always takes the exact torch path
        # (the backend name is still validated, but "triton" does not then require Triton or a GPU).
        if backend not in _dispatch.BACKENDS:
            raise ValueError(f"scan_loss: backend must be one of {_dispatch.BACKENDS}, got {backend!r}")
        return "torch"
    return _dispatch.resolve(backend, anchor_logits, "scan_loss")


# --------------------------------------------------------------------------- #
# Pure-torch building blocks
# --------------------------------------------------------------------------- #
def _local_terms_torch(anchor_logits: Tensor, neighbor_logits: Tensor) -> tuple[Tensor, Tensor]:
    """Per-rank sums: (sum_b -log<p_b, q_b> [H], sum_b softmax(a_b) [H, C])."""
    dtype = _compute_dtype(anchor_logits)
    log_p = torch.log_softmax(anchor_logits.to(dtype), dim=-1)
    log_q = torch.log_softmax(neighbor_logits.to(dtype), dim=-1)
    # log <p, q> = logsumexp(log p + log q): no underflow to log(0) even when the
    # two distributions are confidently disjoint (logits of 1e4).
    log_dot = torch.logsumexp(log_p + log_q, dim=-1)  # [H, B]
    consistency_sum = -log_dot.sum(dim=-1)  # [H]
    prob_sum = log_p.exp().sum(dim=1)  # [H, C]
    return consistency_sum, prob_sum


def _local_terms_triton(anchor_logits: Tensor, neighbor_logits: Tensor) -> tuple[Tensor, Tensor]:
    """The Triton local terms behind the first-use self-check and the fallback guard (``_selfcheck``): the torch
    reference when the kernels failed on this device in this process."""
    from . import scan_loss_triton  # lazy: Triton is optional

    device = anchor_logits.device
    key = scan_loss_triton.check_key(anchor_logits, neighbor_logits)
    if not _selfcheck.ensure("scan_loss", device, key,
                             lambda: scan_loss_triton.self_check(anchor_logits, neighbor_logits)):
        return _local_terms_torch(anchor_logits, neighbor_logits)
    guarded = _selfcheck.applies(device)
    try:
        return scan_loss_triton.local_terms(anchor_logits, neighbor_logits, guarded=guarded)
    except Exception as exc:  # noqa: BLE001 - any kernel failure falls back while the guard is on
        if not guarded or _selfcheck.is_oom(exc):
            raise
        _selfcheck.fail("scan_loss", device, exc)
        return _local_terms_torch(anchor_logits, neighbor_logits)


def _finish(consistency_sum: Tensor, prob_sum: Tensor, count: Tensor | float, entropy_weight: float,
            eps: float) -> tuple[Tensor, Tensor, Tensor]:
    consistency = consistency_sum / count
    pbar = prob_sum / count
    # Clamp only inside the log (as the paper's 1e-8): an empty cluster then
    # contributes 0 instead of 0 * -inf = NaN, and pbar itself stays unbiased.
    entropy = -(pbar * torch.log(pbar.clamp_min(eps))).sum(dim=-1)
    total = consistency - float(entropy_weight) * entropy
    return total, consistency, entropy


def partial_sums(anchor_logits: Tensor) -> tuple[Tensor, int]:
    """Per-rank partial sums for the entropy term.

    Returns ``(prob_sum, count)``: ``prob_sum[h, c] = sum_b softmax(anchor_logits[h, b])[c]``
    in fp32 (float64 for float64 input; differentiable) and ``count = B``.  Summing both over ranks and
    dividing gives the global ``pbar``; the engine can use this to build its own
    reductions (e.g. for monitoring cluster sizes).
    """
    _check_inputs(anchor_logits)
    prob_sum = torch.softmax(anchor_logits.to(_compute_dtype(anchor_logits)), dim=-1).sum(dim=1)
    return prob_sum, int(anchor_logits.shape[1])


def scan_loss_reference(anchor_logits: Tensor, neighbor_logits: Tensor, entropy_weight: float,
                        eps: float = 1e-8) -> tuple[Tensor, Tensor, Tensor]:
    """Single-process SCAN loss, plain torch, log space.

    Returns ``(total, consistency, entropy)``, each ``[H]`` fp32 (float64 for float64 inputs).
    """
    _check_inputs(anchor_logits, neighbor_logits)
    batch = anchor_logits.shape[1]
    if batch == 0:
        raise ValueError("scan_loss needs a non-empty batch (anchor_logits.shape[1] == 0)")
    consistency_sum, prob_sum = _local_terms_torch(anchor_logits, neighbor_logits)
    return _finish(consistency_sum, prob_sum, float(batch), entropy_weight, eps)


# --------------------------------------------------------------------------- #
# Distributed reduction
# --------------------------------------------------------------------------- #
def _dist_active(process_group) -> bool:
    if process_group is None:
        return False
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("scan_loss got a process_group but torch.distributed is not initialised")
    return dist.get_world_size(process_group) > 1


def scan_loss(anchor_logits: Tensor, neighbor_logits: Tensor, entropy_weight: float, process_group=None,
              eps: float = 1e-8, *, backend: str = "auto") -> tuple[Tensor, Tensor, Tensor]:
    """SCAN loss per head.

    Args:
        anchor_logits, neighbor_logits: ``[H, B, C]`` logits (fp32/bf16/fp16).
        entropy_weight: weight of the entropy term (the paper uses 5.0).
        process_group: ``None`` for a single process.  When a group object is
            passed (and its world size is > 1) the class-probability sum, the
            sum of per-sample consistency terms and the batch size are summed
            over the group in one differentiable all-reduce
            (:func:`._collectives.all_reduce_sum`, whose backward sums over
            ranks), so ``pbar`` and the consistency mean are over the global
            batch.  Every rank returns the global loss; back-propagated on W
            ranks, each rank gets W x the single-process gradient w.r.t. its
            rows, and a DDP gradient *average* over ranks gives exactly the
            single-process parameter gradient (the project's one rule, see
            :mod:`._collectives`).  Local batches may differ in size (even be
            empty) as long as the global batch is non-empty.
        eps: clamp for ``pbar`` inside the entropy's log.
        backend: ``"auto"`` (Triton on CUDA, torch otherwise), ``"triton"`` or
            ``"torch"``; see :mod:`._dispatch`.  Selects only how the per-rank
            sums are computed; float64 inputs always use torch.

    Returns:
        ``(total, consistency, entropy)``, each ``[H]`` fp32 (float64 for float64 inputs).
    """
    _check_inputs(anchor_logits, neighbor_logits)
    distributed = _dist_active(process_group)
    batch = anchor_logits.shape[1]
    if batch == 0 and not distributed:
        raise ValueError("scan_loss needs a non-empty batch (anchor_logits.shape[1] == 0)")

    if _select_backend(backend, anchor_logits, neighbor_logits) == "triton":
        consistency_sum, prob_sum = _local_terms_triton(anchor_logits, neighbor_logits)
    else:
        consistency_sum, prob_sum = _local_terms_torch(anchor_logits, neighbor_logits)

    if not distributed:
        return _finish(consistency_sum, prob_sum, float(batch), entropy_weight, eps)

    heads, classes = prob_sum.shape
    # One collective for everything: [prob_sum (H*C) | consistency_sum (H) | count (1)].
    # The count travels as fp32 (exact up to 2**24 samples) and carries no gradient.
    count = torch.full((1,), float(batch), dtype=prob_sum.dtype, device=prob_sum.device)
    packed = torch.cat([prob_sum.reshape(-1), consistency_sum, count])
    reduced = all_reduce_sum(packed, process_group)
    g_prob_sum = reduced[: heads * classes].view(heads, classes)
    g_consistency_sum = reduced[heads * classes: heads * classes + heads]
    g_count = reduced[-1].detach()
    # Only a rank with an empty local batch can see an empty global one; testing
    # `batch == 0` first keeps the common path free of a device->host sync.
    if batch == 0 and float(g_count) <= 0:
        raise ValueError("scan_loss needs a non-empty global batch")
    return _finish(g_consistency_sum, g_prob_sum, g_count, entropy_weight, eps)
