"""Stage 6, evaluate: predict the evaluation images with the final model and score the clusters.

Labels are used here only. Writes assignments.csv, confusion.png and prototypes.png to the run folder; the pipeline
then writes metrics.json and report.md from every stage's results. Also scores the SCAN model's heads (a
diagnostic of the label-free head selection) and a k-means-on-pixels baseline in the same run.
"""
from __future__ import annotations

import csv

import torch

from .. import metrics as M
from .. import report
from ..io_utils import atomic_path, load_torch
from ..models import build
from .common import infer
from .selflabel import load_scan_model


def final_model(cfg, ctx):
    if cfg.selflabel.enabled:
        model = load_scan_model(cfg, ctx)
        model.load_state_dict(load_torch(ctx.run_dir / "selflabel" / "model.pt")["model"])
        return model
    return load_scan_model(cfg, ctx)


def write_assignments(path, imageset, predictions, confidence) -> None:
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as handle:
        writer = csv.writer(handle)
        key = "path" if imageset.names is not None else "index"
        writer.writerow([key, "cluster", "confidence"])
        ids = imageset.names if imageset.names is not None else range(len(imageset))
        for ident, cluster, conf in zip(ids, predictions.tolist(), confidence.tolist()):
            writer.writerow([ident, cluster, f"{conf:.6f}"])


def run(cfg, ctx, config_hash: str) -> dict:
    eval_set = ctx.eval_set
    model = ctx.prepare_model(final_model(cfg, ctx)).eval()
    probs = infer(ctx, model, eval_set.images, desc="evaluate")[0].softmax(dim=1)
    targets = eval_set.targets
    labelled = targets is not None and bool((targets >= 0).any())
    # every rank infers its shard; (logits of every head, the head the label-free rule selected)
    scan_heads = _scan_head_logits(cfg, ctx) if labelled else None
    if not ctx.is_main:
        return {"artifacts": {}, "metrics": {}}
    confidence, predictions = probs.max(dim=1)
    run_dir = ctx.run_dir
    write_assignments(run_dir / "assignments.csv", eval_set, predictions, confidence)

    results: dict = {"num_images": len(eval_set)}
    if labelled:
        results["final"] = M.cluster_metrics(targets, predictions.numpy(), probs.numpy())
        mapping = M.hungarian_match(targets, predictions.numpy(), cfg.num_clusters, eval_set.num_classes)
        confusion = M.confusion_matrix(targets, predictions.numpy(), mapping)
        report.write_confusion_png(run_dir / "confusion.png", confusion, eval_set.class_names,
                                   title=f"{cfg.name}: ACC {results['final']['acc']:.3f}")
        cluster_names = _cluster_names(mapping, eval_set.class_names, cfg.num_clusters)
        results["scan_heads"] = _score_scan_heads(*scan_heads, targets)
        if cfg.run.baseline:
            results["kmeans_pixels"] = M.kmeans_baseline(eval_set.images, targets, cfg.num_clusters,
                                                         seed=cfg.run.seed)
    else:
        results["final"] = {"acc": None, "nmi": None, "ari": None, "ami": None}
        report.write_confusion_png(run_dir / "confusion.png", _cluster_sizes(predictions, cfg.num_clusters),
                                   None, title=f"{cfg.name}: cluster sizes (no labels)")
        cluster_names = None
    report.write_prototypes_png(run_dir / "prototypes.png", eval_set.images, predictions.numpy(),
                                confidence.numpy(), cfg.num_clusters, cluster_names=cluster_names)
    return {"artifacts": {"assignments": str(run_dir / "assignments.csv")}, "metrics": results}


def _cluster_names(mapping: dict, class_names, num_clusters: int):
    if class_names is None:
        return None
    return [class_names[mapping[c]] if c in mapping else "-" for c in range(num_clusters)]


def _cluster_sizes(predictions: torch.Tensor, num_clusters: int):
    return torch.bincount(predictions, minlength=num_clusters).numpy()[None, :]


def _scan_head_logits(cfg, ctx) -> tuple[torch.Tensor, int]:
    """([H, N, C] logits of every SCAN head on the evaluation images, the selected head), one read of the file."""
    saved = load_torch(ctx.run_dir / "scan" / "model.pt")
    model = build.cluster_model(cfg, ctx, cfg.scan.num_heads)
    model.load_state_dict(saved["model"])
    model = ctx.prepare_model(model).eval()
    return infer(ctx, model, ctx.eval_set.images, desc="score heads"), int(saved["best_head"])


def _score_scan_heads(logits: torch.Tensor, best: int, targets) -> dict:
    """Every SCAN head's accuracy next to the one the label-free rule selected (diagnostic only)."""
    heads = [M.cluster_metrics(targets, head.argmax(dim=1).numpy()) for head in logits]
    return {"selected_head": best, "selected": heads[best], "acc_per_head": [h["acc"] for h in heads]}
