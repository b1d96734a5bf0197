"""Clustering evaluation: Hungarian accuracy, NMI/ARI/AMI, confusion matrices, neighbour purity and a k-means baseline.

Every function accepts numpy arrays, torch tensors or plain lists of integer ids.
Targets equal to -1 mark unlabelled samples (e.g. the STL-10 "unlabeled" split)
and are left out of every score. Scores are fractions, not percentages; the
report module is the only place that turns them into percentages.
"""

from __future__ import annotations

import time
from typing import Any, Mapping

import numpy as np
from scipy.optimize import linear_sum_assignment
from sklearn import metrics as skm

__all__ = [
    "hungarian_match",
    "cluster_metrics",
    "confusion_matrix",
    "confident_purity",
    "neighbor_agreement",
    "kmeans_baseline",
    "to_numpy",
]

_UNLABELLED = -1


def to_numpy(x: Any) -> np.ndarray:
    """Converts a torch tensor, numpy array or sequence to numpy without importing torch."""
    if hasattr(x, "detach") and hasattr(x, "cpu"):
        x = x.detach().cpu()
        # numpy has no bfloat16/float16-friendly path for every op, so widen first.
        if x.is_floating_point():
            x = x.float()
        return x.numpy()
    return np.asarray(x)


def _as_ids(x: Any, name: str) -> np.ndarray:
    """Returns a 1-D int64 array, refusing floats that are not whole numbers (a sign of passing logits)."""
    arr = to_numpy(x)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {tuple(arr.shape)}")
    if arr.dtype.kind == "f":
        if not np.all(np.isfinite(arr)) or not np.all(arr == np.round(arr)):
            raise ValueError(f"{name} must hold integer ids, got non-integer floats")
    elif arr.dtype.kind not in "iub":
        raise ValueError(f"{name} must hold integer ids, got dtype {arr.dtype}")
    return arr.astype(np.int64, copy=False)


def _check_pair(targets: Any, predictions: Any) -> tuple[np.ndarray, np.ndarray]:
    t = _as_ids(targets, "targets")
    p = _as_ids(predictions, "predictions")
    if t.shape != p.shape:
        raise ValueError(f"targets and predictions differ in length: {t.shape[0]} vs {p.shape[0]}")
    if p.size and p.min() < 0:
        raise ValueError("predictions must be non-negative cluster ids")
    if t.size and t.min() < _UNLABELLED:
        raise ValueError("targets must be class ids >= 0, or -1 for unlabelled samples")
    return t, p


def _contingency(t: np.ndarray, p: np.ndarray, num_clusters: int, num_classes: int) -> np.ndarray:
    """Counts [num_clusters, num_classes]; t and p must already be free of unlabelled samples."""
    if num_clusters == 0 or num_classes == 0:
        return np.zeros((num_clusters, num_classes), dtype=np.int64)
    # One bincount over flat indices is much faster than np.add.at for millions of samples.
    flat = np.bincount(p * num_classes + t, minlength=num_clusters * num_classes)
    return flat.reshape(num_clusters, num_classes)


def _sizes(t_lab: np.ndarray, p_all: np.ndarray, num_clusters: int | None, num_classes: int | None) -> tuple[int, int]:
    k_seen = int(p_all.max()) + 1 if p_all.size else 0
    c_seen = int(t_lab.max()) + 1 if t_lab.size else 0
    k = k_seen if num_clusters is None else int(num_clusters)
    c = c_seen if num_classes is None else int(num_classes)
    if k < k_seen:
        raise ValueError(f"num_clusters={k} but predictions contain cluster id {k_seen - 1}")
    if c < c_seen:
        raise ValueError(f"num_classes={c} but targets contain class id {c_seen - 1}")
    return k, c


def _match_counts(counts: np.ndarray) -> dict[int, int]:
    if counts.size == 0:
        return {}
    rows, cols = linear_sum_assignment(counts, maximize=True)
    return {int(r): int(c) for r, c in zip(rows, cols)}


def hungarian_match(targets: Any, predictions: Any, num_clusters: int | None = None,
                    num_classes: int | None = None) -> dict[int, int]:
    """One-to-one cluster -> class mapping that maximises the number of agreeing labelled samples.

    With more clusters than classes only ``num_classes`` clusters are matched and
    the rest are absent from the result; with fewer clusters than classes every
    cluster is matched and some classes stay unused. Sizes default to the
    largest id seen plus one.
    """
    t, p = _check_pair(targets, predictions)
    labelled = t != _UNLABELLED
    k, c = _sizes(t[labelled], p, num_clusters, num_classes)
    return _match_counts(_contingency(t[labelled], p[labelled], k, c))


def cluster_metrics(targets: Any, predictions: Any, probabilities: Any = None) -> dict:
    """Scores a clustering against ground truth; see the module docstring for input conventions.

    Keys: ``acc`` (Hungarian one-to-one; samples of unmatched clusters count as
    wrong), ``acc_many_to_one`` (each cluster votes for its majority class),
    ``nmi`` (arithmetic normalisation), ``ari``, ``ami``, ``num_clusters``
    (distinct predicted ids over all samples, labelled or not), ``num_classes``
    (distinct labelled targets) and, given ``probabilities`` [N, K] with K >= 5,
    ``top5``. Without any labelled sample only acc/nmi/ari/ami are returned, as None.
    """
    t, p = _check_pair(targets, predictions)
    probs = None
    if probabilities is not None:
        probs = to_numpy(probabilities)
        if probs.ndim != 2 or probs.shape[0] != t.shape[0]:
            raise ValueError(f"probabilities must have shape [{t.shape[0]}, K], got {tuple(probs.shape)}")
        if p.size and probs.shape[1] <= int(p.max()):
            raise ValueError(f"probabilities have {probs.shape[1]} columns but predictions contain "
                             f"cluster id {int(p.max())}")

    labelled = t != _UNLABELLED
    if not labelled.any():
        return {"acc": None, "nmi": None, "ari": None, "ami": None}

    num_clusters_total = probs.shape[1] if probs is not None else None
    t_lab, p_lab = t[labelled], p[labelled]
    k, c = _sizes(t_lab, p, num_clusters_total, None)
    counts = _contingency(t_lab, p_lab, k, c)
    mapping = _match_counts(counts)
    n = float(t_lab.size)

    out: dict[str, Any] = {
        "acc": float(sum(counts[r, col] for r, col in mapping.items()) / n),
        "nmi": float(skm.normalized_mutual_info_score(t_lab, p_lab, average_method="arithmetic")),
        "ari": float(skm.adjusted_rand_score(t_lab, p_lab)),
        "ami": float(skm.adjusted_mutual_info_score(t_lab, p_lab)),
        "acc_many_to_one": float(counts.max(axis=1).sum() / n),
        "num_clusters": int(np.unique(p).size),
        "num_classes": int(np.unique(t_lab).size),
    }

    if probs is not None and probs.shape[1] >= 5:
        cluster_to_class = np.full(k, _UNLABELLED, dtype=np.int64)
        for cluster, cls in mapping.items():
            cluster_to_class[cluster] = cls
        # argpartition avoids a full sort of [N, K], which matters for K=1000 on ImageNet.
        top = np.argpartition(-probs[labelled], 4, axis=1)[:, :5]
        hits = (cluster_to_class[top] == t_lab[:, None]).any(axis=1)
        out["top5"] = float(hits.mean())
    return out


def _confusion_and_columns(targets: Any, predictions: Any,
                           mapping: Mapping[int, int] | None = None) -> tuple[np.ndarray, list[int | None]]:
    """Confusion matrix plus, per column, the cluster it shows (None for a padding column)."""
    t, p = _check_pair(targets, predictions)
    labelled = t != _UNLABELLED
    t_lab, p_lab = t[labelled], p[labelled]
    k, c = _sizes(t_lab, p, None, None)
    if mapping is not None:
        mapping = {int(a): int(b) for a, b in mapping.items()}
        if mapping:
            k = max(k, max(mapping) + 1)
            c = max(c, max(mapping.values()) + 1)
    counts = _contingency(t_lab, p_lab, k, c)
    if mapping is None:
        mapping = _match_counts(counts)

    class_to_cluster = {cls: cluster for cluster, cls in mapping.items()}
    # Classes without a matched cluster get an all-zero column so that column i
    # still belongs to class i and the diagonal keeps meaning "correct".
    columns: list[int | None] = [class_to_cluster.get(cls) for cls in range(c)]
    matched = set(class_to_cluster.values())
    columns += [cluster for cluster in range(k) if cluster not in matched]

    conf = np.zeros((c, len(columns)), dtype=np.int64)
    for j, cluster in enumerate(columns):
        if cluster is not None:
            conf[:, j] = counts[cluster]
    return conf, columns


def confident_purity(targets: Any, predictions: Any, confidence: Any, threshold: float,
                     num_clusters: int | None = None, num_classes: int | None = None) -> dict:
    """What self-labelling would learn from: the samples whose confidence exceeds ``threshold``.

    Keys: ``threshold``; ``share`` (fraction of all samples above it); ``acc`` (accuracy of those samples under the
    whole clustering's Hungarian mapping, labelled ones only; None when none is labelled); ``min_cluster_share``
    (the smallest share above the threshold among the non-empty clusters: 0 means a cluster gets no pseudo-label).
    A clustering's errors that sit above the threshold are errors self-labelling trains on, not ones it can fix.
    """
    t, p = _check_pair(targets, predictions)
    conf = to_numpy(confidence).astype(np.float64)
    if conf.shape != p.shape:
        raise ValueError(f"confidence and predictions differ in length: {conf.shape[0]} vs {p.shape[0]}")
    labelled = t != _UNLABELLED
    k, c = _sizes(t[labelled], p, num_clusters, num_classes)
    mapping = _match_counts(_contingency(t[labelled], p[labelled], k, c))
    confident = conf > threshold
    scored = confident & labelled
    # The confident samples' counts per (cluster, class); the right ones sit in the matched cells.
    counts = _contingency(t[scored], p[scored], k, c)
    sizes = np.bincount(p, minlength=k)
    above = np.bincount(p[confident], minlength=k)
    present = sizes > 0
    return {
        "threshold": float(threshold),
        "share": float(confident.mean()) if p.size else 0.0,
        "acc": float(sum(counts[r, m] for r, m in mapping.items()) / scored.sum()) if scored.any() else None,
        "min_cluster_share": float((above[present] / sizes[present]).min()) if present.any() else 0.0,
    }


def confusion_matrix(targets: Any, predictions: Any, mapping: Mapping[int, int] | None = None) -> np.ndarray:
    """Counts [num_classes, max(num_clusters, num_classes)] with rows = true class, columns = clusters.

    Column i (i < num_classes) is the cluster matched to class i (Hungarian
    mapping unless ``mapping`` is given), so the diagonal holds correct
    assignments; a class without a cluster gets a zero column. Unmatched
    clusters follow in ascending id order. Unlabelled samples are skipped.
    """
    return _confusion_and_columns(targets, predictions, mapping)[0]


def neighbor_agreement(targets: Any, neighbors: Any, chunk_rows: int = 1 << 18) -> float:
    """Fraction of (sample, neighbour) pairs sharing a class, i.e. the purity of the mined kNN graph.

    ``neighbors`` is [N, k] indices with the sample itself excluded. Pairs where
    either side is unlabelled (-1), or the index is negative (kNN padding), are
    skipped. Returns NaN when no pair can be scored.
    """
    t = _as_ids(targets, "targets")
    nb = to_numpy(neighbors)
    if nb.ndim != 2 or nb.shape[0] != t.shape[0]:
        raise ValueError(f"neighbors must have shape [{t.shape[0]}, k], got {tuple(nb.shape)}")
    if nb.size and nb.max() >= t.shape[0]:
        raise ValueError(f"neighbors index {int(nb.max())} is out of range for {t.shape[0]} samples")
    agree = 0
    total = 0
    # Chunking keeps the temporary [rows, k] arrays small on ImageNet-sized graphs.
    for start in range(0, nb.shape[0], chunk_rows):
        idx = nb[start:start + chunk_rows].astype(np.int64, copy=False)
        own = t[start:start + chunk_rows, None]
        valid = idx >= 0
        other = t[np.where(valid, idx, 0)]
        valid &= (own != _UNLABELLED) & (other != _UNLABELLED)
        agree += int(np.count_nonzero((own == other) & valid))
        total += int(np.count_nonzero(valid))
    return float(agree / total) if total else float("nan")


def kmeans_baseline(images_uint8: Any, targets: Any, num_clusters: int, seed: int = 0,
                    pca_dims: int = 50) -> dict:
    """k-means on raw pixels (scaled to [0, 1], PCA-reduced) as the "no representation learning" reference.

    Returns :func:`cluster_metrics` of the k-means assignment plus ``seconds``,
    the wall time of flattening, PCA and k-means together.
    """
    from sklearn.cluster import KMeans
    from sklearn.decomposition import PCA

    start = time.perf_counter()
    images = to_numpy(images_uint8)
    n = images.shape[0]
    if n < num_clusters:
        raise ValueError(f"k-means needs at least num_clusters={num_clusters} images, got {n}")
    # float32 halves memory against float64 and PCA/KMeans keep that dtype.
    x = images.reshape(n, -1).astype(np.float32) / np.float32(255.0)
    dims = min(int(pca_dims), x.shape[0], x.shape[1])
    if dims < x.shape[1]:
        x = PCA(n_components=dims, svd_solver="randomized", random_state=seed).fit_transform(x)
    assignment = KMeans(n_clusters=num_clusters, n_init=3, random_state=seed).fit_predict(x)
    seconds = time.perf_counter() - start

    result = cluster_metrics(targets, assignment)
    result["seconds"] = float(seconds)
    return result
