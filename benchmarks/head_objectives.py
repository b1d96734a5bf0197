"""Diagnostic (reads labels): do other label-free ways of clustering a finished run's mined space beat SCAN's heads?

The SCAN stage trains `scan.num_heads` heads on the mined space and keeps one. This script retrains heads, or
clusters, on that same space of a finished run (`scan.features=mined`) and scores each method on the evaluation
images, so a method can be screened before it is built into a stage:

* ``scan``       -- SCAN heads retrained here with the run's own settings (the reference, in the same harness);
* ``temi``       -- heads trained with TEMI's objective (Adaloglou et al., BMVC 2023, read from the paper): the
  β-weighted pointwise mutual information of an image's and a neighbour's cluster probabilities, student against
  an EMA teacher, over a moving estimate of the cluster sizes, weighted by the teacher's agreement on the pair;
* ``scan@C``     -- SCAN heads with C > K clusters (over-clustering), merged to K clusters without labels by average
  linkage on the training k-NN graph (how many mined pairs join two clusters, over the product of their sizes);
* ``spectral``   -- spectral clustering of the symmetric training k-NN graph (10 leading eigenvectors of the
  normalised adjacency, k-means on their unit rows), handed to the evaluation images by a 20-NN vote;
* ``smooth=k``   -- the run's final predictions averaged with those of the k nearest evaluation images;
* ``mirror``     -- test-time flipping: the SCAN stage's clustering and the final model's, each with its softmax
  averaged over the evaluation image and its mirror image (width flipped), beside the same model without.

Per method: the best, median and worst head's accuracy and, for trained heads, the head the paper's lowest-loss
rule (SCAN loss on the evaluation images and their mined neighbours, as the stage's `scan.select=loss`) keeps.
Labels are read here, for the diagnostic only. One JSON line per run.

Usage::

    python benchmarks/head_objectives.py runs/pre16/seed0            # all methods, ~6 min per run on 2 cores (60k images)
    python benchmarks/head_objectives.py --methods spectral,smooth runs/pre16/seed0   # ~8 s
    python benchmarks/head_objectives.py --methods mirror runs/base/seed0                # ~15 s
"""
from __future__ import annotations

import argparse
import copy
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np
import scipy.sparse as sparse
import torch
from scipy.sparse.linalg import eigsh
from sklearn.cluster import KMeans

if __package__ in (None, ""):  # run as a script: make the repo root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from scan_dist import kernels  # noqa: E402
from scan_dist.config import load_config  # noqa: E402
from scan_dist.context import RunContext  # noqa: E402
from scan_dist.metrics import cluster_metrics  # noqa: E402
from scan_dist.models.heads import ClusterHeads  # noqa: E402
from scan_dist.models.mined_space import SCALE  # noqa: E402
from scan_dist.stages.common import load_scan_model  # noqa: E402
from scan_dist.stages.evaluate import final_model  # noqa: E402
from scan_dist.stages.mine import shard_neighbors  # noqa: E402
from scan_dist.stages.scan import selection_losses  # noqa: E402
from scan_dist.stages.selflabel import ema_update, mirror_averaged  # noqa: E402

METHODS = ("scan", "temi", "scan@C", "spectral", "smooth", "mirror")


def train_heads(train: torch.Tensor, neighbors: torch.Tensor, clusters: int, cfg, objective: str, seed: int,
                temi: dict) -> ClusterHeads:
    """`cfg.scan.num_heads` heads trained on (image, random mined neighbour) pairs for the SCAN stage's step count."""
    s = cfg.scan
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    heads = ClusterHeads(train.shape[1], clusters, s.num_heads, s.head_hidden)
    optimizer = torch.optim.Adam(heads.parameters(), lr=s.lr, weight_decay=s.weight_decay)
    steps = max(s.min_steps, s.epochs * (len(train) // s.batch_size))
    teacher = copy.deepcopy(heads).requires_grad_(False) if objective == "temi" else None
    sizes = torch.full((s.num_heads, 1, clusters), 1.0 / clusters)  # TEMI's moving cluster-size estimate
    for _ in range(steps):
        rows = torch.randint(len(train), (s.batch_size,), generator=generator)
        partners = neighbors[rows, torch.randint(neighbors.shape[1], (s.batch_size,), generator=generator)]
        batch = torch.cat([train[rows], train[partners]])
        logits = heads(batch)
        half = s.batch_size
        if teacher is None:
            loss = kernels.scan_loss(logits[:, :half], logits[:, half:], s.entropy_weight)[0].sum()
        else:
            with torch.no_grad():
                target = (teacher(batch) / temi["teacher_temp"]).softmax(-1)
                weight = (target[:, :half] * target[:, half:]).sum(-1).mean(0)  # the teacher's agreement, all heads
            student = (logits / temi["student_temp"]).softmax(-1)

            def pmi(p, q):  # clamped: the β-power's gradient at an exact 0 is infinite
                return torch.log(((p * q).clamp_min(1e-12) ** temi["beta"] / sizes).sum(-1))

            pair = pmi(student[:, :half], target[:, half:]) + pmi(student[:, half:], target[:, :half])
            loss = -(0.5 * pair * weight).mean(1).sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if teacher is not None:
            with torch.no_grad():
                sizes.lerp_(target.mean(1, keepdim=True), 1.0 - temi["size_momentum"])
            ema_update(teacher, heads, temi["teacher_momentum"])
    return (teacher or heads).eval()


def merge_clusters(assign: np.ndarray, neighbors: np.ndarray, clusters: int, target: int) -> np.ndarray:
    """A map cluster -> merged cluster (0..target-1): average linkage on the k-NN pairs joining two clusters."""
    links = np.zeros((clusters, clusters))
    np.add.at(links, (np.repeat(assign, neighbors.shape[1]), assign[neighbors].ravel()), 1.0)
    links = links + links.T
    size = np.bincount(assign, minlength=clusters).astype(float)
    groups = {c: [c] for c in range(clusters)}
    while len(groups) > target:
        alive = sorted(groups)
        score = links[np.ix_(alive, alive)] / (np.outer(size[alive], size[alive]) + 1e-9)
        np.fill_diagonal(score, -1.0)
        i, j = np.unravel_index(int(np.argmax(score)), score.shape)
        a, b = alive[i], alive[j]
        groups[a] += groups.pop(b)
        links[a] += links[b]
        links[:, a] += links[:, b]
        links[b], links[:, b] = 0.0, 0.0
        size[a] += size[b]
    mapping = np.zeros(clusters, dtype=np.int64)
    for new, members in enumerate(groups.values()):
        mapping[members] = new
    return mapping


def spectral(neighbors: np.ndarray, clusters: int, seed: int) -> np.ndarray:
    num, k = neighbors.shape
    graph = sparse.csr_matrix((np.ones(num * k), (np.repeat(np.arange(num), k), neighbors.ravel())), shape=(num, num))
    graph = ((graph + graph.T) > 0).astype(np.float64)
    scale = sparse.diags(1.0 / np.sqrt(np.asarray(graph.sum(1)).ravel()))
    _, vectors = eigsh(scale @ graph @ scale, k=clusters, which="LA")
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    return KMeans(clusters, n_init=10, random_state=seed).fit_predict(vectors)


def summary(targets: np.ndarray, predictions: list[np.ndarray], chosen: int | None = None) -> dict:
    accs = np.array([cluster_metrics(targets, p)["acc"] for p in predictions])
    out = {"best": round(float(accs.max()), 4), "median": round(float(np.median(accs)), 4),
           "worst": round(float(accs.min()), 4)}
    if chosen is not None:
        out["loss_rule"] = round(float(accs[chosen]), 4)
    return out


def measure(run: Path, methods: list[str], clusters_over: int, smooth_k: int, temi: dict) -> dict:
    cfg = load_config(str(run / "config.yaml"))
    if cfg.scan.features != "mined":
        raise SystemExit(f"{run}: scan.features={cfg.scan.features}; this diagnostic trains heads on the mined space")
    context = RunContext(cfg, run, logging.getLogger("head_objectives"))
    targets = np.asarray(context.eval_set.targets)
    train = torch.from_numpy(np.load(run / "mine" / "train_space.npy"))
    evaluation = torch.from_numpy(np.load(run / "mine" / "eval_space.npy"))
    mined = np.load(run / "mine" / "train_neighbors.npy")
    eval_mined = np.load(run / "mine" / "eval_neighbors.npy")
    K, seed = cfg.num_clusters, cfg.run.seed
    if "scan@C" in methods and clusters_over <= K:
        raise SystemExit(f"{run}: --overcluster {clusters_over} must exceed the run's num_clusters={K}")
    out: dict = {"run": str(run)}
    for method in methods:
        started = time.perf_counter()
        if method in ("scan", "temi", "scan@C"):
            clusters = clusters_over if method == "scan@C" else K
            heads = train_heads(train * SCALE, torch.from_numpy(mined), clusters, cfg,
                                "temi" if method == "temi" else "scan", seed, temi)
            with torch.no_grad():
                logits = heads(evaluation * SCALE)
            chosen = int(torch.argmin(selection_losses(logits, eval_mined, cfg.scan.select_entropy_weight)))
            predictions = list(logits.argmax(-1).numpy())
            if method == "scan@C":
                with torch.no_grad():
                    assign = heads(train * SCALE).argmax(-1).numpy()
                predictions = [merge_clusters(a, mined, clusters, K)[p] for a, p in zip(assign, predictions)]
                method = f"scan@{clusters}"
            out[method] = summary(targets, predictions, chosen)
        elif method == "spectral":
            labels = spectral(mined, K, seed)
            votes = labels[kernels.knn(evaluation, train, 20, metric="ip", backend="torch")[1].numpy()]
            out[method] = summary(targets, [np.array([np.bincount(v, minlength=K).argmax() for v in votes])])
        elif method == "smooth":
            probs = torch.from_numpy(np.load(run / "evaluate" / "final_logits.npy"))[:, 0].float().softmax(-1)
            # the mine stage's own exact search within the evaluation set, each image itself left out
            near = shard_neighbors(evaluation, smooth_k, "torch", torch.device("cpu"), "fp32", 0, len(evaluation))
            smoothed = 0.5 * probs + 0.5 * probs[near].mean(1)
            out["final"] = summary(targets, [probs.argmax(-1).numpy()])["best"]
            method = f"smooth={smooth_k}"
            out[method] = summary(targets, [smoothed.argmax(-1).numpy()])["best"]
        elif method == "mirror":
            out[method] = mirror_scores(context, cfg, targets)
        out[f"{method}_seconds"] = round(time.perf_counter() - started, 1)
    return out


@torch.no_grad()
def mirror_scores(context, cfg, targets: np.ndarray) -> dict:
    """ACC of the SCAN stage's clustering and of the final model, each alone and averaged over mirror images."""
    scores = {}
    for name, model in (("scan", load_scan_model(cfg, context)), ("final", final_model(cfg, context))):
        model.eval()
        averaged = mirror_averaged(model)  # the self-labelling stage's own mirror teacher (selflabel.teacher_flip)
        plain, both = [], []
        for batch in context.inference_batches("eval"):
            images = batch["views"][0]
            plain.append(model(images)[0])
            both.append(averaged(images)[0])
        scores[name] = summary(targets, [torch.cat(plain).argmax(-1).numpy()])["best"]
        scores[f"{name}+mirror"] = summary(targets, [torch.cat(both).argmax(-1).numpy()])["best"]
    return scores


def _methods(text: str) -> list[str]:
    chosen = [item.strip() for item in text.split(",") if item.strip()]
    unknown = [m for m in chosen if m not in METHODS]
    if unknown or not chosen:
        raise argparse.ArgumentTypeError(f"methods are a comma-separated subset of {','.join(METHODS)}; got {text!r}")
    return chosen


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="finished run folders (mine/*.npy, evaluate/final_logits.npy)")
    parser.add_argument("--methods", type=_methods, default=list(METHODS), help=f"subset of {','.join(METHODS)}")
    parser.add_argument("--overcluster", type=int, default=20, help="clusters of the scan@C heads before merging")
    parser.add_argument("--smooth-k", type=int, default=5, help="evaluation neighbours averaged by smooth")
    parser.add_argument("--temi-beta", type=float, default=0.6, help="TEMI's β (paper: 0.6)")
    parser.add_argument("--temi-temps", default="0.1,0.1", help="TEMI student,teacher softmax temperatures")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = parser.parse_args(argv)
    if args.overcluster < 2:
        parser.error("--overcluster must be at least 2")
    try:
        student_temp, teacher_temp = (float(v) for v in args.temi_temps.split(","))
    except ValueError:
        parser.error(f"--temi-temps expects two numbers, e.g. 0.1,0.04; got {args.temi_temps!r}")
    temi = {"beta": args.temi_beta, "student_temp": student_temp, "teacher_temp": teacher_temp,
            "teacher_momentum": 0.996, "size_momentum": 0.9}  # the paper's teacher EMA; sizes: a DINO-style centre
    if args.threads:
        torch.set_num_threads(args.threads)
    for run in args.runs:
        print(json.dumps(measure(run, args.methods, args.overcluster, args.smooth_k, temi)), flush=True)


if __name__ == "__main__":
    main()
