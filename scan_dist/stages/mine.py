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
from .common import infer, load_rows


# The pixel PCA is fitted on at most this many evenly spaced training images, and on at most PCA_FIT_BYTES of
# float32 pixels (ImageNet-size inputs hold 150k values per image: ~3,500 images then). Projection covers them all.
PCA_MAX_IMAGES = 65536
PCA_FIT_BYTES = 2 << 30


def fit_pixel_pca(flat: torch.Tensor, dims: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean [1, P], basis [P, dims]) of flattened pixels in [0, 1]."""
    mean = flat.mean(dim=0, keepdim=True)
    generator_state = torch.get_rng_state()
    torch.manual_seed(seed)  # pca_lowrank is randomised
    try:
        _, _, basis = torch.pca_lowrank(flat - mean, q=dims, center=False, niter=4)
    finally:
        torch.set_rng_state(generator_state)
    return mean, basis


def pixel_pca(cfg, ctx) -> tuple[torch.Tensor, torch.Tensor]:
    """Fit the pixel PCA on a bounded, evenly spaced sample of the training images (rank 0; broadcast)."""
    reader = ctx.train_set
    channels, height, width = ctx.pixel_shape
    pixels = channels * height * width
    count = min(len(reader), PCA_MAX_IMAGES, max(4 * ctx.pca_dims, PCA_FIT_BYTES // (4 * pixels)))
    if not comm.is_main():
        return comm.broadcast_object(None)
    rows = np.unique(np.linspace(0, len(reader) - 1, num=count).astype(np.int64))
    source = ctx.inference_batches("train")
    mean, std = (torch.tensor(v).view(1, -1, 1, 1) for v in ctx.normalization)
    chunks = [(source.build_now(rows[i:i + 4096])["views"][0].cpu().float() * std + mean).flatten(1)
              for i in range(0, len(rows), 4096)]
    source.close()
    return comm.broadcast_object(fit_pixel_pca(torch.cat(chunks), ctx.pca_dims, cfg.run.seed))


def search_space(cfg, ctx) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, eval) vectors, L2-normalised, in the space named by mine.features."""
    parts_train, parts_eval = [], []
    if cfg.mine.features in ("pretext", "both"):
        parts_train.append(load_rows(np.load(ctx.run_dir / "embed" / "train.npy", mmap_mode="r")))
        parts_eval.append(load_rows(np.load(ctx.run_dir / "embed" / "eval.npy", mmap_mode="r")))
    if cfg.mine.features in ("pixels", "both"):
        pca_mean, basis = pixel_pca(cfg, ctx)
        if ctx.is_main:  # read by scan.features=mined
            save_torch(ctx.stage_dir("mine") / "pca.pt", {"mean": pca_mean, "basis": basis})
        mean, std = ctx.normalization
        projector = PixelProjection(pca_mean, basis, mean, std).to(ctx.device)
        for split, parts in (("train", parts_train), ("eval", parts_eval)):
            parts.append(load_rows(infer(ctx, projector, split, desc=f"pixel PCA {split}",
                                         out_path=ctx.stage_dir("mine") / f"{split}_pixel_pca.npy")))
    train = torch.cat([F.normalize(p.float(), dim=1) for p in parts_train], dim=1)
    evals = torch.cat([F.normalize(p.float(), dim=1) for p in parts_eval], dim=1)
    return F.normalize(train, dim=1), F.normalize(evals, dim=1)


class PixelProjection(torch.nn.Module):
    """Normalised images -> PCA coordinates of their [0, 1] pixels."""

    def __init__(self, pca_mean, basis, mean, std):
        super().__init__()
        self.register_buffer("pca_mean", pca_mean.reshape(1, -1))
        self.register_buffer("basis", basis)
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return ((images.float() * self.std + self.mean).flatten(1) - self.pca_mean) @ self.basis


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
