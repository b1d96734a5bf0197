"""Training losses: SimCLR's NT-Xent, the SCAN loss (through scan_dist.kernels) and confidence-based self-label CE."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .kernels import scan_loss


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> torch.Tensor:
    """Symmetric NT-Xent over 2B L2-normalised embeddings: each view's positive is the other view of its image."""
    batch = z1.shape[0]
    z = torch.cat([z1, z2], dim=0).float()
    logits = z @ z.t() / temperature
    logits.fill_diagonal_(float("-inf"))  # a view is never its own negative
    positives = torch.cat([torch.arange(batch, 2 * batch), torch.arange(0, batch)]).to(z.device)
    return F.cross_entropy(logits, positives)


def scan_objective(anchor_logits: torch.Tensor, neighbor_logits: torch.Tensor, entropy_weight: float):
    """Per-head SCAN loss; the heads' totals are summed for back-propagation, as in the paper."""
    total, consistency, entropy = scan_loss(anchor_logits, neighbor_logits, entropy_weight)
    return total.sum(), total.detach(), consistency.detach(), entropy.detach()


def confident_targets(weak_logits: torch.Tensor, threshold: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(mask, pseudo-labels): samples whose max softmax probability exceeds the threshold, and their argmax."""
    probs = weak_logits.float().softmax(dim=1)
    confidence, labels = probs.max(dim=1)
    return confidence > threshold, labels


def self_label_loss(strong_logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor,
                    class_balance: bool) -> torch.Tensor | None:
    """Cross-entropy on the confident samples only; class balancing averages the CE per pseudo-class.

    Returns None when the batch holds no confident sample (the step is skipped rather than failing).
    """
    if not bool(mask.any()):
        return None
    logits, targets = strong_logits[mask].float(), labels[mask]
    per_sample = F.cross_entropy(logits, targets, reduction="none")
    if not class_balance:
        return per_sample.mean()
    classes, inverse = torch.unique(targets, return_inverse=True)
    per_class_sum = torch.zeros(len(classes), device=logits.device).index_add_(0, inverse, per_sample)
    per_class_count = torch.bincount(inverse, minlength=len(classes)).float()
    return (per_class_sum / per_class_count).mean()
