"""Exact k-nearest-neighbour search for SCAN's mining step.

``knn(queries, keys, k)`` returns, for every query, the ``k`` keys with the
highest score, as ``(scores [Q, k] fp32, index [Q, k] int64)`` sorted by score
descending.  Scores are cosine similarities (``metric="cosine"``: both sides
L2-normalised, all-zero rows stay zero and score 0 against everything) or raw
inner products (``metric="ip"``).  A query that is also a key finds itself;
callers drop that column.

Exactness and determinism:
  * fp32 throughout; the work is tiled over queries *and* keys with a running
    top-k merge, so the full ``Q x N`` matrix never exists (the default tile is
    at most 2**24 scores = 64 MB).
  * Ties are broken towards the smaller key index, i.e. results are ordered by
    the total order ``(-score, index)``.  ``torch.topk`` picks arbitrarily among
    equal values at the cut, so rows whose k-th and (k+1)-th scores are equal
    are redone with a stable sort; the running merge is a stable sort in
    which earlier (smaller-index) candidates come first.

Also here: :func:`knn_reference` (brute force, for tests), :func:`knn_faiss`
(faiss ``IndexFlatIP`` on CPU), :func:`knn_sharded` (keys split over ranks) and
:func:`select_backend`.

Backend status: two implementations behind ``knn(..., backend=...)``, chosen by
:func:`._dispatch.resolve` (``"auto"``: Triton on CUDA when it imports, torch
otherwise; ``"triton"``; ``"torch"``):

* ``"triton"``: :mod:`.knn_triton` (imported lazily, so the package imports
  without Triton), a fused score-tile + running top-k kernel; the Q x N matrix
  never exists.  ``precision="fp32"`` computes IEEE fp32 scores;
  ``precision="fp16"`` (the fast one), ``"bf16"`` or ``"tf32"`` finds
  candidates at low precision, re-ranks them in fp32 and proves per row that
  no true neighbour was missed (rows it cannot prove are redone in fp32), so
  every precision returns the exact answer.  On CPU it runs only under
  ``TRITON_INTERPRET=1`` (tests).  On CUDA each new specialisation (D, k,
  precision) is first checked on a small exact case; a failure switches the
  process to the torch path with one warning (:mod:`._selfcheck`).
* ``"torch"``: :func:`_knn_torch` below, the exact reference tiling; it always
  computes in fp32 and ignores ``precision``.

``knn_sharded`` passes ``backend``/``precision`` through to each rank's local
search.  ``select_backend`` maps the config value ``mine.backend``
(auto|torch|faiss|triton) to ``"torch"``, ``"triton"`` or ``"faiss"``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from . import _dispatch, _selfcheck

__all__ = ["knn", "knn_reference", "knn_faiss", "knn_sharded", "select_backend"]

_METRICS = ("cosine", "ip")
# One score tile holds at most this many fp32 values (64 MB).
_TILE_ELEMS = 1 << 24
_DEFAULT_KEY_CHUNK = 8192
_FAISS_HINT = "faiss is not installed; install it with `pip install faiss-cpu` (or use mine.backend=torch)"
_PRECISIONS = ("fp32", "fp16", "bf16", "tf32")


# --------------------------------------------------------------------------- #
# Validation helpers
# --------------------------------------------------------------------------- #
def _check_k(k, n_keys: int) -> int:
    if isinstance(k, bool) or not isinstance(k, int):
        raise TypeError(f"k must be an int, got {type(k).__name__}")
    if k <= 0:
        raise ValueError(f"k must be positive, got k={k}")
    if k > n_keys:
        raise ValueError(f"k={k} is larger than the number of keys N={n_keys}")
    return k


def _check_inputs(queries: Tensor, keys: Tensor, metric: str) -> None:
    for name, t in (("queries", queries), ("keys", keys)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.ndim != 2:
            raise ValueError(f"{name} must have shape [rows, dim] (ndim 2), got shape {tuple(t.shape)}")
        if not t.is_floating_point():
            raise TypeError(f"{name} must be floating point, got {t.dtype}")
    if queries.shape[1] != keys.shape[1]:
        raise ValueError(
            f"queries and keys must have the same dimension D, got {queries.shape[1]} and {keys.shape[1]}"
        )
    if queries.device != keys.device:
        raise ValueError(f"queries are on {queries.device} but keys are on {keys.device}")
    if metric not in _METRICS:
        raise ValueError(f"metric must be one of {_METRICS}, got {metric!r}")


def _check_chunk(name: str, value) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
        raise ValueError(f"{name} must be a positive int or None, got {value!r}")


def _prepare(x: Tensor, metric: str) -> Tensor:
    x = x.float()
    if metric == "cosine":
        # F.normalize divides by max(norm, 1e-12): zero rows stay zero, no NaN.
        x = F.normalize(x, p=2.0, dim=1, eps=1e-12)
    return x


# --------------------------------------------------------------------------- #
# Deterministic top-k primitives
# --------------------------------------------------------------------------- #
def _canonical_order(scores: Tensor, index: Tensor) -> tuple[Tensor, Tensor]:
    """Sort each row by (-score, index): index ascending first, then a stable score sort."""
    index, perm = torch.sort(index, dim=1, stable=True)
    scores = torch.gather(scores, 1, perm)
    scores, perm = torch.sort(scores, dim=1, descending=True, stable=True)
    return scores, torch.gather(index, 1, perm)


def _tile_topk(tile: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Top-k of each row of ``tile`` ordered by (-score, column), columns local to the tile."""
    n_cols = tile.shape[1]
    k = min(k, n_cols)
    # Ask for one extra value: topk chooses arbitrarily among values tied at the
    # cut, and a tie at the cut exists only where the (k+1)-th value equals the
    # k-th.  Those (rare) rows are redone with a stable sort; this avoids a
    # full pass over the tile to count ties.
    extra = 1 if k < n_cols else 0
    values, cols = torch.topk(tile, k + extra, dim=1, largest=True, sorted=True)
    if extra:
        tied = values[:, k] == values[:, k - 1]
        values, cols = values[:, :k], cols[:, :k]
        if bool(tied.any()):
            rows = tied.nonzero(as_tuple=True)[0]
            s_vals, s_cols = torch.sort(tile[rows], dim=1, descending=True, stable=True)
            values = values.clone()
            cols = cols.clone()
            values[rows] = s_vals[:, :k]
            cols[rows] = s_cols[:, :k]
    return _canonical_order(values, cols)


def _merge_topk(scores_a: Tensor, index_a: Tensor, scores_b: Tensor, index_b: Tensor,
                k: int) -> tuple[Tensor, Tensor]:
    """Merge two canonically ordered candidate lists where every index in ``a`` < every index in ``b``."""
    scores = torch.cat([scores_a, scores_b], dim=1)
    index = torch.cat([index_a, index_b], dim=1)
    # Stable: among equal scores the a-part (smaller indices) stays first and
    # each part keeps its ascending index order, so the result is canonical.
    scores, perm = torch.sort(scores, dim=1, descending=True, stable=True)
    index = torch.gather(index, 1, perm)
    return scores[:, :k], index[:, :k]


# --------------------------------------------------------------------------- #
# Public API
# --------------------------------------------------------------------------- #
@torch.no_grad()
def _knn_torch(queries: Tensor, keys: Tensor, k: int, metric: str, key_chunk: int,
               query_chunk: int) -> tuple[Tensor, Tensor]:
    n_queries, n_keys = queries.shape[0], keys.shape[0]
    out_scores = torch.empty((n_queries, k), dtype=torch.float32, device=queries.device)
    out_index = torch.empty((n_queries, k), dtype=torch.int64, device=queries.device)
    for q0 in range(0, n_queries, query_chunk):
        q = _prepare(queries[q0:q0 + query_chunk], metric)
        best_scores = best_index = None
        for k0 in range(0, n_keys, key_chunk):
            # Keys are prepared per tile so no full fp32/normalised copy of the
            # key bank is held; the cost is O(N*D) per query tile, small
            # next to the O(query_chunk*N*D) matmul.
            key_tile = _prepare(keys[k0:k0 + key_chunk], metric)
            tile_scores, tile_cols = _tile_topk(q @ key_tile.T, k)
            tile_index = tile_cols + k0
            if best_scores is None:
                best_scores, best_index = tile_scores, tile_index
            else:
                best_scores, best_index = _merge_topk(best_scores, best_index, tile_scores, tile_index, k)
        out_scores[q0:q0 + query_chunk] = best_scores
        out_index[q0:q0 + query_chunk] = best_index
    return out_scores, out_index


def knn(queries: Tensor, keys: Tensor, k: int, metric: str = "cosine", chunk_size: int | None = None,
        query_chunk_size: int | None = None, backend: str = "auto",
        precision: str = "fp32") -> tuple[Tensor, Tensor]:
    """Exact fp32 k-NN: ``(scores [Q, k] fp32, index [Q, k] int64)``, sorted by (-score, index).

    Args:
        queries: ``[Q, D]``; keys: ``[N, D]`` on the same device (any float dtype).
        k: ``1 <= k <= N``.
        metric: ``"cosine"`` or ``"ip"``.
        chunk_size: keys per tile (torch, default ``min(N, 8192)``) or per
            kernel launch (Triton, default: an 8 GiB prepared copy).
        query_chunk_size: queries per tile (torch default: as many as keep one
            tile at <= 2**24 scores, i.e. 64 MB; Triton: per launch).
        backend: ``"auto"`` (Triton on CUDA, else torch), ``"triton"`` or
            ``"torch"``; see :mod:`._dispatch`.
        precision: how the Triton kernel finds candidates: ``"fp32"`` (IEEE),
            ``"fp16"`` (fastest provable), ``"bf16"`` or ``"tf32"`` (re-ranked
            in fp32 and proven complete per row, so the answer is the same).
            The torch path always computes in fp32 and ignores it.
    """
    _check_inputs(queries, keys, metric)
    k = _check_k(k, keys.shape[0])
    _check_chunk("chunk_size", chunk_size)
    _check_chunk("query_chunk_size", query_chunk_size)
    if precision not in _PRECISIONS:
        raise ValueError(f"precision must be one of {_PRECISIONS}, got {precision!r}")
    if _dispatch.resolve(backend, queries, "knn") == "triton":
        found = _knn_triton_guarded(queries, keys, k, metric, chunk_size, query_chunk_size, precision)
        if found is not None:
            return found
    key_chunk = chunk_size or min(keys.shape[0], _DEFAULT_KEY_CHUNK)
    query_chunk = query_chunk_size or max(1, _TILE_ELEMS // key_chunk)
    return _knn_torch(queries, keys, k, metric, key_chunk, query_chunk)


def _knn_triton_guarded(queries: Tensor, keys: Tensor, k: int, metric: str, chunk_size: int | None,
                        query_chunk_size: int | None, precision: str) -> tuple[Tensor, Tensor] | None:
    """The Triton search behind the first-use self-check and the fallback guard (``_selfcheck``); None means the
    kernel failed on this device in this process: the caller takes the torch path."""
    from . import knn_triton as kt  # noqa: PLC0415 - lazy: the package imports without Triton

    device = queries.device
    if not _selfcheck.ensure("knn", device, kt.check_key(keys.shape[1], k, precision),
                             lambda: kt.self_check(keys.shape[1], k, precision, device)):
        return None
    try:
        return kt.knn_triton(queries, keys, k, metric=metric, chunk_size=chunk_size,
                             query_chunk_size=query_chunk_size, precision=precision)
    except Exception as exc:  # noqa: BLE001 - any kernel failure falls back while the guard is on
        if not _selfcheck.applies(device) or _selfcheck.is_oom(exc):
            raise
        _selfcheck.fail("knn", device, exc)
        return None


def knn_reference(queries: Tensor, keys: Tensor, k: int, metric: str = "cosine") -> tuple[Tensor, Tensor]:
    """Brute force: the full ``Q x N`` score matrix and a stable sort.  For tests only."""
    _check_inputs(queries, keys, metric)
    k = _check_k(k, keys.shape[0])
    with torch.no_grad():
        scores = _prepare(queries, metric) @ _prepare(keys, metric).T
    scores, index = torch.sort(scores, dim=1, descending=True, stable=True)
    return scores[:, :k].contiguous(), index[:, :k].contiguous()


def _import_faiss():
    try:
        import faiss  # noqa: PLC0415 - optional dependency, imported lazily
    except ImportError as exc:
        raise ImportError(_FAISS_HINT) from exc
    return faiss


def knn_faiss(queries: Tensor, keys: Tensor, k: int, metric: str = "cosine") -> tuple[Tensor, Tensor]:
    """k-NN with faiss ``IndexFlatIP`` on CPU (exact).  Results come back on the queries' device.

    The returned rows are put in (-score, index) order, but which of several
    keys tied at the k-th score faiss keeps is faiss's choice.
    """
    _check_inputs(queries, keys, metric)
    k = _check_k(k, keys.shape[0])
    faiss = _import_faiss()
    q = _prepare(queries, metric).detach().cpu().contiguous().numpy()
    x = _prepare(keys, metric).detach().cpu().contiguous().numpy()
    index = faiss.IndexFlatIP(x.shape[1])
    index.add(x)
    dist_np, idx_np = index.search(q, k)
    scores = torch.from_numpy(dist_np).float()
    idx = torch.from_numpy(idx_np).long()
    scores, idx = _canonical_order(scores, idx)
    return scores.to(queries.device), idx.to(queries.device)


def knn_sharded(queries: Tensor, local_keys: Tensor, k: int, group=None, key_offset: int | None = None,
                metric: str = "cosine", chunk_size: int | None = None, backend: str = "auto",
                precision: str = "fp32") -> tuple[Tensor, Tensor]:
    """k-NN against keys split over the ranks of ``group``.

    Every rank must pass the *same* ``queries``; rank ``r`` holds a contiguous
    slice of the key bank, slices in rank order.  Each rank searches its slice
    with global indices (``key_offset`` = number of keys on lower ranks, found
    by an all-gather of the slice sizes when ``None``), then all ranks
    all-gather the candidates and merge them, so every rank returns the global
    ``(scores [Q, k], index [Q, k])`` with the same tie rule as :func:`knn`.
    A rank may hold fewer than ``k`` (or zero) keys.  Tensors must be on a
    device the group's backend can communicate (CPU for gloo, CUDA for NCCL).

    ``backend`` and ``precision`` choose each rank's local search (see
    :func:`knn`); the merge is the same for all.

    Without an initialised process group (or with world size 1) this is
    :func:`knn`.
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size(group) == 1:
        return knn(queries, local_keys, k, metric=metric, chunk_size=chunk_size, backend=backend,
                   precision=precision)

    _check_inputs(queries, local_keys, metric)
    world = dist.get_world_size(group)
    rank = dist.get_rank(group)
    device = local_keys.device

    size = torch.tensor([local_keys.shape[0]], dtype=torch.int64, device=device)
    sizes = [torch.zeros_like(size) for _ in range(world)]
    dist.all_gather(sizes, size, group=group)
    sizes = [int(s.item()) for s in sizes]
    n_global = sum(sizes)
    # Validated after the size exchange so all ranks agree on raising.
    k = _check_k(k, n_global)
    if key_offset is None:
        key_offset = sum(sizes[:rank])

    n_queries = queries.shape[0]
    # Pad to k columns (all_gather needs equal shapes); padding sorts last.
    scores = torch.full((n_queries, k), float("-inf"), dtype=torch.float32, device=device)
    index = torch.full((n_queries, k), torch.iinfo(torch.int64).max, dtype=torch.int64, device=device)
    local_k = min(k, local_keys.shape[0])
    if local_k > 0:
        s, i = knn(queries, local_keys, local_k, metric=metric, chunk_size=chunk_size, backend=backend,
                   precision=precision)
        scores[:, :local_k] = s
        index[:, :local_k] = i + key_offset

    all_scores = [torch.empty_like(scores) for _ in range(world)]
    all_index = [torch.empty_like(index) for _ in range(world)]
    dist.all_gather(all_scores, scores, group=group)
    dist.all_gather(all_index, index, group=group)
    # A full canonical sort (not just a stable one) so a caller-supplied
    # key_offset need not follow rank order.
    merged_scores, merged_index = _canonical_order(torch.cat(all_scores, dim=1), torch.cat(all_index, dim=1))
    return merged_scores[:, :k].contiguous(), merged_index[:, :k].contiguous()


def select_backend(name: str, device=None) -> str:
    """Resolve the k-NN backend name from config (``mine.backend``) for tensors on ``device``.

    * ``"torch"`` -> ``"torch"`` (exact, any device).
    * ``"faiss"`` -> ``"faiss"`` if importable (else ImportError).
    * ``"auto"`` -> ``"triton"`` on a CUDA device when Triton imports, else ``"torch"``.
    * ``"triton"`` -> ``"triton"`` when the kernel can run there: a CUDA device
      (with CUDA available), or the CPU under ``TRITON_INTERPRET=1`` (slow; for
      tests); otherwise a RuntimeError naming ``mine.backend`` and the
      alternatives.

    ``device`` defaults to CUDA when available, else the CPU.
    """
    if not isinstance(name, str):
        raise TypeError(f"backend name must be a string, got {type(name).__name__}")
    key = name.strip().lower()
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if key == "torch":
        return "torch"
    if key == "faiss":
        _import_faiss()
        return "faiss"
    if key == "auto":
        return "triton" if device.type == "cuda" and _dispatch.triton_importable() else "torch"
    if key == "triton":
        if not _dispatch.triton_importable():
            raise RuntimeError("mine.backend=triton needs the triton package (pip install triton); "
                               "or use mine.backend=torch, faiss or auto")
        if device.type == "cuda" and torch.cuda.is_available():
            return "triton"
        if device.type == "cpu" and _dispatch.interpreting():
            return "triton"
        where = "CUDA is not available" if device.type == "cuda" else f"the device is {device}"
        raise RuntimeError(f"mine.backend=triton needs a CUDA GPU ({where}; on CPU it runs only under "
                           "TRITON_INTERPRET=1, which is slow and meant for tests); "
                           "use mine.backend=torch, faiss or auto")
    raise ValueError(f"unknown k-NN backend {name!r}; expected one of 'auto', 'torch', 'faiss', 'triton'")
