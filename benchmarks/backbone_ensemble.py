"""Diagnostic (reads labels): does a mined space built from several pretext backbones cluster better than one?

The demo's accuracy varies most with the seed, and that variance comes from the SimCLR backbone (README,
"What the passes established"). A cheap way to average it out would be to train several backbones and mine in
their joint space. This script screens that before it is built into the stages: given finished runs of the same
data and recipe with different seeds, it retrains SCAN heads (benchmarks/head_objectives.py's harness, each
run's own settings) on

* each run's own mined space (as the mine stage built it, so the harness's reference sits beside the ensemble);
* the joint space: every run's pretext embedding L2-normalised and concatenated, as the embedding part, beside
  the first run's pixel PCA (weights as `mine.pixel_weight` of the first run), so a cosine in it is the mean of
  the backbones' cosines blended with the pixels' exactly as the mine stage blends one backbone's.

Neighbours are mined in each space (`mine.k` on train, `mine.eval_k` within the evaluation images, for the
paper's lowest-loss rule); heads are scored on the evaluation images. One JSON line per space: best, median and
worst head, the head the lowest-loss rule keeps, and the 20-NN label agreement of the evaluation images.

Usage::

    python benchmarks/backbone_ensemble.py runs/base/seed0 runs/base/seed1    # ~3 min a space on 2 cores (60k images)
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

if __package__ in (None, ""):  # run as a script: make the repo root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.head_objectives import summary, train_heads  # noqa: E402
from scan_dist.config import load_config  # noqa: E402
from scan_dist.context import RunContext  # noqa: E402
from scan_dist.metrics import neighbor_agreement  # noqa: E402
from scan_dist.models.mined_space import SCALE, join  # noqa: E402
from scan_dist.stages.mine import shard_neighbors  # noqa: E402
from scan_dist.stages.scan import selection_losses  # noqa: E402


def _load(run: Path, name: str) -> torch.Tensor:
    path = run / name
    if not path.exists():
        raise SystemExit(f"{run}: {name} is missing; this diagnostic needs a finished run with mine.features=both")
    return torch.from_numpy(np.load(path)).float()


def joint_space(runs: list[Path], split: str, pixel_weight: float) -> torch.Tensor:
    """The mined vectors of `split` built from every run's pretext embedding and the first run's pixel PCA."""
    embedding = torch.cat([F.normalize(_load(run, f"embed/{split}.npy"), dim=1) for run in runs], dim=1)
    return join([embedding, _load(runs[0], f"mine/{split}_pixel_pca.npy")], [1.0, pixel_weight])


def _neighbors(vectors: torch.Tensor, k: int) -> torch.Tensor:
    """The mine stage's exact search (CPU, fp32) of every row among the others."""
    return shard_neighbors(vectors, k, "torch", torch.device("cpu"), "fp32", 0, len(vectors))


def score_space(cfg, train: torch.Tensor, evaluation: torch.Tensor, targets: np.ndarray) -> dict:
    heads = train_heads(train * SCALE, _neighbors(train, cfg.mine.k), cfg.num_clusters, cfg, "scan", cfg.run.seed, {})
    with torch.no_grad():
        logits = heads(evaluation * SCALE)
    eval_neighbors = _neighbors(evaluation, cfg.mine.eval_k).numpy()
    chosen = int(torch.argmin(selection_losses(logits, eval_neighbors, cfg.scan.select_entropy_weight)))
    out = summary(targets, list(logits.argmax(-1).numpy()), chosen)
    out["eval_20nn_agreement"] = round(neighbor_agreement(targets, _neighbors(evaluation, 20)), 4)
    return out


def measure(runs: list[Path]) -> list[dict]:
    cfg = load_config(str(runs[0] / "config.yaml"))
    if cfg.mine.features != "both" or cfg.scan.features != "mined":
        raise SystemExit(f"{runs[0]}: needs mine.features=both and scan.features=mined "
                         f"(has {cfg.mine.features}, {cfg.scan.features})")
    targets = np.asarray(RunContext(cfg, runs[0], logging.getLogger("backbone_ensemble")).eval_set.targets)
    spaces = [(str(run), [run]) for run in runs] + [("+".join(str(run) for run in runs), runs)]
    results = []
    for name, members in spaces:
        started = time.perf_counter()
        member_cfg = load_config(str(members[0] / "config.yaml"))  # each single space with its own run's seed
        train, evaluation = (joint_space(members, split, cfg.mine.pixel_weight) for split in ("train", "eval"))
        out = {"space": name, "backbones": len(members), **score_space(member_cfg, train, evaluation, targets)}
        out["seconds"] = round(time.perf_counter() - started, 1)
        results.append(out)
        print(json.dumps(out), flush=True)
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("runs", nargs="+", type=Path,
                        help="finished run folders of the same data and recipe, different seeds (embed/, mine/)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = parser.parse_args(argv)
    if len(args.runs) < 2:
        parser.error("give at least two runs: the ensemble joins their backbones")
    if args.threads:
        torch.set_num_threads(args.threads)
    measure(args.runs)


if __name__ == "__main__":
    main()
