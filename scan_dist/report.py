"""Run artifacts: confusion and prototype PNGs, report.md, and plain-text tables for the terminal.

Every writer goes through a temporary file in the target folder followed by
``os.replace``, so a crash, a pre-emption or a full disk never leaves a
half-written artifact where a reader (or a resumed run) would pick it up.
Plots use ``matplotlib.figure.Figure`` directly rather than pyplot, so importing
or calling this module never changes the process-wide matplotlib backend.

Run as ``python -m scan_dist.report RUN_DIR [RUN_DIR ...] [--out FILE.md] [--plots DIR]`` it compares finished
runs: final ACC/NMI/ARI per (preset, K) as mean ± std over seeds next to the SCAN paper's numbers, accuracy and
time per stage, an over-clustering table when one preset was run with several K, and bar / line plots.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from .io_utils import atomic_path
from .io_utils import write_text as atomic_write_text
from .metrics import to_numpy

__all__ = [
    "PAPER_RESULTS",
    "ReportError",
    "atomic_write_text",
    "format_comparison_md",
    "format_metrics_table",
    "format_time_table",
    "load_run",
    "main",
    "mean_std",
    "write_comparison_plots",
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


# ---------------------------------------------------------------- comparison across runs
#
# ``python -m scan_dist.report RUN_DIR [RUN_DIR ...] [--out FILE.md] [--plots DIR]`` reads finished run folders
# (``metrics.json`` written by ``pipeline.summarize`` and the resolved ``config.yaml``) and compares them with each
# other and with the paper. Nothing below runs on import.

# The SCAN authors' README (github.com/wvangansbeke/Unsupervised-Classification, "Model Zoo" tables; copied in
# ../shared/RECIPES.md section 8), in percent. "selflabel" is SCAN + self-labelling (the final model), "scan" the
# SCAN-loss step before self-labelling. These are the authors' best runs, not the paper's mean over 10 runs.
# ImageNet-1k has no self-labelling entry there: its "selflabel" row repeats the SCAN-only result (ResNet-50,
# 10 heads, lowest-loss head), which is what the README reports as final.
PAPER_RESULTS: dict[str, dict[str, Any]] = {
    "cifar10": {"k": 10, "selflabel": (88.3, 79.7, 77.2), "scan": (81.6, 71.5, 66.5)},
    "cifar20": {"k": 20, "selflabel": (50.7, 48.6, 33.3), "scan": (44.0, 44.9, 28.3)},
    "stl10": {"k": 10, "selflabel": (80.9, 69.8, 64.6), "scan": (79.2, 67.3, 61.8)},
    "imagenet50": {"k": 50, "selflabel": (76.8, 82.2, 66.1), "scan": (75.1, 80.5, 63.5)},
    "imagenet100": {"k": 100, "selflabel": (68.9, 80.8, 57.6), "scan": (66.2, 78.7, 54.4)},
    "imagenet200": {"k": 200, "selflabel": (58.1, 77.2, 47.0), "scan": (56.3, 75.7, 44.1)},
    "imagenet1k": {"k": 1000, "selflabel": (39.9, 72.0, 27.5), "scan": (39.9, 72.0, 27.5)},
}
_DASH = "—"
_COMPARE_KEYS = ("acc", "nmi", "ari")


class ReportError(Exception):
    """A problem with the command-line input (missing folder, missing or broken metrics.json): one line, exit 2."""


def _fraction(value: Any) -> float | None:
    if value is None or isinstance(value, bool):
        return None
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(value) else value


def load_run(run_dir: str | os.PathLike) -> dict[str, Any]:
    """The facts of one finished run that the comparison needs, as a flat dict (fractions, not percent).

    Keys: ``path``, ``label`` (folder name), ``preset``, ``num_clusters`` (K asked for, from config.yaml),
    ``seed``, ``acc``/``nmi``/``ari`` (final model), ``acc_many_to_one``, ``clusters_used`` (distinct predicted
    clusters), ``num_classes``, ``scan_acc`` (the SCAN head selected by lowest loss, before self-labelling),
    ``selflabel`` (whether that stage ran), ``kmeans_acc`` (the k-means-on-pixels baseline) and ``seconds``
    (stage -> seconds, with ``total``). Raises :class:`ReportError` for a folder that is not a finished run.
    """
    import json

    import yaml

    path = Path(run_dir)
    if not path.is_dir():
        raise ReportError(f"run folder not found: {path}")
    metrics_path = path / "metrics.json"
    if not metrics_path.is_file():
        raise ReportError(f"no metrics.json in {path} (not a run folder, or the run has not finished)")
    try:
        metrics = json.loads(metrics_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ReportError(f"cannot read {metrics_path}: {exc}") from None
    if not isinstance(metrics, Mapping):
        raise ReportError(f"{metrics_path} does not hold a JSON object")

    config: Mapping[str, Any] = {}
    config_path = path / "config.yaml"
    if config_path.is_file():
        try:
            config = yaml.safe_load(config_path.read_text(encoding="utf-8")) or {}
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
            raise ReportError(f"cannot read {config_path}: {' '.join(str(exc).split())}") from None
        if not isinstance(config, Mapping):
            raise ReportError(f"{config_path} does not hold a mapping")

    final = metrics.get("final") if isinstance(metrics.get("final"), Mapping) else {}
    stages = metrics.get("stages") if isinstance(metrics.get("stages"), Mapping) else {}
    evaluation = stages.get("evaluate") if isinstance(stages.get("evaluate"), Mapping) else {}
    heads = evaluation.get("scan_heads") if isinstance(evaluation.get("scan_heads"), Mapping) else {}
    selected = heads.get("selected") if isinstance(heads.get("selected"), Mapping) else {}
    baseline = metrics.get("baseline_kmeans_pixels") or evaluation.get("kmeans_pixels") or {}
    run_cfg = config.get("run") if isinstance(config.get("run"), Mapping) else {}

    # K is the number of clusters asked for; final["num_clusters"] only counts the clusters that got samples.
    k = config.get("num_clusters", final.get("num_clusters"))
    seconds = metrics.get("seconds") if isinstance(metrics.get("seconds"), Mapping) else {}
    return {
        "path": path,
        "label": path.resolve().name or str(path),
        "preset": str(metrics.get("preset") or config.get("name") or path.resolve().name),
        "num_clusters": int(k) if k is not None else None,
        "seed": run_cfg.get("seed"),
        "acc": _fraction(metrics.get("acc", final.get("acc"))),
        "nmi": _fraction(metrics.get("nmi", final.get("nmi"))),
        "ari": _fraction(metrics.get("ari", final.get("ari"))),
        "acc_many_to_one": _fraction(final.get("acc_many_to_one")),
        "clusters_used": final.get("num_clusters"),
        "num_classes": final.get("num_classes"),
        "scan_acc": _fraction(selected.get("acc")),
        "selflabel": "selflabel" in stages,
        "kmeans_acc": _fraction(baseline.get("acc")) if isinstance(baseline, Mapping) else None,
        "seconds": {str(name): float(sec) for name, sec in seconds.items() if _fraction(sec) is not None},
    }


def mean_std(values: Sequence[Any]) -> tuple[float | None, float | None, int]:
    """Mean, sample standard deviation (ddof=1; None for a single value) and count of the non-missing values."""
    present = [v for v in (_fraction(x) for x in values) if v is not None]
    n = len(present)
    if n == 0:
        return None, None, 0
    mean = sum(present) / n
    if n == 1:
        return mean, None, 1
    return mean, math.sqrt(sum((v - mean) ** 2 for v in present) / (n - 1)), n


def group_runs(runs: Sequence[Mapping[str, Any]]) -> dict[tuple[str, Any], list[Mapping[str, Any]]]:
    """Runs keyed by (preset, num_clusters), in first-seen order; each group's runs are the seeds of one setup."""
    groups: dict[tuple[str, Any], list[Mapping[str, Any]]] = {}
    for run in runs:
        groups.setdefault((run["preset"], run["num_clusters"]), []).append(run)
    return groups


def _pm(values: Sequence[Any]) -> str:
    """'81.2 ± 0.4' in percent over the values, or just '81.2' for one value, or '—' for none."""
    mean, std, _ = mean_std(values)
    if mean is None:
        return _DASH
    return f"{100 * mean:.1f}" if std is None else f"{100 * mean:.1f} ± {100 * std:.1f}"


def _signed(value: float | None) -> str:
    return _DASH if value is None else f"{value:+.1f}"


def _paper_row(preset: str, k: Any, step: str = "selflabel") -> tuple[float, float, float] | None:
    """The paper's (ACC, NMI, ARI) in percent for this preset, only when K is the paper's K (= classes)."""
    entry = PAPER_RESULTS.get(preset)
    if entry is None or k != entry["k"]:
        return None
    return entry[step]


def _seeds(runs: Sequence[Mapping[str, Any]]) -> str:
    return ", ".join("?" if r["seed"] is None else str(r["seed"]) for r in runs)


def _stage_order(runs: Sequence[Mapping[str, Any]]) -> list[str]:
    order: list[str] = []
    for run in runs:
        order += [s for s in run["seconds"] if s != "total" and s not in order]
    return order


def overclustering_datasets(runs: Sequence[Mapping[str, Any]]) -> dict[str, list[Any]]:
    """Preset -> sorted distinct K, for presets whose runs use more than one K.

    A preset stands for a dataset and evaluation split: ``launch cifar10 num_clusters=20`` keeps the name
    ``cifar10``, while two presets on the same files (``smoke`` and ``demo``) score different subsets.
    """
    ks: dict[str, set] = {}
    for run in runs:
        if run["num_clusters"] is not None:
            ks.setdefault(run["preset"], set()).add(run["num_clusters"])
    return {preset: sorted(values) for preset, values in ks.items() if len(values) > 1}


def format_comparison_md(runs: Sequence[Mapping[str, Any]], plots: Sequence[str | os.PathLike] = (),
                         relative_to: str | os.PathLike | None = None) -> str:
    """The Markdown comparison: results vs the paper, per-stage accuracy and time, and the unknown-K table.

    Over-clustering (K > classes): ``acc`` is ``metrics.cluster_metrics``'s Hungarian accuracy, computed with
    scipy's ``linear_sum_assignment`` on the rectangular [K, classes] contingency matrix (the same matching as
    ``metrics.hungarian_match``). A rectangular assignment pairs only min(K, classes) rows and columns, so with
    K > classes just the ``classes`` best-matching clusters get a class and every sample of the other K - classes
    clusters counts as wrong: this accuracy is bounded by the share of samples in the best one-to-one subset and
    usually falls as K grows. With K < classes every cluster is matched and K - classes classes are never
    predicted. ``acc_many_to_one`` maps each cluster to its majority class (the SCAN authors' protocol for
    over-clustering); it can only rise with K. Both come from ``metrics.json`` and are not recomputed here.
    """
    lines = ["# SCAN runs compared", ""]
    groups = group_runs(runs)

    lines += ["## Final results vs the paper", ""]
    rows = []
    for (preset, k), members in groups.items():
        ours = {key: mean_std([r[key] for r in members]) for key in _COMPARE_KEYS}
        paper = _paper_row(preset, k)
        diffs = [_signed(100 * ours[key][0] - paper[i] if paper and ours[key][0] is not None else None)
                 for i, key in enumerate(_COMPARE_KEYS)]
        rows.append([preset, _DASH if k is None else k, len(members), _seeds(members),
                     *(_pm([r[key] for r in members]) for key in _COMPARE_KEYS),
                     *((f"{v:.1f}" for v in paper) if paper else [_DASH] * 3), *diffs])
    lines += _md_table(["Preset", "K", "n", "Seeds", "ACC", "NMI", "ARI", "Paper ACC", "Paper NMI", "Paper ARI",
                        "Δ ACC", "Δ NMI", "Δ ARI"], rows, "lrrlrrrrrrrrr")
    lines += ["", "Percent; mean ± sample std (ddof = 1) over the n runs of a (preset, K) group. Paper: SCAN + "
              "self-labelling, the best runs in the authors' README model zoo, shown only where K equals the "
              "paper's K; Δ = ours − paper in points."]

    lines += ["", "## Per stage", ""]
    stage_names = _stage_order(runs)
    rows = []
    for run in runs:
        gain = (100 * (run["acc"] - run["scan_acc"]) if run["selflabel"] and run["acc"] is not None
                and run["scan_acc"] is not None else None)
        paper_scan = _paper_row(run["preset"], run["num_clusters"], "scan")
        secs = run["seconds"]
        total = secs.get("total", sum(v for s, v in secs.items() if s != "total"))
        rows.append([run["label"], run["preset"], _DASH if run["num_clusters"] is None else run["num_clusters"],
                     "?" if run["seed"] is None else run["seed"], _pct_or_dash(run["kmeans_acc"]),
                     _pct_or_dash(run["scan_acc"]), _pct_or_dash(run["acc"]), _signed(gain),
                     f"{paper_scan[0]:.1f}" if paper_scan else _DASH,
                     *(f"{secs[s]:.1f}" if s in secs else _DASH for s in stage_names), f"{total:.1f}"])
    lines += _md_table(["Run", "Preset", "K", "Seed", "k-means ACC", "SCAN head ACC", "Final ACC", "Self-label Δ",
                        "Paper SCAN ACC", *(f"{s} (s)" for s in stage_names), "Total (s)"],
                       rows, "llrrrrrrr" + "r" * (len(stage_names) + 1))
    lines += ["", "ACC in percent. SCAN head: the head picked by lowest SCAN loss, before self-labelling; Final: the "
              "model the run ends with (after self-labelling when that stage ran; Self-label Δ = Final − SCAN head). "
              "k-means: k-means on PCA-reduced pixels. Stage times in seconds."]

    multi_k = overclustering_datasets(runs)
    if multi_k:
        lines += ["", "## Overclustering / unknown K", ""]
        rows = []
        for preset, ks in multi_k.items():
            for k in ks:
                members = groups[(preset, k)]
                classes = sorted({r["num_classes"] for r in members if r["num_classes"] is not None})
                used = mean_std([r["clusters_used"] for r in members])[0]
                rows.append([preset, k, len(members), ", ".join(map(str, classes)) or _DASH,
                             _DASH if used is None else f"{used:.1f}".rstrip("0").rstrip("."),
                             _pm([r["acc"] for r in members]), _pm([r["acc_many_to_one"] for r in members]),
                             _pm([r["nmi"] for r in members])])
        lines += _md_table(["Preset", "K", "n", "Classes", "Clusters used", "Hungarian ACC", "Many-to-one ACC",
                            "NMI"], rows, "lrrrrrrr")
        lines += ["", "Hungarian ACC: one-to-one matching of the rectangular [K, classes] contingency matrix, so for "
                  "K > classes only the best-matching `classes` clusters count and samples in the others are "
                  "errors. Many-to-one ACC: every cluster takes its majority class (the SCAN authors' protocol "
                  "for over-clustering). Clusters used: clusters that received at least one sample (mean)."]

    if plots:
        base = Path(relative_to) if relative_to is not None else None
        lines += ["", "## Plots", ""]
        for plot in plots:
            shown = os.path.relpath(plot, base) if base is not None else str(plot)
            lines += [f"![{Path(plot).stem}]({Path(shown).as_posix()})", ""]
        lines.pop()
    return "\n".join(lines) + "\n"


def _pct_or_dash(value: Any) -> str:
    value = _fraction(value)
    return _DASH if value is None else f"{100 * value:.1f}"


def write_stage_accuracy_png(path: str | os.PathLike, runs: Sequence[Mapping[str, Any]]) -> None:
    """Grouped bars per run: k-means on pixels, SCAN head (before self-labelling) and final ACC, in percent."""
    from matplotlib.figure import Figure

    series = [("k-means (pixels)", "kmeans_acc", "#bbbbbb"), ("SCAN head", "scan_acc", "#4c72b0"),
              ("final", "acc", "#dd8452")]
    series = [s for s in series if any(_fraction(r[s[1]]) is not None for r in runs)]
    n = len(runs)
    fig = Figure(figsize=(min(3.0 + 1.1 * n, 40.0), 4.5), dpi=100)
    ax = fig.add_subplot(1, 1, 1)
    width = 0.8 / max(len(series), 1)
    x = np.arange(n)
    for i, (label, key, colour) in enumerate(series):
        values = [_fraction(r[key]) for r in runs]
        heights = [100 * v if v is not None else 0.0 for v in values]
        bars = ax.bar(x + (i - (len(series) - 1) / 2) * width, heights, width, label=label, color=colour)
        if n <= 12:
            for bar, v in zip(bars, values):
                if v is not None:
                    ax.annotate(f"{100 * v:.1f}", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                                ha="center", va="bottom", fontsize=7)
    ax.set_xticks(x)
    ax.set_xticklabels([f"{r['label']}\n{r['preset']} K={r['num_clusters']}" for r in runs],
                       rotation=30 if n > 4 else 0, ha="right" if n > 4 else "center", fontsize=8)
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 105)
    ax.set_title("Accuracy per stage")
    ax.legend(fontsize=8, loc="upper left")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    _save_figure(fig, path)


def write_acc_vs_k_png(path: str | os.PathLike, preset: str, runs: Sequence[Mapping[str, Any]]) -> None:
    """Hungarian ACC, many-to-one ACC and NMI (mean ± std over seeds) against K for one preset's runs."""
    from matplotlib.figure import Figure

    groups = group_runs([r for r in runs if r["preset"] == preset and r["num_clusters"] is not None])
    ks = sorted(k for _, k in groups)
    fig = Figure(figsize=(6.0, 4.2), dpi=100)
    ax = fig.add_subplot(1, 1, 1)
    for label, key, marker in (("Hungarian ACC", "acc", "o"), ("many-to-one ACC", "acc_many_to_one", "s"),
                               ("NMI", "nmi", "^")):
        stats = [mean_std([r[key] for r in groups[(preset, k)]]) for k in ks]
        points = [(k, m, s) for k, (m, s, _) in zip(ks, stats) if m is not None]
        if points:
            ax.errorbar([p[0] for p in points], [100 * p[1] for p in points],
                        yerr=[100 * (p[2] or 0.0) for p in points], marker=marker, capsize=3, label=label)
    classes = sorted({r["num_classes"] for r in runs if r["preset"] == preset and r["num_classes"]})
    for c in classes:
        ax.axvline(c, color="grey", linestyle=":", linewidth=1)
    if ks and ks[-1] / max(ks[0], 1) >= 20:
        ax.set_xscale("log")
    ax.set_xticks(ks)
    ax.set_xticklabels([str(k) for k in ks])
    ax.set_xlabel("K (clusters)" + (f"; dotted: {', '.join(map(str, classes))} classes" if classes else ""))
    ax.set_ylabel("%")
    ax.set_ylim(0, 105)
    ax.set_title(f"{preset}: scores vs K")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    _save_figure(fig, path)


def write_comparison_plots(runs: Sequence[Mapping[str, Any]], plots_dir: str | os.PathLike) -> list[Path]:
    """``stage_accuracy.png`` and, per preset run with several K, ``acc_vs_k-<preset>.png``; returns the paths."""
    plots_dir = Path(plots_dir)
    written = [plots_dir / "stage_accuracy.png"]
    write_stage_accuracy_png(written[0], runs)
    for preset in overclustering_datasets(runs):
        safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in preset)
        written.append(plots_dir / f"acc_vs_k-{safe}.png")
        write_acc_vs_k_png(written[-1], preset, runs)
    return written


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m scan_dist.report``: compare finished runs; prints the Markdown and writes it and the plots."""
    import argparse
    import sys

    parser = argparse.ArgumentParser(
        prog="python -m scan_dist.report",
        description="Compare finished SCAN runs (metrics.json + config.yaml) with each other and with the paper.")
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run folders (one per seed / K)")
    parser.add_argument("--out", type=Path, default=None,
                        help="Markdown file to write (default: PLOTS/report.md)")
    parser.add_argument("--plots", type=Path, default=None,
                        help="folder for the PNGs (default: FIRST_RUN_DIR/report_plots)")
    args = parser.parse_args(argv)
    try:
        runs = [load_run(d) for d in args.run_dirs]
        plots_dir = args.plots if args.plots is not None else Path(args.run_dirs[0]) / "report_plots"
        out = args.out if args.out is not None else plots_dir / "report.md"
        try:
            plots = write_comparison_plots(runs, plots_dir)
            text = format_comparison_md(runs, plots, relative_to=out.parent)
            atomic_write_text(out, text)
        except OSError as exc:
            raise ReportError(f"cannot write the report: {exc}") from None
    except ReportError as exc:
        print(f"scan_dist.report: error: {exc}", file=sys.stderr)
        return 2
    print(text, end="")
    print(f"\nwrote {out} and {len(plots)} plot(s) in {plots_dir}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
