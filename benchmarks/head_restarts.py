"""Diagnostic (reads labels): would more starts of the SCAN heads, screened early by the loss rule, find better heads?

Trains a large population of SCAN heads (`--heads`, default 120) on a finished run's mined space
(`scan.features=mined`) with the run's own settings, and records every head's label-free selection loss (the
`scan.select=loss` rule: SCAN loss on the evaluation images and their mined neighbours) and its accuracy at a few
steps (`--checks`) and at the end. Heads train independently (the loss is a sum over heads, Adam's state is per
parameter), so any subset of the population is a run with that many heads, and a screen that keeps the lowest-loss
heads at step S is a run that dropped the others there. From one population it then estimates, over random
subsets (`--draws`):

* ``best_of``: the accuracy the loss rule keeps among N heads (N = 10, 30, 60, 90, all), mean ± std;
* ``screen``: C candidates, the `keep` (default 30, the demo's scan.num_heads) of lowest loss at step S trained on,
  then the loss rule at the end -- what `scan.candidate_heads=C` with S = scan.screen_fraction x steps does.

Costs are in head-steps (a head trained one step): the demo's 30 heads for 1,755 steps are 52,650.

Usage::

    python benchmarks/head_restarts.py --threads 2 --population-out pop0.json runs/base/seed0   # ~12 min, 2 cores
    python benchmarks/head_restarts.py --from-population pop0.json pop1.json                   # seconds
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
from scipy.stats import spearmanr

if __package__ in (None, ""):  # run as a script: make the repo root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from scan_dist import kernels  # noqa: E402
from scan_dist.config import load_config  # noqa: E402
from scan_dist.context import RunContext  # noqa: E402
from scan_dist.io_utils import write_json  # noqa: E402
from scan_dist.metrics import cluster_metrics  # noqa: E402
from scan_dist.models.heads import ClusterHeads  # noqa: E402
from scan_dist.models.mined_space import SCALE  # noqa: E402
from scan_dist.stages.scan import selection_losses  # noqa: E402


def train_population(train: torch.Tensor, neighbors: torch.Tensor, evaluation: torch.Tensor, eval_neighbors,
                     clusters: int, scan, heads: int, checks: list[int], seed: int) -> tuple[int, dict]:
    """`heads` SCAN heads on (image, random mined neighbour) pairs for the SCAN stage's step count; returns
    (steps, {step: (selection losses [H], evaluation predictions [H, N])}) at each of `checks` and at the end."""
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    population = ClusterHeads(train.shape[1], clusters, heads, scan.head_hidden)
    optimizer = torch.optim.Adam(population.parameters(), lr=scan.lr, weight_decay=scan.weight_decay)
    steps = max(scan.min_steps, scan.epochs * (len(train) // scan.batch_size))
    recorded = {}
    for step in range(1, steps + 1):
        rows = torch.randint(len(train), (scan.batch_size,), generator=generator)
        partners = neighbors[rows, torch.randint(neighbors.shape[1], (scan.batch_size,), generator=generator)]
        logits = population(torch.cat([train[rows], train[partners]]))
        half = scan.batch_size
        loss = kernels.scan_loss(logits[:, :half], logits[:, half:], scan.entropy_weight)[0].sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step in checks or step == steps:
            with torch.no_grad():
                logits = population(evaluation)
            losses = selection_losses(logits, eval_neighbors, scan.select_entropy_weight).numpy()
            recorded[step] = (losses, logits.argmax(-1).numpy())
    return steps, recorded


def simulate(final_loss: np.ndarray, final_acc: np.ndarray, candidates: int, draws: int, rng,
             screen_loss: np.ndarray | None = None, keep: int = 0) -> tuple[float, float]:
    """Mean and std, over `draws` random subsets of `candidates` heads, of the accuracy of the head the loss rule
    keeps at the end; with `screen_loss`, only the `keep` of lowest screen loss in each subset go on."""
    kept = []
    for _ in range(draws):
        subset = rng.choice(len(final_loss), candidates, replace=False)
        if screen_loss is not None:
            subset = subset[np.argsort(screen_loss[subset], kind="stable")[:keep]]
        kept.append(final_acc[subset[np.argmin(final_loss[subset])]])
    return float(np.mean(kept)), float(np.std(kept))


def rank_correlation(a: np.ndarray, b: np.ndarray) -> float | None:
    """Spearman's rho, or None where either side is constant (every head equally good: no ranking to measure)."""
    if np.ptp(a) == 0 or np.ptp(b) == 0:
        return None
    return round(float(spearmanr(a, b)[0]), 3)


def summarise(steps: int, losses: dict, accs: dict, keep: int, draws: int, seed: int) -> dict:
    """The estimates from a population's selection losses and accuracies ({step: [H]}, the last at `steps`)."""
    final_loss, final_acc = np.asarray(losses[steps]), np.asarray(accs[steps])
    heads, rng = len(final_acc), np.random.default_rng(seed)
    out = {"heads": heads, "steps": steps, "best": round(float(final_acc.max()), 4),
           "median": round(float(np.median(final_acc)), 4),
           "spearman_loss_acc": rank_correlation(final_loss, final_acc),
           "early_spearman": {str(step): rank_correlation(np.asarray(losses[step]), final_acc)
                              for step in sorted(losses) if step != steps},
           "best_of": {}, "screen": {}}
    for n in sorted({n for n in (10, 30, 60, 90) if n < heads} | {heads}):
        mean, std = simulate(final_loss, final_acc, n, draws, rng)
        out["best_of"][str(n)] = {"acc": round(mean, 4), "std": round(std, 4), "head_steps": n * steps}
    for candidates in sorted({c for c in (60, 90) if keep < c < heads} | {heads}):
        for step in sorted(s for s in losses if s != steps):
            mean, std = simulate(final_loss, final_acc, candidates, draws, rng, np.asarray(losses[step]), keep)
            out["screen"][f"{candidates}@{step}"] = {"acc": round(mean, 4), "std": round(std, 4),
                                                     "head_steps": candidates * step + keep * (steps - step)}
    return out


def measure(run: Path, heads: int, checks: list[int], keep: int, draws: int,
            population_out: Path | None = None) -> dict:
    cfg = load_config(str(run / "config.yaml"))
    if cfg.scan.features != "mined":
        raise SystemExit(f"{run}: scan.features={cfg.scan.features}; this diagnostic trains heads on the mined space")
    if heads <= keep:
        raise SystemExit(f"--heads {heads} must exceed --keep {keep}")
    targets = np.asarray(RunContext(cfg, run, logging.getLogger("head_restarts")).eval_set.targets)
    space = {name: torch.from_numpy(np.load(run / "mine" / f"{name}_space.npy")) * SCALE for name in ("train", "eval")}
    started = time.perf_counter()
    steps, recorded = train_population(space["train"], torch.from_numpy(np.load(run / "mine" / "train_neighbors.npy")),
                                       space["eval"], np.load(run / "mine" / "eval_neighbors.npy"), cfg.num_clusters,
                                       cfg.scan, heads, checks, cfg.run.seed)
    losses = {step: loss for step, (loss, _) in recorded.items()}
    accs = {step: [cluster_metrics(targets, p)["acc"] for p in predictions]
            for step, (_, predictions) in recorded.items()}
    out = {"run": str(run), "seconds": round(time.perf_counter() - started, 1),
           **summarise(steps, losses, accs, keep, draws, cfg.run.seed)}
    if population_out:
        write_json(population_out, {"run": str(run), "steps": steps, "accs": accs,
                                    "losses": {step: values.tolist() for step, values in losses.items()}})
    return out


def summarise_file(path: Path, keep: int, draws: int, seed: int) -> dict:
    """The estimates from a population kept by --population-out (no training)."""
    kept = json.loads(Path(path).read_text())
    losses = {int(step): values for step, values in kept["losses"].items()}
    accs = {int(step): values for step, values in kept["accs"].items()}
    return {"run": kept["run"], "population": str(path), **summarise(kept["steps"], losses, accs, keep, draws, seed)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("runs", nargs="*", type=Path, help="finished run folders (mine/*_space.npy, *_neighbors.npy)")
    parser.add_argument("--population-out", type=Path, default=None,
                        help="with one run: keep the population's losses and accuracies in this JSON file")
    parser.add_argument("--from-population", type=Path, nargs="+", default=[],
                        help="population files kept by --population-out: summarise them again, no training")
    parser.add_argument("--seed", type=int, default=0, help="subset draws of --from-population")
    parser.add_argument("--heads", type=int, default=120, help="heads in the population")
    parser.add_argument("--checks", default="100,200,400,800", help="steps at which losses and accuracies are kept")
    parser.add_argument("--keep", type=int, default=30, help="heads a screen keeps (the run's scan.num_heads)")
    parser.add_argument("--draws", type=int, default=2000, help="random subsets per estimate")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = parser.parse_args(argv)
    try:
        checks = sorted({int(v) for v in args.checks.split(",") if v.strip()})
    except ValueError:
        parser.error(f"--checks expects comma-separated step numbers, e.g. 100,200; got {args.checks!r}")
    if not args.runs and not args.from_population:
        parser.error("give run folders, or population files with --from-population")
    if args.population_out and len(args.runs) != 1:
        parser.error("--population-out takes one run folder")
    if args.threads:
        torch.set_num_threads(args.threads)
    for run in args.runs:
        print(json.dumps(measure(run, args.heads, checks, args.keep, args.draws, args.population_out)), flush=True)
    for path in args.from_population:
        print(json.dumps(summarise_file(path, args.keep, args.draws, args.seed)), flush=True)


if __name__ == "__main__":
    main()
