"""Stage 3, mine: the k nearest neighbours (cosine, exact) of every image, within the training set.

Neighbours of the evaluation images among themselves are mined too: they serve only to select the best cluster
head by its SCAN loss, never with labels. The search space is the pretext embedding, a PCA of the pixels, or both
(concatenated, each half L2-normalised, so the cosine is the mean of the two cosines).
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from .. import kernels
from ..dist import comm
from ..io_utils import save_numpy, save_torch
from ..metrics import neighbor_agreement


def fit_pixel_pca(train_images: torch.Tensor, dims: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean [1, P], basis [P, dims]) of the flattened training pixels in [0, 1]."""
    flat = train_images.reshape(len(train_images), -1).float() / 255.0
    mean = flat.mean(dim=0, keepdim=True)
    torch.manual_seed(seed)  # pca_lowrank is randomised
    _, _, basis = torch.pca_lowrank(flat - mean, q=dims, center=False, niter=4)
    return mean, basis


def project_pixels(images: torch.Tensor, mean: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    return ((images.reshape(len(images), -1).float() / 255.0) - mean) @ basis


def search_space(cfg, ctx) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, eval) vectors, L2-normalised, in the space named by mine.features."""
    parts_train, parts_eval = [], []
    if cfg.mine.features in ("pretext", "both"):
        parts_train.append(torch.from_numpy(np.load(ctx.run_dir / "embed" / "train.npy")))
        parts_eval.append(torch.from_numpy(np.load(ctx.run_dir / "embed" / "eval.npy")))
    if cfg.mine.features in ("pixels", "both"):
        mean, basis = fit_pixel_pca(ctx.train_set.images, ctx.pca_dims, cfg.run.seed)
        if ctx.is_main:  # read by scan.features=mined
            save_torch(ctx.stage_dir("mine") / "pca.pt", {"mean": mean, "basis": basis})
        for images, parts in ((ctx.train_set.images, parts_train), (ctx.eval_set.images, parts_eval)):
            parts.append(project_pixels(images, mean, basis))
    train = torch.cat([F.normalize(p.float(), dim=1) for p in parts_train], dim=1)
    evals = torch.cat([F.normalize(p.float(), dim=1) for p in parts_eval], dim=1)
    return F.normalize(train, dim=1), F.normalize(evals, dim=1)


def drop_self(index: torch.Tensor, k: int) -> torch.Tensor:
    """From top-(k+1) lists, remove each row's own index (wherever duplicates put it), else the last column."""
    rows = torch.arange(len(index)).unsqueeze(1)
    is_self = index == rows
    has_self = is_self.any(dim=1)
    is_self[~has_self, -1] = True
    keep = ~is_self
    # exactly one column is removed per row, so the kept entries reshape to [Q, k] in their original order
    return index[keep].reshape(len(index), k)


def find_neighbors(vectors: torch.Tensor, k: int, backend: str, device, precision: str = "fp32") -> torch.Tensor:
    """k neighbours of every row among the others.

    With N processes the *queries* are sharded: every rank holds the whole bank (the embed stage gathered it) and
    searches its contiguous slice of the rows against all of it; the slices are gathered. Work and traffic per rank
    then fall as 1/N. (Sharding the keys instead, kernels.knn_sharded, gives every rank all queries and gathers
    N candidate lists per query: right only for a bank too large for one device.)
    """
    k = min(k, len(vectors) - 1)
    chosen = kernels.select_backend(backend, device)
    start, stop = comm.shard_range(len(vectors))
    if chosen == "faiss":
        _, index = kernels.knn_faiss(vectors[start:stop], vectors, k + 1, metric="ip")
    else:
        bank = vectors.to(device)
        _, index = kernels.knn(bank[start:stop], bank, k + 1, metric="ip", backend=chosen, precision=precision)
    return drop_self(comm.gather_rows(index.cpu()), k)


def run(cfg, ctx, config_hash: str) -> dict:
    train, evals = search_space(cfg, ctx)
    out_dir = ctx.stage_dir("mine")
    train_nn = find_neighbors(train, cfg.mine.k, cfg.mine.backend, ctx.device, cfg.mine.precision)
    eval_nn = find_neighbors(evals, cfg.mine.eval_k, cfg.mine.backend, ctx.device, cfg.mine.precision)
    if ctx.is_main:
        save_numpy(out_dir / "train_neighbors.npy", train_nn.numpy())
        save_numpy(out_dir / "eval_neighbors.npy", eval_nn.numpy())
    metrics = {"k": int(train_nn.shape[1])}
    # Diagnostic only (never used by any later stage): how often neighbours share the label.
    if ctx.train_set.targets is not None:
        metrics["train_neighbor_agreement"] = neighbor_agreement(ctx.train_set.targets, train_nn.numpy())
        ctx.log.info("mine: %d-NN label agreement on train (diagnostic) %.4f", train_nn.shape[1],
                     metrics["train_neighbor_agreement"])
    if ctx.eval_set.targets is not None:
        metrics["eval_neighbor_agreement"] = neighbor_agreement(ctx.eval_set.targets, eval_nn.numpy())
    return {"artifacts": {"train_neighbors": str(out_dir / "train_neighbors.npy"),
                          "eval_neighbors": str(out_dir / "eval_neighbors.npy")}, "metrics": metrics}
