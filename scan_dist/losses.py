"""Training losses: SimCLR's NT-Xent, the SCAN loss (through scan_dist.kernels) and confidence-based self-label CE.

Each loss has one definition for one process and for N: given the process group (or a gather function), every
rank's value is its share of the global-batch loss, so gradients equal the single-process ones. How each share is
scaled for a data-parallel gradient average is stated per loss (the `scale` the stage passes to Engine.backward).
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F

from .kernels import scan_loss


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float,
            gather: Callable[[torch.Tensor], torch.Tensor] | None = None, rank: int = 0) -> torch.Tensor:
    """Symmetric NT-Xent over 2B L2-normalised embeddings: each view's positive is the other view of its image.

    Distributed: `gather` all-gathers rows *with gradient* (Engine.all_gather(grad=True)) and `rank` places this
    rank's rows; every rank then scores its 2b anchors against all 2B global candidates (negatives from the whole
    global batch) and returns the mean over its anchors. The mean of these over ranks is the global loss, which is
    what a DDP gradient average yields: scale 1.
    """
    batch = z1.shape[0]
    if gather is None:
        all_z1, all_z2, offset = z1, z2, 0
    else:
        all_z1, all_z2, offset = gather(z1), gather(z2), rank * batch
    global_batch = all_z1.shape[0]
    anchors = torch.cat([z1, z2], dim=0).float()
    candidates = torch.cat([all_z1, all_z2], dim=0).float()
    logits = anchors @ candidates.t() / temperature
    local = torch.arange(batch, device=logits.device) + offset
    own = torch.cat([local, local + global_batch])  # where each anchor sits among the candidates
    positives = torch.cat([local + global_batch, local])
    rows = torch.arange(2 * batch, device=logits.device)
    self_mask = torch.zeros_like(logits, dtype=torch.bool)
    self_mask[rows, own] = True  # a view is never its own negative
    return F.cross_entropy(logits.masked_fill(self_mask, float("-inf")), positives)


def scan_objective(anchor_logits: torch.Tensor, neighbor_logits: torch.Tensor, entropy_weight: float,
                   process_group=None, backend: str = "auto"):
    """Per-head SCAN loss; the heads' totals are summed for back-propagation, as in the paper.

    With a process group every rank returns the *global* loss (pbar over the global batch); its gradient w.r.t. the
    local rows is exact, so a DDP gradient average needs scale = world size.
    """
    total, consistency, entropy = scan_loss(anchor_logits, neighbor_logits, entropy_weight,
                                            process_group=process_group, backend=backend)
    return total.sum(), total.detach(), consistency.detach(), entropy.detach()


def confident_targets(weak_logits: torch.Tensor, threshold: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(mask, pseudo-labels): samples whose max softmax probability exceeds the threshold, and their argmax."""
    probs = weak_logits.float().softmax(dim=1)
    confidence, labels = probs.max(dim=1)
    return confidence > threshold, labels


def self_label_loss(strong_logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor,
                    class_balance: bool, process_group=None) -> torch.Tensor | None:
    """Cross-entropy on the confident samples only; class balancing averages the CE per pseudo-class.

    Returns None when the (global) batch holds no confident sample: every rank then skips the step together.
    With a process group the per-class counts are global and each rank returns its share of the global loss
    (the shares sum to it), so a DDP gradient average needs scale = world size.
    """
    num_classes = strong_logits.shape[1]
    per_sample = F.cross_entropy(strong_logits[mask].float(), labels[mask], reduction="none")
    targets = labels[mask]
    counts = torch.bincount(targets, minlength=num_classes).float()
    if process_group is not None:
        dist.all_reduce(counts, group=process_group)
    if not bool(counts.sum() > 0):
        return None
    # Keeps the graph connected on a rank without confident samples (DDP needs every rank's backward).
    connect = 0.0 * strong_logits.sum()
    if not class_balance:
        return per_sample.sum() / counts.sum() + connect
    per_class_sum = torch.zeros(num_classes, device=per_sample.device).index_add_(0, targets, per_sample)
    present = counts > 0
    return (per_class_sum[present] / counts[present]).sum() / present.sum() + connect
