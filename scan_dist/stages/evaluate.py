"""Stage 6, evaluate: predict the evaluation images with the final model and score the clusters.

Labels are used here only. Writes assignments.csv, confusion.png and prototypes.png to the run folder; the pipeline
then writes metrics.json and report.md from every stage's results. Also scores the SCAN model's heads (a
diagnostic of the label-free head selection, from the logits the SCAN stage stored) and a k-means-on-pixels
baseline in the same run, on at most KMEANS_MAX_IMAGES evaluation images downsampled to at most
KMEANS_MAX_SIDE pixels a side, so its cost is bounded whatever the dataset.
"""
from __future__ import annotations

import csv

import numpy as np
import torch
import torch.nn.functional as F

from .. import head_consensus
from .. import metrics as M
from .. import run_report
from ..io_utils import atomic_path, load_torch
from .common import EVAL_LOGITS, infer, load_scan_model


def final_model(cfg, ctx):
    if cfg.selflabel.enabled:
        model = load_scan_model(cfg, ctx)
        model.load_state_dict(load_torch(ctx.run_dir / "selflabel" / "model.pt")["model"])
        return model
    return load_scan_model(cfg, ctx)


KMEANS_MAX_IMAGES = 20000
KMEANS_MAX_SIDE = 32


def write_assignments(path, reader, predictions, confidence) -> None:
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as handle:
        writer = csv.writer(handle)
        names = reader.names
        writer.writerow(["path" if names is not None else "index", "cluster", "confidence"])
        for i, (cluster, conf) in enumerate(zip(predictions.tolist(), confidence.tolist())):
            writer.writerow([names[i].decode() if names is not None else i, cluster, f"{conf:.6f}"])


def run(cfg, ctx, config_hash: str) -> dict:
    eval_set = ctx.eval_set
    model = ctx.prepare_model(final_model(cfg, ctx)).eval()
    logits = infer(ctx, model, "eval", desc="evaluate", out_path=ctx.stage_dir("evaluate") / "final_logits.npy")[0]
    if not ctx.is_main:
        return {"artifacts": {}, "metrics": {}}
    probs = torch.from_numpy(np.array(logits)).softmax(dim=1)
    confidence, predictions = probs.max(dim=1)
    run_dir = ctx.run_dir
    # Unreadable images (data.on_bad_image=skip) get cluster -1 in assignments.csv and count nowhere else.
    skipped = np.array(sorted(ctx.skipped["eval"]), dtype=np.int64)
    write_assignments(run_dir / "assignments.csv", eval_set, predictions.masked_fill(
        torch.from_numpy(np.isin(np.arange(len(eval_set)), skipped)), -1), confidence)
    keep = np.setdiff1d(np.arange(len(eval_set)), skipped)
    probs, confidence, predictions = probs[keep], confidence[keep], predictions[keep]
    targets = None if eval_set.targets is None else eval_set.targets[keep]
    labelled = targets is not None and bool((targets >= 0).any())

    results: dict = {"num_images": int(len(keep)), "skipped_images": int(len(skipped))}
    if labelled:
        results["final"] = M.cluster_metrics(targets, predictions.numpy(), probs.numpy())
        mapping = M.hungarian_match(targets, predictions.numpy(), cfg.num_clusters, eval_set.num_classes)
        confusion = M.confusion_matrix(targets, predictions.numpy(), mapping)
        run_report.write_confusion_png(run_dir / "confusion.png", confusion, eval_set.class_names,
                                   title=f"{cfg.name}: ACC {results['final']['acc']:.3f}")
        cluster_names = _cluster_names(mapping, eval_set.class_names, cfg.num_clusters)
        results["scan_heads"] = _score_scan_heads(cfg, ctx, targets, keep)
        if cfg.run.baseline:
            results["kmeans_pixels"] = kmeans_pixels(cfg, ctx, targets, keep)
    else:
        results["final"] = {"acc": None, "nmi": None, "ari": None, "ami": None}
        run_report.write_confusion_png(run_dir / "confusion.png", _cluster_sizes(predictions, cfg.num_clusters),
                                   None, title=f"{cfg.name}: cluster sizes (no labels)")
        cluster_names = None
    run_report.write_prototypes_png(run_dir / "prototypes.png", lambda rows: ctx.eval_images("eval", keep[rows]),
                                predictions.numpy(), confidence.numpy(), cfg.num_clusters, cluster_names=cluster_names)
    return {"artifacts": {"assignments": str(run_dir / "assignments.csv")}, "metrics": results}


def kmeans_pixels(cfg, ctx, targets, keep: np.ndarray) -> dict:
    """k-means on the pixels of (up to KMEANS_MAX_IMAGES evenly spaced, downsampled) evaluation images;
    `targets` are those of the kept rows `keep`."""
    count = min(len(keep), KMEANS_MAX_IMAGES)
    picks = np.unique(np.linspace(0, len(keep) - 1, num=count).astype(np.int64))
    rows, targets = keep[picks], targets[picks]
    parts = []
    for start in range(0, len(rows), 1024):
        images = ctx.eval_images("eval", rows[start:start + 1024])
        if images.shape[-1] > KMEANS_MAX_SIDE:
            images = F.interpolate(images.float(), size=(KMEANS_MAX_SIDE, KMEANS_MAX_SIDE), mode="bilinear",
                                   antialias=True, align_corners=False).round_().clamp_(0, 255).to(torch.uint8)
        parts.append(images)
    result = M.kmeans_baseline(torch.cat(parts), targets, cfg.num_clusters, seed=cfg.run.seed)
    result["num_images"] = int(len(rows))
    return result


def _cluster_names(mapping: dict, class_names, num_clusters: int):
    if class_names is None:
        return None
    return [class_names[mapping[c]] if c in mapping else "-" for c in range(num_clusters)]


def _cluster_sizes(predictions: torch.Tensor, num_clusters: int):
    return torch.bincount(predictions, minlength=num_clusters).numpy()[None, :]


def _score_scan_heads(cfg, ctx, targets, keep: np.ndarray) -> dict:
    """Every SCAN head's accuracy next to the one the label-free rule selected (diagnostic only), from the logits
    of every head on the evaluation images that the SCAN stage stored (read a chunk of rows at a time); and, for
    the clustering handed on, the share of images above selflabel.threshold and their accuracy (`confident_*`)."""
    saved = load_torch(ctx.run_dir / "scan" / "model.pt")
    logits = np.load(ctx.run_dir / "scan" / EVAL_LOGITS, mmap_mode="r")  # [N, H, C]
    members, perms = saved.get("ensemble"), np.asarray(saved.get("ensemble_perms"))
    best = int(saved["best_head"])
    identity = np.arange(logits.shape[2])[None, :]
    predictions, ensemble, head_confidence, ensemble_confidence = [], [], [], []
    for i in range(0, len(logits), 4096):
        chunk = np.swapaxes(np.asarray(logits[i:i + 4096]), 0, 1)  # [H, n, C]
        predictions.append(chunk.argmax(axis=2).T)
        # The selected head as an ensemble of one (identity alignment): its softmax's largest value per row.
        head_confidence.append(np.exp(head_consensus.ensemble_log_probs(chunk, [best], identity).max(axis=1)))
        if members is not None:
            log_probs = head_consensus.ensemble_log_probs(chunk, members, perms)
            ensemble.append(log_probs.argmax(axis=1))
            ensemble_confidence.append(np.exp(log_probs.max(axis=1)))
    predictions = np.concatenate(predictions)[keep]
    heads = [M.cluster_metrics(targets, predictions[:, h]) for h in range(predictions.shape[1])]
    rules = {rule: heads[int(saved[f"{rule}_head"])]["acc"] for rule in ("loss", "consensus", "tie")
             if f"{rule}_head" in saved}
    selected, handed_on, confidence = heads[best], predictions[:, best], np.concatenate(head_confidence)[keep]
    if ensemble:
        ensemble_predictions = np.concatenate(ensemble)[keep]
        scores = M.cluster_metrics(targets, ensemble_predictions)
        rules["ensemble"] = scores["acc"]
        if saved.get("select") == "ensemble":
            selected, handed_on = scores, ensemble_predictions
            confidence = np.concatenate(ensemble_confidence)[keep]
    # The pseudo-labels' quality, measured on the evaluation images (un-augmented; self-labelling thresholds a
    # teacher's weak views of the training images, so this is the closest labelled look at them).
    confident = M.confident_purity(targets, handed_on, confidence, cfg.selflabel.threshold,
                                   cfg.num_clusters, ctx.eval_set.num_classes)
    return {"selected_head": best, "selected": selected, "acc_per_head": [h["acc"] for h in heads],
            "acc_by_rule": rules, **{f"confident_{key}": value for key, value in confident.items()}}
