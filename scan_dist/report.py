"""Compare finished runs with each other and with the SCAN paper: `python -m scan_dist.report RUN_DIR [...]`.

Reads the run folders (``metrics.json`` and ``config.yaml``) and writes final ACC/NMI/ARI per setup as mean ± std
over seeds next to the paper's numbers, accuracy and time per stage, an over-clustering table when one preset was
run with several K, the changes against a reference setup (an ablation table: paired by seed where the change
comes after SimCLR, unpaired where it retrains SimCLR), and bar / line plots.
A setup is a preset, K and every setting that changes a stage's result (stage_keys.py), so runs that differ only in
threads, workers or the seed are one setup's seeds, and a run with ``mine.k=10`` is another setup. One run's own
artifacts (its report.md, PNGs, tables) are `run_report.py`'s.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from .reproducibility import KIND_KEYS, kind_label, same_kind
from .run_report import _md_table, _save_figure, atomic_write_text
from .stage_keys import result_settings, settings_of

__all__ = ["PAPER_RESULTS", "ReportError", "format_comparison_md", "load_run", "main", "mean_std",
           "write_comparison_plots"]


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
    ``setup`` (dotted key -> value of every setting that changes a result, except the seed and K),
    ``simclr_setup`` (the same for the settings that SimCLR's result depends on: a change there trains another
    backbone), ``seed``, ``acc``/``nmi``/``ari`` (final model), ``acc_many_to_one``, ``clusters_used`` (distinct
    predicted clusters), ``num_classes``, ``scan_acc`` (what the SCAN stage handed on without labels: a head or an
    ensemble, before self-labelling), ``best_head_acc`` (the SCAN stage's best single head by the labels: what a perfect
    selection rule would hand on),
    ``selflabel`` (whether that stage ran), ``kmeans_acc`` (the k-means-on-pixels baseline), ``seconds``
    (stage -> seconds, with ``total``) and ``machines`` (stage -> the reproducibility.machine() record it ran on,
    for the stages that kept one; a stage copied by --from keeps its source's). Raises :class:`ReportError` for a
    folder that is not a finished run.
    """
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
    machines = metrics.get("machines") if isinstance(metrics.get("machines"), Mapping) else {}
    return {
        "path": path,
        "label": path.resolve().name or str(path),
        "preset": str(metrics.get("preset") or config.get("name") or path.resolve().name),
        "num_clusters": int(k) if k is not None else None,
        "seed": run_cfg.get("seed"),
        "setup": _setup(config),
        "simclr_setup": _simclr_setup(config),
        "acc": _fraction(metrics.get("acc", final.get("acc"))),
        "nmi": _fraction(metrics.get("nmi", final.get("nmi"))),
        "ari": _fraction(metrics.get("ari", final.get("ari"))),
        "acc_many_to_one": _fraction(final.get("acc_many_to_one")),
        "clusters_used": final.get("num_clusters"),
        "num_classes": final.get("num_classes"),
        "scan_acc": _fraction(selected.get("acc")),
        "best_head_acc": _best_head(heads.get("acc_per_head")),
        "selflabel": "selflabel" in stages,
        "kmeans_acc": _fraction(baseline.get("acc")) if isinstance(baseline, Mapping) else None,
        "seconds": {str(name): float(sec) for name, sec in seconds.items() if _fraction(sec) is not None},
        "machines": {str(stage): dict(info) for stage, info in machines.items() if isinstance(info, Mapping)},
    }


def _best_head(per_head: Any) -> float | None:
    """The highest of the heads' accuracies (metrics.json's acc_per_head), None when absent."""
    scores = [v for v in map(_fraction, per_head) if v is not None] if isinstance(per_head, list) else []
    return max(scores, default=None)


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


def _setup(config: Mapping[str, Any]) -> dict[str, Any]:
    """The run's result-changing settings but the seed and K (K has its own column), from its config.yaml."""
    setup = result_settings(config)
    setup.pop("num_clusters", None)
    return setup


def _simclr_setup(config: Mapping[str, Any]) -> dict[str, Any]:
    """The pretext stage's settings but the seed: two setups that differ here train different backbones."""
    setup = settings_of(config, "pretext")
    setup.pop("run.seed", None)
    return setup


_UNSET = object()
_MAX_SHOWN_CHANGES = 4


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=str)


def _shown(value: Any) -> str:
    if value is _UNSET:
        return "(unset)"
    return value if isinstance(value, str) else _canonical(value)


def setup_change(reference: Mapping[str, Any], setup: Mapping[str, Any]) -> str:
    """'mine.k=10 scan.epochs=30': the settings where ``setup`` differs from ``reference`` ('' when none)."""
    changed = [key for key in sorted(set(reference) | set(setup))
               if _canonical(reference.get(key, _UNSET)) != _canonical(setup.get(key, _UNSET))]
    shown = " ".join(f"{key}={_shown(setup.get(key, _UNSET))}" for key in changed[:_MAX_SHOWN_CHANGES])
    if len(changed) > _MAX_SHOWN_CHANGES:
        shown += f" (+{len(changed) - _MAX_SHOWN_CHANGES} more)"
    return shown


def run_changes(runs: Sequence[Mapping[str, Any]]) -> list[str]:
    """Per run, how its setup differs from the first run of the same preset ('' for that reference setup), and,
    where a setup holds one seed on two kinds of machine, what sets the run's machine apart (_split_by_machine)."""
    references: dict[str, Mapping[str, Any]] = {}
    changes = [setup_change(references.setdefault(run["preset"], run.get("setup", {})), run.get("setup", {}))
               for run in runs]
    return _split_by_machine(runs, changes)


def _split_by_machine(runs: Sequence[Mapping[str, Any]], changes: Sequence[str]) -> list[str]:
    """A setup that holds a seed twice, on two kinds of machine, holds two draws of that seed (the kernels' float
    sums differ, and SCAN grows the difference: README, "Measured results"), so averaging them as seeds would
    count the seed twice and pairing by seed would pick one at random. Its runs on a kind other than its first
    run's are named by what sets their machine apart ('[cpu_capability=AVX2]'), which makes each kind a setup of
    its own; the changes table compares them unpaired. A setup whose seeds are distinct stays whole, machines and
    all (its "Same machine" column says how far its pairs can be trusted)."""
    every = machine_kinds(*runs)
    by_setup: dict[tuple[str, Any, str], list[int]] = {}
    for i, (run, change) in enumerate(zip(runs, changes)):
        by_setup.setdefault((run["preset"], run["num_clusters"], change), []).append(i)
    named = list(changes)
    for indices in by_setup.values():
        seeds = [runs[i]["seed"] for i in indices if runs[i]["seed"] is not None]
        used = [_kinds_used(runs[i], every) for i in indices]
        if len(seeds) == len(set(seeds)) or all(kinds == used[0] for kinds in used):
            continue
        for i, kinds in zip(indices, used):
            if kinds != used[0]:
                named[i] = f"{changes[i]} [{_machine_tag(kinds, used[0])}]".lstrip()
    return named


def _machine_tag(kinds: Sequence[Mapping[str, Any]], first: Sequence[Mapping[str, Any]]) -> str:
    """'cpu_capability=AVX2': the machine entries where a run's kind differs from the setup's first run's;
    'cpu_capability=AVX2 + AVX512' for a run whose stages ran on kinds that differ in that one entry, in stage
    order; otherwise 'on' and the kinds in words."""
    if len(first) == 1:
        differ = [key for key in KIND_KEYS if any(kind.get(key) != first[0].get(key) for kind in kinds)]
        if len(differ) == 1:
            return f"{differ[0]}=" + " + ".join(str(kind.get(differ[0])) for kind in kinds)
        if len(kinds) == 1 and differ:
            return " ".join(f"{key}={kinds[0].get(key)}" for key in differ)
    return "on " + " + ".join(kind_label(kind) for kind in kinds)


def group_runs(runs: Sequence[Mapping[str, Any]]) -> dict[tuple[str, Any, str], list[Mapping[str, Any]]]:
    """Runs keyed by (preset, num_clusters, change against the preset's first run), in first-seen order; each
    group's runs are the seeds of one setup."""
    groups: dict[tuple[str, Any, str], list[Mapping[str, Any]]] = {}
    for run, change in zip(runs, run_changes(runs)):
        groups.setdefault((run["preset"], run["num_clusters"], change), []).append(run)
    return groups


def _setup_name(preset: str, change: str) -> str:
    return f"{preset} {change}" if change else preset


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


def _richer(a: Mapping[str, Any], b: Mapping[str, Any]) -> Mapping[str, Any]:
    """Of two records of one kind, the one that names more (a newer record also names the instruction set)."""
    return b if sum(b.get(k) is not None for k in KIND_KEYS) > sum(a.get(k) is not None for k in KIND_KEYS) else a


def machine_kinds(*runs: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    """The distinct kinds of machine the runs' stages ran on (reproducibility.same_kind), in stage order, each the
    richest record of its kind: one for a run made in one place, two for a --from run finished elsewhere."""
    kinds: list[Mapping[str, Any]] = []
    for info in (info for run in runs for info in run.get("machines", {}).values()):
        for i, kind in enumerate(kinds):
            if same_kind(kind, info):
                kinds[i] = _richer(kind, info)
                break
        else:
            kinds.append(info)
    return kinds


def run_machine(run: Mapping[str, Any], kinds: Sequence[Mapping[str, Any]] | None = None) -> str:
    """The kind of machine a run ran on, in words: its stages' kinds, each once ('?' when none was kept), each stage
    named by the first of `kinds` (machine_kinds of several runs, so that they share names) it is of."""
    return " + ".join(kind_label(kind) for kind in _kinds_used(run, kinds)) or "?"


def _kinds_used(run: Mapping[str, Any], kinds: Sequence[Mapping[str, Any]] | None = None) -> list[Mapping[str, Any]]:
    """The kinds (of `kinds`, default the run's own) its stages ran on, each once, in stage order."""
    kinds = machine_kinds(run) if kinds is None else kinds
    used: list[Mapping[str, Any]] = []
    for info in run.get("machines", {}).values():
        kind = next(kind for kind in kinds if same_kind(kind, info))
        if kind not in used:
            used.append(kind)
    return used


def same_machine(a: Mapping[str, Any], b: Mapping[str, Any]) -> bool | None:
    """Whether every stage both runs kept a machine record for ran on one kind of machine (a stage one --from
    run copied from the other is the same record); None when they share no recorded stage."""
    machines_a, machines_b = a.get("machines", {}), b.get("machines", {})
    verdicts = [same_kind(machines_a[stage], machines_b[stage]) for stage in machines_a if stage in machines_b]
    if not verdicts:
        return None
    return all(verdicts)


def _same_machine_cell(verdicts: Sequence[bool | None]) -> str:
    """'3 of 3', '1 of 3', '2 of 3 (1 unknown)': how many comparisons ran on one kind of machine."""
    if not verdicts:
        return _DASH
    unknown = sum(v is None for v in verdicts)
    cell = f"{sum(v is True for v in verdicts)} of {len(verdicts)}"
    return f"{cell} ({unknown} unknown)" if unknown else cell


def _machines_md(runs: Sequence[Mapping[str, Any]]) -> list[str]:
    """A table of the machine kinds the runs ran on, when they ran on more than one (empty otherwise)."""
    every = machine_kinds(*runs)
    kinds: dict[str, list[str]] = {}
    for run in runs:
        kinds.setdefault(run_machine(run, every), []).append(run["label"])
    if len(kinds) < 2:
        return []
    lines = ["", "## Machines", ""]
    lines += _md_table(["Machine", "n", "Runs"], [[kind, len(labels), ", ".join(labels)]
                                                   for kind, labels in kinds.items()], "lrl")
    lines += ["", "These runs ran on more than one kind of machine. A seed repeats its digits only on one kind "
              "(processor and the instruction set torch's CPU kernels use, threads, torch build, GPU; "
              "run.cpu_kernels=avx2 gives an AVX-512 processor the digits of an AVX2 one of its vendor): on another "
              "it is another draw of the same distribution, so a Δ between runs of two kinds holds that draw too "
              "(the changes table's \"Same machine\" column counts the comparisons that do not). A setup that holds "
              "one seed on two kinds is split by kind: its runs on another kind than its first run's are named by "
              "what sets that kind apart, e.g. [cpu_capability=AVX2], and compared unpaired."]
    return lines


def _changes_md(groups: Mapping[tuple[str, Any, str], Sequence[Mapping[str, Any]]]) -> list[str]:
    """The ablation table: each changed setup against its preset's reference setup at the same K.

    A change after SimCLR is compared seed by seed: the runs share everything upstream of the change (a `--from`
    run even shares the unchanged stages' files), so the per-seed difference removes most of the seed-to-seed
    spread that a difference of two means keeps. A change to SimCLR or its views (any pretext-stage setting,
    stage_keys.STAGE_KEYS["pretext"]) trains another backbone from the same seed, whose result does not follow the
    reference's (demo: correlation -0.12 against 0.67 for later changes, benchmarks/seed_pairing.py), so pairing
    would cancel nothing and throw away the reference seeds that have no partner: such a row compares the two
    setups' means over all their seeds, with Welch's interval. Empty when no group is a change of another.
    """
    rows = []
    for (preset, k, change), members in groups.items():
        reference = groups.get((preset, k, ""))
        if not change or reference is None:
            continue
        if members[0].get("setup") == reference[0].get("setup"):  # the same settings on another kind of machine
            rows.append(_unpaired_row(preset, k, change, members, reference, "unpaired (another machine)"))
            continue
        if members[0]["simclr_setup"] != reference[0]["simclr_setup"]:
            rows.append(_unpaired_row(preset, k, change, members, reference))
            continue
        by_seed = {r["seed"]: r for r in reference if r["seed"] is not None}
        pairs = [(r, by_seed[r["seed"]]) for r in members if r["seed"] in by_seed]
        final = [100 * (r["acc"] - ref["acc"]) for r, ref in pairs if r["acc"] is not None and ref["acc"] is not None]
        scan = [100 * (r["scan_acc"] - ref["scan_acc"]) for r, ref in pairs
                if r["scan_acc"] is not None and ref["scan_acc"] is not None]
        seconds = [r["seconds"]["total"] - ref["seconds"]["total"] for r, ref in pairs
                   if "total" in r["seconds"] and "total" in ref["seconds"]]
        rows.append([preset, _DASH if k is None else k, change, "by seed", len(pairs),
                     _seeds([r for r, _ in pairs]) or _DASH, _points(scan), _points(final), _interval(final),
                     ", ".join(f"{d:+.1f}" for d in final) or _DASH,
                     f"{sum(d > 0 for d in final)} of {len(final)}" if final else _DASH,
                     f"{sum(seconds) / len(seconds):+.0f}" if seconds else _DASH,
                     _same_machine_cell([same_machine(r, ref) for r, ref in pairs])])
    if not rows:
        return []
    lines = ["", "## Changes against the reference setup", ""]
    lines += _md_table(["Preset", "K", "Change", "Compared", "n", "Seeds", "Δ SCAN stage ACC", "Δ final ACC",
                        "95 % interval", "Δ final, per seed", "Better in", "Δ time (s)", "Same machine"], rows,
                       "lrllrlrrrlrrr")
    lines += ["", "Reference: the first run of the preset in the command line and every seed of its setup. Δ in "
              "points. Compared by seed (a change after SimCLR): Δ = change − reference on the same seed, mean ± "
              "sample std over the paired seeds (seeds without a reference run are left out); 95 % interval: "
              "Student's t interval of the mean Δ final. Unpaired (a change to SimCLR or its views, which trains "
              "another backbone from the same seed, so its pairs would cancel nothing: README, \"A changed SimCLR "
              "is a new draw\"): Δ = the change's mean over its seeds − the reference's mean over all of its seeds; "
              "n = the change's runs vs the reference's; 95 % interval: Welch's t interval of that difference. A "
              "change whose interval holds 0 is not shown to help or hurt. Better in: paired seeds where the "
              "change's final ACC is higher. Δ time: the whole run's seconds, stages copied by --from counted at "
              "their source's time. Same machine: the pairs (unpaired: the change's runs against every reference "
              "run) whose stages ran on one kind of machine; on another kind a seed is another draw, so a pair "
              "that is not cancels less of the seed's spread."]
    return lines


def _unpaired_row(preset: str, k: Any, change: str, members: Sequence[Mapping[str, Any]],
                  reference: Sequence[Mapping[str, Any]], compared: str = "unpaired (SimCLR retrained)") -> list[Any]:
    """A row of the changes table for a setup that retrains SimCLR (or runs on another kind of machine):
    differences of means over all seeds."""

    def delta(key: str) -> str:
        ours, theirs = mean_std([r[key] for r in members])[0], mean_std([r[key] for r in reference])[0]
        return _DASH if ours is None or theirs is None else f"{100 * (ours - theirs):+.1f}"

    def total(runs: Sequence[Mapping[str, Any]]) -> float | None:
        return mean_std([r["seconds"].get("total") for r in runs])[0]

    ours_s, theirs_s = total(members), total(reference)
    return [preset, _DASH if k is None else k, change, compared, f"{len(members)} vs {len(reference)}",
            _seeds(members), delta("scan_acc"), delta("acc"),
            _welch_interval([100 * r["acc"] for r in members if r["acc"] is not None],
                            [100 * r["acc"] for r in reference if r["acc"] is not None]),
            _DASH, _DASH, _DASH if ours_s is None or theirs_s is None else f"{ours_s - theirs_s:+.0f}",
            _same_machine_cell([_all_same(r, reference) for r in members])]


def _all_same(run: Mapping[str, Any], others: Sequence[Mapping[str, Any]]) -> bool | None:
    """same_machine of ``run`` with each of ``others``: False if any differs, None if any is unknown, else True."""
    verdicts = [same_machine(run, other) for other in others]
    return False if False in verdicts else None if None in verdicts else True


def _interval(values: Sequence[float]) -> str:
    """'[-0.4, +2.0]': the 95 % Student's t interval of the mean of paired differences; '—' under two values.

    Why it is printed: on the demo a five-seed mean of +0.8 ± 0.8 (better in 4 of 5) vanished at ten seeds; its
    interval held 0, which says beforehand that five seeds had not shown it (benchmarks/results/accuracy_history.md,
    eighth pass).
    """
    mean, std, n = mean_std(values)
    if n < 2:
        return _DASH
    return _t_interval(mean, std / math.sqrt(n), n - 1)


def _welch_interval(ours: Sequence[float], theirs: Sequence[float]) -> str:
    """'[-4.1, +1.3]': the 95 % Welch t interval of mean(ours) − mean(theirs), two independent samples of
    possibly unequal spread; '—' when either side has fewer than two values."""
    mean_a, std_a, n_a = mean_std(ours)
    mean_b, std_b, n_b = mean_std(theirs)
    if n_a < 2 or n_b < 2:
        return _DASH
    var_a, var_b = std_a ** 2 / n_a, std_b ** 2 / n_b
    # Welch-Satterthwaite degrees of freedom; without spread on either side any value gives a zero-width interval.
    dof = (var_a + var_b) ** 2 / (var_a ** 2 / (n_a - 1) + var_b ** 2 / (n_b - 1)) if var_a + var_b else 1.0
    return _t_interval(mean_a - mean_b, math.sqrt(var_a + var_b), dof)


def _t_interval(centre: float, standard_error: float, dof: float) -> str:
    """'[-0.4, +2.0]': centre ± the 97.5 % quantile of Student's t at `dof` times the standard error."""
    from scipy.stats import t  # scipy is a dependency; imported here to keep the report's import light

    half = float(t.ppf(0.975, dof)) * standard_error
    return f"[{centre - half:+.1f}, {centre + half:+.1f}]"


def _points(values: Sequence[float]) -> str:
    """'+1.2 ± 0.8' (points) over the values, '+1.2' for one, '—' for none."""
    mean, std, n = mean_std(values)
    if n == 0:
        return _DASH
    return f"{mean:+.1f}" if std is None else f"{mean:+.1f} ± {std:.1f}"


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
    for (preset, k, change), members in groups.items():
        ours = {key: mean_std([r[key] for r in members]) for key in _COMPARE_KEYS}
        paper = _paper_row(preset, k)
        diffs = [_signed(100 * ours[key][0] - paper[i] if paper and ours[key][0] is not None else None)
                 for i, key in enumerate(_COMPARE_KEYS)]
        rows.append([_setup_name(preset, change), _DASH if k is None else k, len(members), _seeds(members),
                     *(_pm([r[key] for r in members]) for key in _COMPARE_KEYS),
                     *((f"{v:.1f}" for v in paper) if paper else [_DASH] * 3), *diffs])
    lines += _md_table(["Preset", "K", "n", "Seeds", "ACC", "NMI", "ARI", "Paper ACC", "Paper NMI", "Paper ARI",
                        "Δ ACC", "Δ NMI", "Δ ARI"], rows, "lrrlrrrrrrrrr")
    lines += ["", "Percent; mean ± sample std (ddof = 1) over the n runs (seeds) of a setup: a preset, K and the "
              "settings that change a result; a setup that differs from its preset's first one names the settings "
              "it changes. Paper: SCAN + "
              "self-labelling, the best runs in the authors' README model zoo, shown only where K equals the "
              "paper's K; Δ = ours − paper in points."]

    lines += ["", "## Per stage, mean ± std over seeds", ""]
    rows = []
    for (preset, k, change), members in groups.items():
        gains = [r["acc"] - r["scan_acc"] for r in members
                 if r["selflabel"] and r["acc"] is not None and r["scan_acc"] is not None]
        gain_mean, gain_std, _ = mean_std(gains)
        rows.append([_setup_name(preset, change), _DASH if k is None else k, len(members), _seeds(members),
                     _pm([r["kmeans_acc"] for r in members]), _pm([r["scan_acc"] for r in members]),
                     _pm([r["best_head_acc"] for r in members]), _pm([r["acc"] for r in members]),
                     _DASH if gain_mean is None else (f"{100 * gain_mean:+.1f}" if gain_std is None
                                                      else f"{100 * gain_mean:+.1f} ± {100 * gain_std:.1f}"),
                     _pct_or_dash(min((r["acc"] for r in members if r["acc"] is not None), default=None))])
    lines += _md_table(["Preset", "K", "n", "Seeds", "k-means ACC", "SCAN stage ACC", "Best head ACC", "Final ACC",
                        "Self-label Δ", "Worst final ACC"], rows, "lrrlrrrrrr")
    lines += ["", "ACC in percent; mean ± sample std over the group's runs. SCAN stage: the clustering the SCAN stage "
              "hands on (scan.select: a head or an ensemble of heads); Best head: the SCAN stage's best single head "
              "by the labels, what a perfect selection rule would hand on (a diagnostic: the runs never read it); "
              "Self-label Δ: Final − SCAN stage, in points."]

    lines += _changes_md(groups)

    lines += ["", "## Per stage", ""]
    stage_names = _stage_order(runs)
    rows = []
    for run, change in zip(runs, run_changes(runs)):
        gain = (100 * (run["acc"] - run["scan_acc"]) if run["selflabel"] and run["acc"] is not None
                and run["scan_acc"] is not None else None)
        paper_scan = _paper_row(run["preset"], run["num_clusters"], "scan")
        secs = run["seconds"]
        total = secs.get("total", sum(v for s, v in secs.items() if s != "total"))
        rows.append([run["label"], _setup_name(run["preset"], change),
                     _DASH if run["num_clusters"] is None else run["num_clusters"],
                     "?" if run["seed"] is None else run["seed"], _pct_or_dash(run["kmeans_acc"]),
                     _pct_or_dash(run["scan_acc"]), _pct_or_dash(run["acc"]), _signed(gain),
                     f"{paper_scan[0]:.1f}" if paper_scan else _DASH,
                     *(f"{secs[s]:.1f}" if s in secs else _DASH for s in stage_names), f"{total:.1f}"])
    lines += _md_table(["Run", "Preset", "K", "Seed", "k-means ACC", "SCAN head ACC", "Final ACC", "Self-label Δ",
                        "Paper SCAN ACC", *(f"{s} (s)" for s in stage_names), "Total (s)"],
                       rows, "llrrrrrrr" + "r" * (len(stage_names) + 1))
    lines += ["", "ACC in percent. SCAN head: what the SCAN stage handed on (scan.select: a head or an ensemble), "
              "before self-labelling; Final: the "
              "model the run ends with (after self-labelling when that stage ran; Self-label Δ = Final − SCAN head). "
              "k-means: k-means on PCA-reduced pixels. Stage times in seconds."]

    lines += _machines_md(runs)

    multi_k = overclustering_datasets(runs)
    if multi_k:
        lines += ["", "## Overclustering / unknown K", ""]
        rows = []
        presets = list(multi_k)
        chosen = sorted((key for key in groups if key[0] in multi_k and key[1] is not None),
                        key=lambda key: (presets.index(key[0]), key[2], key[1]))  # per setup, K ascending
        for preset, k, change in chosen:
            members = groups[(preset, k, change)]
            classes = sorted({r["num_classes"] for r in members if r["num_classes"] is not None})
            used = mean_std([r["clusters_used"] for r in members])[0]
            rows.append([_setup_name(preset, change), k, len(members), ", ".join(map(str, classes)) or _DASH,
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

    groups = {k: members for (p, k, change), members in group_runs(runs).items()
              if p == preset and k is not None and not change}  # the preset's reference setup at each K
    ks = sorted(groups)
    fig = Figure(figsize=(6.0, 4.2), dpi=100)
    ax = fig.add_subplot(1, 1, 1)
    for label, key, marker in (("Hungarian ACC", "acc", "o"), ("many-to-one ACC", "acc_many_to_one", "s"),
                               ("NMI", "nmi", "^")):
        stats = [mean_std([r[key] for r in groups[k]]) for k in ks]
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
