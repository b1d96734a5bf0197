"""Per-epoch health of the cluster heads, without labels (and with them only when run.monitor_labels=true).

At the end of each SCAN and self-labelling epoch the stage predicts a fixed, evenly spaced sample of at most
`DIAG_ROWS` training images and their first `DIAG_NEIGHBORS` mined neighbours, and adds to the epoch's history point:

* `min_share` / `max_share`: the smallest and largest cluster's share of the sample (mean over heads) -- a
  collapsing head shows a max share near 1, dead clusters a min share of 0;
* `confidence`: the mean max probability;
* `neighbor_agreement`: how often an image and a neighbour land in the same cluster (what SCAN's consistency term
  pushes up);
* `head_agreement`: the mean pairwise NMI between heads (at most `DIAG_HEADS` of them): heads on one shared backbone
  agree, heads on frozen features go their own ways, and label-free selection only matters in the second case.

With `run.monitor_labels=true`, also `acc_best`, `acc_mean` and `nmi_best` over the heads, against the training
labels of the same sample, as the paper's code prints them each epoch. The pass runs with gradients off, in eval
mode (the model's mode is restored afterwards), draws no random number and touches no optimiser state, so training
is bit-identical with or without it (tested).
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch

DIAG_ROWS = 1024
DIAG_NEIGHBORS = 3
DIAG_HEADS = 10


def sample_rows(num_items: int) -> np.ndarray:
    return np.unique(np.linspace(0, num_items - 1, num=min(num_items, DIAG_ROWS)).astype(np.int64))


@torch.no_grad()
def head_diagnostics(logits_fn: Callable[[np.ndarray], torch.Tensor], rows: np.ndarray, neighbors: np.ndarray | None,
                     targets: np.ndarray | None, model: torch.nn.Module | None = None) -> dict:
    """`logits_fn(rows) -> [H, n, C]` logits of these training rows; returns the diagnostics above."""
    from sklearn.metrics import normalized_mutual_info_score

    from .metrics import cluster_metrics

    was_training = model.training if model is not None else None
    if model is not None:
        model.eval()
    try:
        logits = logits_fn(rows).float()
        probs = logits.softmax(dim=-1)
        predictions = probs.argmax(dim=-1).cpu().numpy()  # [H, n]
        out: dict = {"confidence": float(probs.max(dim=-1).values.mean())}
        heads, n, classes = probs.shape
        shares = np.stack([np.bincount(p, minlength=classes) / n for p in predictions])
        out["min_share"] = float(shares.min(axis=1).mean())
        out["max_share"] = float(shares.max(axis=1).mean())
        if neighbors is not None and neighbors.shape[1] > 0:
            partners = np.asarray(neighbors[rows][:, :DIAG_NEIGHBORS])
            partner_predictions = logits_fn(partners.reshape(-1)).float().argmax(dim=-1).cpu().numpy()
            same = predictions[:, :, None] == partner_predictions.reshape(heads, n, -1)
            out["neighbor_agreement"] = float(same.mean())
        if heads > 1:
            picked = predictions[:DIAG_HEADS]
            pairs = [normalized_mutual_info_score(picked[a], picked[b])
                     for a in range(len(picked)) for b in range(a + 1, len(picked))]
            out["head_agreement"] = float(np.mean(pairs))
        if targets is not None:
            labelled = targets[rows] >= 0
            if labelled.any():
                scores = [cluster_metrics(targets[rows][labelled], p[labelled]) for p in predictions]
                out["acc_best"] = max(s["acc"] for s in scores)
                out["acc_mean"] = float(np.mean([s["acc"] for s in scores]))
                out["nmi_best"] = max(s["nmi"] for s in scores)
        return out
    finally:
        if model is not None and was_training:
            model.train()
