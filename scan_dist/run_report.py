"""One run's artifacts: confusion and prototype PNGs, report.md, and the plain-text tables printed at the end.

Every writer goes through a temporary file in the target folder followed by ``os.replace``, so a crash, a
pre-emption or a full disk never leaves a half-written artifact where a reader (or a resumed run) would pick it up.
Plots use ``matplotlib.figure.Figure`` directly rather than pyplot, so importing or calling this module never changes
the process-wide matplotlib backend. Comparing several runs with the paper is `report.py`'s job.
"""

from __future__ import annotations

import math
import os
from typing import Any, Mapping, Sequence

import numpy as np

from .io_utils import atomic_path
from .io_utils import write_text as atomic_write_text
from .metrics import to_numpy

__all__ = [
    "atomic_write_text",
    "format_metrics_table",
    "format_time_table",
    "write_confusion_png",
    "write_prototypes_png",
    "write_report_md",
]

_SCORE_KEYS = ("acc", "nmi", "ari", "ami")
# Keys whose values are fractions and read best as percentages in per-stage tables.
_PERCENT_KEYS = frozenset(_SCORE_KEYS + ("acc_many_to_one", "top5", "neighbor_agreement", "knn_acc"))
_ARTIFACTS = (
    ("Confusion matrix", "confusion.png"),
    ("Cluster prototypes", "prototypes.png"),
    ("Per-sample assignments", "assignments.csv"),
)


def _save_figure(fig: Any, path: str | os.PathLike) -> None:
    with atomic_path(path) as tmp:
        # The temporary name has a random suffix, so the format cannot be inferred from it.
        fig.savefig(tmp, format="png")


# ---------------------------------------------------------------- figures


def write_confusion_png(path: str | os.PathLike, confusion: np.ndarray,
                        class_names: Sequence[str] | None = None, title: str = "") -> None:
    """Heat map of a confusion matrix (rows = true class, columns = clusters in matched order).

    Colours are row-normalised so small classes stay visible; raw counts are
    written into the cells while the matrix is small enough to read them.
    """
    from matplotlib.figure import Figure

    conf = np.asarray(to_numpy(confusion), dtype=np.float64)
    if conf.ndim != 2:
        raise ValueError(f"confusion must be 2-D, got shape {conf.shape}")
    rows, cols = conf.shape
    row_sums = conf.sum(axis=1, keepdims=True)
    shown = np.divide(conf, row_sums, out=np.zeros_like(conf), where=row_sums > 0)

    # Grow with the matrix but stay below a size that Agg renders quickly.
    width = min(4.0 + 0.45 * cols, 30.0)
    height = min(3.5 + 0.45 * rows, 30.0)
    fig = Figure(figsize=(width, height), dpi=100)
    ax = fig.add_subplot(1, 1, 1)
    image = ax.imshow(shown, cmap="Blues", vmin=0.0, vmax=1.0, aspect="auto", interpolation="nearest")
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="fraction of true class")
    ax.set_xlabel("predicted cluster (matched to class order)")
    ax.set_ylabel("true class")
    if title:
        ax.set_title(title)

    if max(rows, cols) <= 40:
        ax.set_yticks(range(rows))
        ax.set_xticks(range(cols))
        if class_names is not None and len(class_names) >= rows:
            ax.set_yticklabels([str(n) for n in class_names[:rows]])
            # Column i < rows is the cluster matched to class i; the rest are extra clusters.
            xlabels = [str(class_names[i]) if i < rows else f"+{i - rows + 1}" for i in range(cols)]
            ax.set_xticklabels(xlabels, rotation=90)
    if max(rows, cols) <= 20:
        for r in range(rows):
            for c in range(cols):
                if conf[r, c]:
                    colour = "white" if shown[r, c] > 0.5 else "black"
                    ax.text(c, r, f"{int(conf[r, c])}", ha="center", va="center", fontsize=7, color=colour)
    fig.tight_layout()
    _save_figure(fig, path)


def _images_nchw(images: Any, indices: np.ndarray) -> np.ndarray:
    """Selects ``indices`` first so a huge (possibly memory-mapped or GPU) tensor is never copied whole; a callable
    ``images(indices)`` fetches just those images (a dataset reader)."""
    if callable(images):
        picked = images(np.asarray(indices))
    elif hasattr(images, "detach"):
        import torch

        picked = images[torch.as_tensor(indices, dtype=torch.long, device=images.device)]
    else:
        picked = np.asarray(images)[indices]
    arr = to_numpy(picked)
    if arr.ndim == 3:
        arr = arr[:, None]
    if arr.ndim != 4:
        raise ValueError(f"images must be [N, C, H, W], got {arr.ndim}-D")
    if arr.shape[1] not in (1, 3) and arr.shape[-1] in (1, 3):
        arr = arr.transpose(0, 3, 1, 2)
    if arr.dtype != np.uint8:
        scale = 255.0 if arr.size and float(arr.max()) <= 1.0 else 1.0
        arr = np.clip(np.rint(arr.astype(np.float32) * scale), 0, 255).astype(np.uint8)
    return arr


def _row_label(cluster: int, class_names: Sequence[str] | None, cluster_names: Any) -> str:
    label = f"cluster {cluster}"
    if cluster_names is None:
        return label
    if isinstance(cluster_names, Mapping):
        name = cluster_names.get(cluster)
    else:
        name = cluster_names[cluster] if cluster < len(cluster_names) else None
    if name is None:
        return label
    # An int is a class index (e.g. hungarian_match output); class_names turns it into a word.
    if isinstance(name, (int, np.integer)) and class_names is not None and 0 <= int(name) < len(class_names):
        name = class_names[int(name)]
    return f"{label}\n{name}"


def write_prototypes_png(path: str | os.PathLike, images_uint8: Any, predictions: Any, confidence: Any,
                         num_clusters: int, per_cluster: int = 8, class_names: Sequence[str] | None = None,
                         cluster_names: Any = None) -> None:
    """Grid with one row per cluster showing its ``per_cluster`` most confident images.

    ``cluster_names`` is a sequence or mapping cluster -> name; an integer name
    is read as a class index into ``class_names`` (so a Hungarian mapping can be
    passed as is). Clusters with fewer images leave blank cells. The grid is
    assembled as one mosaic image, which keeps 1000-cluster runs fast to draw.
    """
    from matplotlib.figure import Figure

    pred = np.asarray(to_numpy(predictions)).reshape(-1).astype(np.int64)
    conf = np.asarray(to_numpy(confidence), dtype=np.float64).reshape(-1)
    if pred.shape != conf.shape:
        raise ValueError(f"predictions and confidence differ in length: {pred.size} vs {conf.size}")
    num_clusters = int(num_clusters)
    per_cluster = int(per_cluster)
    if num_clusters <= 0 or per_cluster <= 0:
        raise ValueError("num_clusters and per_cluster must be positive")

    # Sort once by (cluster, -confidence) instead of scanning all N samples per cluster.
    order = np.lexsort((-conf, pred))
    sorted_pred = pred[order]
    starts = np.searchsorted(sorted_pred, np.arange(num_clusters), side="left")
    ends = np.searchsorted(sorted_pred, np.arange(num_clusters), side="right")
    chosen = [order[s:min(e, s + per_cluster)] for s, e in zip(starts, ends)]
    flat = np.concatenate(chosen) if chosen else np.zeros(0, dtype=np.int64)

    if flat.size:
        picked = _images_nchw(images_uint8, flat)
        channels, h, w = picked.shape[1:]
    else:
        shape = tuple(getattr(images_uint8, "shape", (0, 1, 8, 8)))
        channels, h, w = (shape[1], shape[2], shape[3]) if len(shape) == 4 else (1, 8, 8)
        picked = np.zeros((0, channels, h, w), dtype=np.uint8)
    gray = channels == 1
    if channels not in (1, 3):
        raise ValueError(f"images must have 1 or 3 channels, got {channels}")

    pad = max(1, min(h, w) // 16)
    cell_h, cell_w = h + pad, w + pad
    mosaic = np.full((num_clusters * cell_h + pad, per_cluster * cell_w + pad, channels), 255, dtype=np.uint8)
    cursor = 0
    for row, idx in enumerate(chosen):
        for col in range(idx.size):
            y, x = pad + row * cell_h, pad + col * cell_w
            mosaic[y:y + h, x:x + w] = picked[cursor].transpose(1, 2, 0)
            cursor += 1

    cell_inch = 0.6 if max(h, w) <= 64 else 0.9
    label_inch = 1.6
    # Agg refuses images above 2**16 px and huge canvases are unreadable anyway.
    fig_h = min(0.3 + num_clusters * cell_inch, 300.0)
    fig_w = min(label_inch + per_cluster * cell_inch, 60.0)
    fig = Figure(figsize=(fig_w, fig_h), dpi=100)
    ax = fig.add_axes((label_inch / fig_w, 0.0, 1.0 - label_inch / fig_w, 1.0))
    if gray:
        ax.imshow(mosaic[..., 0], cmap="gray", vmin=0, vmax=255, interpolation="nearest", aspect="auto")
    else:
        ax.imshow(mosaic, interpolation="nearest", aspect="auto")
    ax.set_xticks([])
    ax.set_yticks([pad + r * cell_h + h / 2 for r in range(num_clusters)])
    ax.set_yticklabels([_row_label(r, class_names, cluster_names) for r in range(num_clusters)], fontsize=7)
    ax.tick_params(axis="y", length=0)
    for spine in ax.spines.values():
        spine.set_visible(False)
    _save_figure(fig, path)


# ---------------------------------------------------------------- text


def _pct(value: Any) -> str:
    if value is None:
        return "n/a"
    value = float(value)
    return "n/a" if math.isnan(value) else f"{100.0 * value:.1f}"


def _mss(seconds: float) -> str:
    whole = int(round(seconds))
    minutes, secs = divmod(whole, 60)
    return f"{minutes}:{secs:02d}"


def _split_total(stage_seconds: Mapping[str, float]) -> tuple[list[tuple[str, float]], float]:
    """Stage rows plus the total; an explicit "total" entry (wall clock, including gaps) wins over the sum."""
    rows = [(str(k), float(v)) for k, v in stage_seconds.items() if str(k).lower() != "total"]
    explicit = [float(v) for k, v in stage_seconds.items() if str(k).lower() == "total"]
    total = explicit[0] if explicit else sum(v for _, v in rows)
    return rows, total


def _plain_table(header: Sequence[str], rows: Sequence[Sequence[str]], left_cols: int = 1) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]

    def line(cells: Sequence[str]) -> str:
        parts = [str(c).ljust(w) if i < left_cols else str(c).rjust(w)
                 for i, (c, w) in enumerate(zip(cells, widths))]
        return "  ".join(parts).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(header), rule, *(line(r) for r in rows)])


def format_time_table(stage_seconds: Mapping[str, float], images_per_s: Mapping[str, Any] | None = None) -> str:
    """Aligned stage / seconds / m:ss table with a closing total row; with `images_per_s`, a column of the training
    stages' throughput (images of the global batch per second of their loops)."""
    rows, total = _split_total(stage_seconds)
    rates = images_per_s or {}
    body = [[name, f"{sec:.1f}", _mss(sec)] + ([f"{rates[name]:.0f}" if rates.get(name) else "-"] if rates else [])
            for name, sec in rows]
    body.append(["total", f"{total:.1f}", _mss(total)] + (["-"] if rates else []))
    return _plain_table(["stage", "seconds", "m:ss"] + (["images/s"] if rates else []), body)


def _score_rows(metrics: Mapping[str, Any], baseline: Mapping[str, Any] | None) -> list[list[str]]:
    rows = [["SCAN (ours)", *(_pct(metrics.get(k)) for k in _SCORE_KEYS)]]
    if baseline is not None:
        rows.append(["k-means on pixels", *(_pct(baseline.get(k)) for k in _SCORE_KEYS)])
    return rows


def format_metrics_table(metrics: Mapping[str, Any], baseline: Mapping[str, Any] | None = None) -> str:
    """Aligned ACC/NMI/ARI/AMI table in percent; the k-means row appears only when ``baseline`` is given."""
    return _plain_table(["method", "ACC", "NMI", "ARI", "AMI"], _score_rows(metrics, baseline))


def _md_cell(value: Any) -> str:
    return str(value).replace("|", "\\|").replace("\n", " ")


def _md_table(header: Sequence[str], rows: Sequence[Sequence[Any]], align: Sequence[str]) -> list[str]:
    rule = ["---:" if a == "r" else "---" for a in align]
    return ["| " + " | ".join(_md_cell(c) for c in r) + " |" for r in [header, rule, *rows]]


def _stage_value(key: str, value: Any) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, (bool, np.bool_)):
        return str(bool(value))
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, (float, np.floating)):
        if math.isnan(float(value)):
            return "n/a"
        return _pct(value) if key in _PERCENT_KEYS else f"{float(value):.4g}"
    return str(value)


def _flatten(config: Mapping[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    items: list[tuple[str, Any]] = []
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            items.extend(_flatten(value, name + "."))
        else:
            items.append((name, value))
    return items


def write_report_md(path: str | os.PathLike, metrics: Mapping[str, Any], stage_seconds: Mapping[str, float],
                    config_summary: Mapping[str, Any], baseline: Mapping[str, Any] | None = None,
                    curves: bool = False) -> None:
    """Writes the human-readable run summary (scores in %, stage times, per-stage scores, artifacts, config)."""
    lines = ["# SCAN: learning to classify images without labels", ""]

    lines += ["## Results", ""]
    score_rows = _score_rows(metrics, baseline)
    lines += _md_table(["Method", "ACC (%)", "NMI (%)", "ARI (%)", "AMI (%)"], score_rows, "lrrrr")
    extras = []
    if "acc_many_to_one" in metrics:
        extras.append(f"- Many-to-one accuracy: {_pct(metrics['acc_many_to_one'])}%")
    if "top5" in metrics:
        extras.append(f"- Top-5 accuracy: {_pct(metrics['top5'])}%")
    if "num_clusters" in metrics or "num_classes" in metrics:
        extras.append(f"- Clusters used: {metrics.get('num_clusters', 'n/a')} "
                      f"(classes: {metrics.get('num_classes', 'n/a')})")
    if baseline is not None and baseline.get("seconds") is not None:
        extras.append(f"- k-means baseline time: {float(baseline['seconds']):.1f} s")
    if extras:
        lines += ["", *extras]

    lines += ["", "## Time per stage", ""]
    rows, total = _split_total(stage_seconds)
    time_rows = [[name, f"{sec:.1f}", _mss(sec)] for name, sec in rows]
    time_rows.append(["**Total**", f"**{total:.1f}**", f"**{_mss(total)}**"])
    lines += _md_table(["Stage", "Seconds", "m:ss"], time_rows, "lrr")

    stages = metrics.get("stages")
    if isinstance(stages, Mapping) and stages:
        # one row per stage with only its own keys: stages share few keys, so a column per key is mostly empty
        stage_rows = [[name, ", ".join(f"{k}: {_stage_value(k, v)}" for k, v in (vals or {}).items() if k != "seconds")
                       or "–"] for name, vals in stages.items()]
        lines += ["", "## Metrics per stage", ""]
        lines += _md_table(["Stage", "Metrics (fractions as %)"], stage_rows, "ll")

    lines += ["", "## Artifacts", ""]
    lines += [f"- [{label}]({name})" for label, name in _ARTIFACTS]
    lines += ["", "![Confusion matrix](confusion.png)", "", "![Cluster prototypes](prototypes.png)"]
    if curves:
        lines += ["", "![Training curves (history.jsonl)](curves.png)"]

    config_items = _flatten(config_summary)
    if config_items:
        lines += ["", "## Configuration", ""]
        lines += _md_table(["Key", "Value"], [[k, v] for k, v in config_items], "ll")

    atomic_write_text(path, "\n".join(lines) + "\n")
