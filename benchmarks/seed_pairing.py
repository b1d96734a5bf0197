"""Diagnostic (reads finished runs' scores): does pairing an arm with the reference by seed cancel the seed?

A lever is measured as paired differences: the arm and the reference share each seed (`--seeds`, `--from`). That
removes the seed's effect only when the arm's final ACC on a seed follows the reference's on the same seed. This
prints the Pearson correlation between the reference's and the arms' final ACC over every (arm, seed) pair found,
for each group of arms given (e.g. SimCLR-side changes against changes after SimCLR), raw and within arms (both
sides centred on their means over each arm's seeds, so that arms run on different seeds do not pass their effects
off as agreement). Near 0: the arm is a new draw of the seed and its rows are as noisy as unpaired draws; near 1:
pairing cancels the seed.

Usage::

    python benchmarks/seed_pairing.py runs/base --group pretext runs/bs256 runs/crop07 \
        --group later runs/pca32 runs/wd0
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

if __package__ in (None, ""):  # run as a script: make the repo root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from scan_dist.report import ReportError, load_run  # noqa: E402


def final_acc_by_seed(folder: Path) -> dict[int, float]:
    """{seed: final ACC} of a `--seeds` folder's finished seed<S> runs, read as `scan_dist.report` reads a run."""
    scores = {}
    for metrics in sorted(folder.glob("seed*/metrics.json")):
        suffix = metrics.parent.name[len("seed"):]
        if suffix.isdigit():
            scores[int(suffix)] = load_run(metrics.parent)["acc"]
    return scores


def pairing(reference: dict[int, float], arms: dict[str, dict[int, float]]) -> dict:
    """Correlation of the reference's and the arms' final ACC over their shared seeds, raw and within arms."""
    ref, arm, ref_centred, arm_centred = [], [], [], []
    for scores in arms.values():
        seeds = sorted(set(scores) & set(reference))
        if not seeds:
            continue
        pair = np.array([[reference[s] for s in seeds], [scores[s] for s in seeds]])
        ref += list(pair[0])
        arm += list(pair[1])
        centred = pair - pair.mean(axis=1, keepdims=True)
        ref_centred += list(centred[0])
        arm_centred += list(centred[1])
    if len(ref) < 3:
        raise ValueError(f"{len(ref)} (arm, seed) pairs share a seed with the reference: at least 3 are needed")
    return {"pairs": len(ref), "corr": _corr(ref, arm), "corr_within_arms": _corr(ref_centred, arm_centred)}


def _corr(x: list[float], y: list[float]) -> float | None:
    """Pearson correlation to 3 digits; None where either side does not vary (it is undefined there)."""
    if np.std(x) == 0 or np.std(y) == 0:
        return None
    return round(float(np.corrcoef(x, y)[0, 1]), 3)


def _groups(argv: list[str]) -> tuple[Path, dict[str, list[Path]]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("reference", type=Path, help="the reference's --seeds folder")
    parser.add_argument("--group", nargs="+", action="append", required=True, metavar=("NAME", "ARM"),
                        help="a name, then the arms' --seeds folders")
    args = parser.parse_args(argv)
    groups = {}
    for name, *folders in args.group:
        if not folders:
            parser.error(f"--group {name}: give the arms' folders after the name")
        groups[name] = [Path(f) for f in folders]
    return args.reference, groups


def main(argv: list[str] | None = None) -> None:
    reference_dir, groups = _groups(sys.argv[1:] if argv is None else argv)
    try:
        reference = final_acc_by_seed(reference_dir)
    except ReportError as err:
        raise SystemExit(str(err))
    if not reference:
        raise SystemExit(f"{reference_dir}: no seed<S>/metrics.json (a finished --seeds folder is needed)")
    for name, folders in groups.items():
        try:
            row = pairing(reference, {str(f): final_acc_by_seed(f) for f in folders})
        except (ValueError, ReportError) as err:
            raise SystemExit(f"--group {name}: {err}")
        print(json.dumps({"group": name, **row}))


if __name__ == "__main__":
    main()
