"""Stage 3, mine: the k nearest neighbours (cosine, exact) of every image, within the training set.

Neighbours of the evaluation images among themselves are mined too: they serve only to select the best cluster
head by its SCAN loss, never with labels. The search space is the pretext embedding, a PCA of the pixels, or both
(concatenated, each half L2-normalised, so the cosine is the mean of the two cosines; `mine.pixel_weight` w
weighs them 1 : w^2). With `mine.mutual` the training lists keep only mutual neighbours (`keep_mutual`).
"""
from __future__ import annotations

import numpy as np
import torch

from .. import kernels
from ..distributed import comm
from ..distributed.shared_rows import SharedRows
from ..io_utils import save_torch
from ..metrics import neighbor_agreement
from ..models.mined_space import MinedSpace, join, part_weights
from .common import infer, load_rows


# The pixel PCA is fitted on at most this many evenly spaced training images, and on at most PCA_FIT_BYTES of
# float32 pixels (ImageNet-size inputs hold 150k values per image: ~890 images then; Fashion-MNIST: all 60k).
# The projection covers every image.
PCA_MAX_IMAGES = 65536
PCA_FIT_BYTES = 512 << 20


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
    step = max(1, (64 << 20) // (4 * pixels))  # ~64 MB of pixels per chunk
    chunks = [(source.build_now(rows[i:i + step])["views"][0].cpu().float() * std + mean).flatten(1)
              for i in range(0, len(rows), step)]
    source.close()
    return comm.broadcast_object(fit_pixel_pca(torch.cat(chunks), ctx.pca_dims, cfg.run.seed))


def search_space(cfg, ctx) -> dict[str, np.ndarray]:
    """{"train", "eval"}: the vectors in the space named by mine.features (each part L2-normalised, concatenated,
    normalised again), written row-sharded by all ranks to mine/<split>_space.npy and memory-mapped: at ImageNet
    scale (1.28M x 2048 fp32 = 10.5 GB) no rank holds a private copy; the ranks of a node share the page cache."""
    parts = {"train": [], "eval": []}
    if cfg.mine.features in ("pretext", "both"):
        for split in parts:
            parts[split].append(np.load(ctx.run_dir / "embed" / f"{split}.npy", mmap_mode="r"))
    if cfg.mine.features in ("pixels", "both"):
        pca_mean, basis = pixel_pca(cfg, ctx)
        if ctx.is_main:  # read by scan.features=mined
            save_torch(ctx.stage_dir("mine") / "pca.pt", {"mean": pca_mean, "basis": basis})
        # The pixel half of the mined space, as scan.features=mined will read it (normalised, scaled: the scale
        # disappears in the normalisation below).
        projector = MinedSpace(None, cfg.mine.layer, ctx.pixel_shape, ctx.pca_dims, cfg.mine.grid)
        projector.set_pca(pca_mean, basis, *ctx.normalization)
        projector = projector.to(ctx.device).eval()
        for split in parts:
            parts[split].append(infer(ctx, projector, split, desc=f"pixel PCA {split}", stage="mine",
                                      out_path=ctx.stage_dir("mine") / f"{split}_pixel_pca.npy"))
    weights = part_weights(cfg.mine.features in ("pretext", "both"), cfg.mine.features in ("pixels", "both"),
                           cfg.mine.pixel_weight)
    spaces = {}
    for split, arrays in parts.items():
        num, dim = len(arrays[0]), sum(a.shape[1] for a in arrays)
        out = SharedRows(ctx.stage_dir("mine") / f"{split}_space.npy", num, (dim,), np.float32)
        start, stop = comm.shard_range(num)
        for first in range(start, stop, SPACE_CHUNK):
            rows = slice(first, min(first + SPACE_CHUNK, stop))
            out.write(first, join([load_rows(a, rows) for a in arrays], weights).numpy())
        out.close()
        spaces[split] = np.load(ctx.stage_dir("mine") / f"{split}_space.npy", mmap_mode="c")  # shared until written
    return spaces


SPACE_CHUNK = 65536  # rows normalised at a time


def drop_self(index: torch.Tensor, k: int, first: int = 0) -> torch.Tensor:
    """From top-(k+1) lists of rows first, first+1, ..., remove each row's own index (wherever duplicates put it),
    else the last column."""
    rows = torch.arange(first, first + len(index)).unsqueeze(1)
    is_self = index == rows
    has_self = is_self.any(dim=1)
    is_self[~has_self, -1] = True
    keep = ~is_self
    # exactly one column is removed per row, so the kept entries reshape to [Q, k] in their original order
    return index[keep].reshape(len(index), k)


def shard_neighbors(vectors, k: int, backend: str, device, precision: str, start: int, stop: int) -> torch.Tensor:
    """k neighbours (among all rows) of rows [start, stop): int64 [stop - start, k].

    With N processes the *queries* are sharded: every rank reads the whole bank and searches its contiguous slice
    of the rows against all of it, so work and traffic per rank fall as 1/N. (Sharding the keys instead,
    kernels.knn_sharded, gives every rank all queries and gathers N candidate lists per query: right only for a
    bank too large for one device.)
    """
    k = min(k, len(vectors) - 1)
    chosen = kernels.select_backend(backend, device)
    vectors = torch.as_tensor(vectors)
    if chosen == "faiss":
        _, index = kernels.knn_faiss(vectors[start:stop], vectors, k + 1, metric="ip")
    else:
        bank = vectors.to(device)
        _, index = kernels.knn(bank[start:stop], bank, k + 1, metric="ip", backend=chosen, precision=precision)
    return drop_self(index.cpu(), k, first=start)


def find_neighbors(vectors, k: int, backend: str, device, precision: str = "fp32") -> torch.Tensor:
    """k neighbours of every row among the others, this rank's shard searched and all shards gathered."""
    start, stop = comm.shard_range(len(vectors))
    return comm.gather_rows(shard_neighbors(vectors, k, backend, device, precision, start, stop))


def mine_split(cfg, ctx, vectors, k: int, path) -> np.ndarray:
    """Neighbours of every row of `vectors`, written row-sharded to `path` (the stage's artifact) and mapped."""
    k = min(k, len(vectors) - 1)
    start, stop = comm.shard_range(len(vectors))
    out = SharedRows(path, len(vectors), (k,), np.int64)
    out.write(start, shard_neighbors(vectors, k, cfg.mine.backend, ctx.device, cfg.mine.precision, start,
                                     stop).numpy())
    return out.close()


MUTUAL_CHUNK = 16384  # anchor rows filtered at a time: their neighbours' lists are [chunk, k, k] int64 (51 MB at k=20)


def keep_mutual(neighbors: np.ndarray, start: int, stop: int,
                chunk: int = MUTUAL_CHUNK) -> tuple[np.ndarray, int, int]:
    """(rows [start, stop) of the mutual lists, their number of mutual pairs, their number of rows without one)
    from k-NN lists [N, k].

    Neighbour j of i is mutual when i is among j's k neighbours too. A row keeps its k columns: its mutual
    neighbours in their rank order, repeated cyclically to fill the row, so sampling a column uniformly samples
    them uniformly to within one repeat (the nearer ones take the k mod m extra columns); a row without any
    mutual neighbour keeps its list. Reads the neighbours' rows chunk by chunk: memory does not grow with N.
    """
    k = neighbors.shape[1]
    out = np.empty((stop - start, k), dtype=np.int64)
    pairs = lonely = 0
    for first in range(start, stop, chunk):
        last = min(first + chunk, stop)
        lists = np.asarray(neighbors[first:last], dtype=np.int64)
        back = np.asarray(neighbors[lists.reshape(-1)], dtype=np.int64).reshape(len(lists), k, k)
        mutual = (back == np.arange(first, last)[:, None, None]).any(axis=2)
        count = mutual.sum(axis=1)
        pairs, lonely = pairs + int(count.sum()), lonely + int((count == 0).sum())
        mutual_first = np.take_along_axis(lists, np.argsort(~mutual, axis=1, kind="stable"), axis=1)
        cycled = np.take_along_axis(mutual_first, np.arange(k)[None, :] % np.maximum(count, 1)[:, None], axis=1)
        out[first - start:last - start] = np.where((count == 0)[:, None], lists, cycled)
    return out, pairs, lonely


def mutual_split(neighbors: np.ndarray, path_out) -> tuple[np.ndarray, float, float]:
    """The mutual lists of the k-NN lists `neighbors` (every rank's map of them), written row-sharded to `path_out`
    and mapped; with the share of pairs that are mutual and of rows that have none (both over all ranks)."""
    start, stop = comm.shard_range(len(neighbors))
    out = SharedRows(path_out, len(neighbors), (neighbors.shape[1],), np.int64)
    rows, pairs, lonely = keep_mutual(neighbors, start, stop)
    out.write(start, rows)
    pairs, lonely = np.sum(comm.all_gather_object((pairs, lonely)), axis=0)
    return out.close(), float(pairs / neighbors.size), float(lonely / len(neighbors))


def run(cfg, ctx, config_hash: str) -> dict:
    spaces = search_space(cfg, ctx)
    out_dir = ctx.stage_dir("mine")
    knn_path = out_dir / ("train_knn.npy" if cfg.mine.mutual else "train_neighbors.npy")
    train_nn = mine_split(cfg, ctx, spaces["train"], cfg.mine.k, knn_path)
    eval_nn = mine_split(cfg, ctx, spaces["eval"], cfg.mine.eval_k, out_dir / "eval_neighbors.npy")
    metrics = {"k": int(train_nn.shape[1])}
    if cfg.mine.mutual:
        knn = train_nn
        train_nn, metrics["mutual_pair_share"], metrics["rows_without_mutual"] = mutual_split(
            knn, out_dir / "train_neighbors.npy")
        ctx.log.info("mine: %.1f%% of the %d-NN pairs are mutual; %.2f%% of the images have none (their lists kept)",
                     100 * metrics["mutual_pair_share"], train_nn.shape[1], 100 * metrics["rows_without_mutual"])
    # Diagnostic only (never used by any later stage): how often neighbours share the label.
    if ctx.train_set.targets is not None:
        metrics["train_neighbor_agreement"] = neighbor_agreement(ctx.train_set.targets, np.asarray(train_nn))
        ctx.log.info("mine: %d-NN label agreement on train (diagnostic) %.4f", train_nn.shape[1],
                     metrics["train_neighbor_agreement"])
        if cfg.mine.mutual:
            metrics["train_knn_agreement"] = neighbor_agreement(ctx.train_set.targets, np.asarray(knn))
    if ctx.eval_set.targets is not None:
        metrics["eval_neighbor_agreement"] = neighbor_agreement(ctx.eval_set.targets, np.asarray(eval_nn))
    return {"artifacts": {"train_neighbors": str(out_dir / "train_neighbors.npy"),
                          "eval_neighbors": str(out_dir / "eval_neighbors.npy")}, "metrics": metrics}
