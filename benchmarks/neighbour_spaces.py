"""Diagnostic (reads labels): would re-mining the neighbours in the trained SCAN heads' space give purer neighbours?

SCAN mines its neighbours once, in the pretext space. The issue's "re-mining in the trained heads' space" proposes a
second round whose neighbours come from what the heads learnt. Before building that round, this script measures
what it could gain: for finished run folders (`scan.features=mined`, `mine.features` any), the k-NN label agreement
of the training images in

* ``mined``            -- the space the mine stage searched (its own neighbour file);
* ``head_probs``       -- every head's softmax output, concatenated ([N, H * C]);
* ``head_probs_sqrt``  -- the same, square-rooted (cosine of it is the Bhattacharyya overlap per head);
* ``mined+head_probs`` -- the mined vectors and the square-rooted probabilities, each unit-normalised, side by side;
* ``head_hidden``      -- the MLP heads' hidden layer, concatenated (heads with `scan.head_hidden > 0` only);
* ``pixel_weight=W``   -- with ``--pixel-weights``: the mined space rebuilt with `mine.pixel_weight=W` (runs with
  `mine.features=both`), to screen that setting without rerunning the mine stage.

Labels are read here, for the diagnostic only; no stage reads them before evaluate. One JSON line per run.

Usage::

    python benchmarks/neighbour_spaces.py runs/seeds/seed0 runs/seeds/seed1   # ~6 min per run on 2 cores
    python benchmarks/neighbour_spaces.py --no-heads --pixel-weights 0,0.5,0.75,1,1.25,1.5,2 runs/pre16/seed0   # ~2 min
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

from scan_dist.config import load_config  # noqa: E402
from scan_dist.context import RunContext  # noqa: E402
from scan_dist.io_utils import load_torch  # noqa: E402
from scan_dist.metrics import neighbor_agreement  # noqa: E402
from scan_dist.models.mined_space import SCALE, join, part_weights  # noqa: E402
from scan_dist.stages.mine import shard_neighbors  # noqa: E402


def head_outputs(state: dict, space: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(probabilities [H, N, C], hidden activations [H, N, hidden] or None) of every saved head on `space`."""
    weights = [state[f"heads.weights.{i}"] for i in range(2) if f"heads.weights.{i}" in state]
    biases = [state[f"heads.biases.{i}"] for i in range(len(weights))]
    x = (space * SCALE).unsqueeze(0).expand(weights[0].shape[0], -1, -1)
    hidden = None
    for layer, (w, b) in enumerate(zip(weights, biases)):
        x = torch.baddbmm(b, x, w)
        if layer < len(weights) - 1:
            x = hidden = F.relu(x)
    return x.softmax(dim=-1), hidden


def rows_first(per_head: torch.Tensor) -> torch.Tensor:
    """[H, N, D] -> [N, H * D]."""
    return per_head.permute(1, 0, 2).reshape(per_head.shape[1], -1)


def reweighted_spaces(run: Path, cfg, weights: list[float]) -> dict[str, torch.Tensor]:
    """{"pixel_weight=W": the training images' mined space as `mine.pixel_weight=W` would have built it}."""
    if not weights:
        return {}
    if cfg.mine.features != "both":
        raise SystemExit(f"{run}: mine.features={cfg.mine.features}; --pixel-weights needs mine.features=both")
    parts = [torch.from_numpy(np.load(run / "embed" / "train.npy")),  # the same two arrays the mine stage joined
             torch.from_numpy(np.load(run / "mine" / "train_pixel_pca.npy"))]
    return {f"pixel_weight={weight:g}": join(parts, part_weights(True, True, weight)) for weight in weights}


def head_spaces(run: Path) -> dict[str, torch.Tensor]:
    """The spaces built from the trained heads' outputs on the mined space."""
    space = torch.from_numpy(np.load(run / "mine" / "train_space.npy"))
    with torch.no_grad():
        probs, hidden = head_outputs(load_torch(run / "scan" / "model.pt")["model"], space)
    sqrt_probs = rows_first(probs.sqrt())
    spaces = {"head_probs": rows_first(probs), "head_probs_sqrt": sqrt_probs,
              "mined+head_probs": torch.cat([F.normalize(space, dim=1), F.normalize(sqrt_probs, dim=1)], dim=1)}
    if hidden is not None:
        spaces["head_hidden"] = rows_first(hidden)
    return spaces


def measure(run: Path, k: int | None, heads: bool = True, pixel_weights: list[float] | None = None) -> dict:
    cfg = load_config(str(run / "config.yaml"))
    if heads and cfg.scan.features != "mined":
        raise SystemExit(f"{run}: scan.features={cfg.scan.features}; this diagnostic reads heads on the mined space")
    # the stages' own reader of the training split (same subset, format detection and listing as the run)
    targets = RunContext(cfg, run, logging.getLogger("neighbour_spaces")).train_set.targets
    mined_nn = np.load(run / "mine" / "train_neighbors.npy", mmap_mode="r")
    k = k or mined_nn.shape[1]
    spaces = {**(head_spaces(run) if heads else {}), **reweighted_spaces(run, cfg, pixel_weights or [])}
    out = {"run": str(run), "k": k, "mined": round(neighbor_agreement(targets, np.asarray(mined_nn[:, :k])), 4)}
    if heads:
        out["heads"] = cfg.scan.num_heads
    started = time.perf_counter()
    for name, vectors in spaces.items():
        # the mine stage's own exact search (cosine = inner product of unit vectors), the image itself left out
        index = shard_neighbors(F.normalize(vectors, dim=1), k, "torch", torch.device("cpu"), "fp32", 0, len(vectors))
        out[name] = round(neighbor_agreement(targets, index.numpy()), 4)
    out["seconds"] = round(time.perf_counter() - started, 1)
    return out


def _weights(text: str) -> list[float]:
    try:
        weights = [float(item) for item in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, e.g. 0.5,1,2; got {text!r}") from None
    if any(weight < 0 for weight in weights):
        raise argparse.ArgumentTypeError(f"pixel weights must be >= 0; got {text!r}")
    return weights


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="finished run folders (scan/model.pt, mine/*.npy)")
    parser.add_argument("--k", type=int, default=None, help="neighbours per image (default: the mine stage's k)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--pixel-weights", type=_weights, default=[], metavar="W,W,...",
                        help="also the mined space rebuilt with each mine.pixel_weight W (mine.features=both runs)")
    parser.add_argument("--no-heads", action="store_true", help="skip the spaces of the trained heads' outputs")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    for run in args.runs:
        print(json.dumps(measure(run, args.k, heads=not args.no_heads, pixel_weights=args.pixel_weights)), flush=True)


if __name__ == "__main__":
    main()
