"""Peak host memory of a short real pipeline run against the number of images: does it grow like the data?

Generates JPEG class folders (10 classes, 500x375 photo-like images: smooth colour fields, shapes, stripes and
sensor-like noise, ~40 KB each) once under a temporary folder, then for each size N (default 2,000, 8,000 and
16,000 images; a size is a folder of symlinks to the first N generated images, so every size is a prefix of the
next) runs the whole pipeline in a fresh process::

    python -m scan_dist.launch --run-dir RUN smoke data.path=FOLDER data.format=imagefolder data.image_size=224
        data.max_images=null data.max_eval_images=E model.width=4 pretext.epochs=1 ... run.progress=false

(every stage: pretext, embed, mine, scan, selflabel, evaluate, one epoch each, small batches; see OVERRIDES). While
it runs, the process tree is sampled every ``--interval-s`` (0.2 s) from /proc: per process VmRSS and RssAnon
(``/proc/PID/status``) and, for the tree, the sum of PSS (``/proc/PID/smaps_rollup``: shared pages counted once,
split between the processes sharing them). The main process is the launched one; the other processes running the
same executable are its DataLoader workers (forked: their RSS includes pages inherited from the main process that
they never copy, so RSS double-counts and the tree's PSS total is the honest sum). The stage each sample falls in is
read from the run's log lines, giving a per-stage peak. ``os.wait4`` on the launched process gives the kernel's
peak RSS (max over it and its reaped workers) as a cross-check of the sampled peaks.

Per size the table shows the peaks, and the growth per 1,000 images between consecutive sizes, next to the
arrays that are *allowed* to grow with N, read from the run folder after the run: every ``.npy`` with a row per
training image (embeddings N x D x 4, pixel-PCA projections, the mined space, neighbours N x k x 8, the feature
cache, ...) plus the reader's file-name array (N x longest name) and labels (N x 8). The reference for what must
*not* grow: a decoded 224x224x3 uint8 image is 150,528 bytes, i.e. ~150 MB per 1,000 images.

``--old PATH`` (default /tmp/orig when it is a checkout) measures the same runs on another checkout of the
project (the code before the data-layer redesign, which decodes the whole data set into memory) for a
before/after; its sizes are capped (``--old-sizes``) and a size whose extrapolated peak would not fit in half the
available memory is skipped (and noted).

Timings (``wall_s``) are reported but noisy: 2 cores, shared with other jobs. Memory is what this measures.

Usage::

    python benchmarks/bench_data_memory.py                 # 2k, 8k, 16k images; old code at 2k and 4k
    python benchmarks/bench_data_memory.py --small         # 300 and 900 images, tiny images, no old code (< 2 min)
    python benchmarks/bench_data_memory.py --sizes 2000 8000 --old none --budget-s 1200
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from multiprocessing import Pool
from pathlib import Path

import numpy as np

if __package__ in (None, ""):  # run as a script: make the repo root importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import Budget, add_budget_argument, environment, print_table, write_results

REPO = Path(__file__).resolve().parent.parent
CLASSES = 10
IMAGE_W, IMAGE_H = 500, 375
DECODED_224 = 224 * 224 * 3  # bytes of one decoded network-size image: what must not accumulate per image
EVAL_IMAGES = 500
# Shared by the old and new code (both have these keys). Small batches keep the constant part (activations at
# 224^2 with cnn_small at full resolution: batch x width x 224^2 x 4 bytes per layer) small, so growth shows.
OVERRIDES = [
    "data.format=imagefolder", "data.image_size=224", "data.max_images=null", "run.progress=false",
    "run.device=cpu", "model.width=4", "pretext.epochs=1", "pretext.batch_size=32", "scan.epochs=1",
    "scan.batch_size=64", "selflabel.epochs=1", "selflabel.batch_size=32", "run.eval_batch_size=64",
    "run.checkpoint_every_steps=100000",
]
SMALL = {"sizes": [300, 900], "image_w": 160, "image_h": 120, "eval": 100, "image_size": 64}
STAGE_LINE = re.compile(r"stage (\w+): running")


# ---------------------------------------------------------------------------------------------------- data

def _class_look(c: int) -> dict:
    """Fixed per class: palette, shape kind, stripe frequency and angle, so classes are tellable apart."""
    rng = np.random.default_rng([7, c])
    return {"base": rng.uniform(40, 215, 3), "accent": rng.uniform(0, 255, (2, 3)), "shape": c % 3,
            "freq": 0.02 + 0.012 * c, "angle": rng.uniform(0, np.pi)}


def make_image(index: int, width: int, height: int) -> np.ndarray:
    """uint8 [height, width, 3]: image `index` (class index % CLASSES), deterministic."""
    from PIL import Image, ImageDraw, ImageFilter

    look = _class_look(index % CLASSES)
    rng = np.random.default_rng([11, index])
    # Smooth low-frequency colour field around the class colour (bicubic from a coarse grid), like lit surfaces.
    coarse = np.clip(look["base"] + rng.normal(0, 45, (6, 8, 3)), 0, 255).astype(np.uint8)
    img = Image.fromarray(coarse).resize((width, height), Image.Resampling.BICUBIC)
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(3, 9))):
        colour = tuple(int(v) for v in np.clip(look["accent"][int(rng.integers(2))] + rng.normal(0, 25, 3), 0, 255))
        cx, cy = rng.uniform(0, width), rng.uniform(0, height)
        r = rng.uniform(0.05, 0.25) * min(width, height)
        if look["shape"] == 0:
            draw.ellipse([cx - r, cy - 0.7 * r, cx + r, cy + 0.7 * r], fill=colour)
        elif look["shape"] == 1:
            draw.rectangle([cx - r, cy - r / 2, cx + r, cy + r / 2], fill=colour)
        else:
            draw.polygon([(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)], fill=colour)
    img = img.filter(ImageFilter.GaussianBlur(1.2))
    pixels = np.asarray(img, dtype=np.float32)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    phase = xx * np.cos(look["angle"]) + yy * np.sin(look["angle"])
    pixels += 18 * np.sin(2 * np.pi * look["freq"] * phase + rng.uniform(0, 2 * np.pi))[..., None]
    pixels += rng.normal(0, 5, pixels.shape).astype(np.float32)  # sensor-like noise: JPEGs of photo-like size
    return np.clip(pixels, 0, 255).astype(np.uint8)


def _write_one(job) -> int:
    from PIL import Image

    index, path, width, height = job
    Image.fromarray(make_image(index, width, height)).save(path, quality=88)
    return os.path.getsize(path)


def generate_pool(folder: Path, count: int, width: int, height: int, workers: int = 2) -> dict:
    """Images 0..count-1 as folder/class_c/img_iiiiii.jpg (kept between sizes; only missing files are made)."""
    jobs = []
    for index in range(count):
        path = folder / f"class_{index % CLASSES}" / f"img_{index:06d}.jpg"
        if not path.is_file():
            path.parent.mkdir(parents=True, exist_ok=True)
            jobs.append((index, str(path), width, height))
    start = time.perf_counter()
    if jobs:
        with Pool(workers) as pool:
            list(pool.imap_unordered(_write_one, jobs, chunksize=64))
    sizes = [os.path.getsize(folder / f"class_{i % CLASSES}" / f"img_{i:06d}.jpg") for i in range(count)]
    return {"generated": len(jobs), "seconds": time.perf_counter() - start, "mean_file_bytes": float(np.mean(sizes)),
            "total_bytes": int(np.sum(sizes))}


def size_folder(pool: Path, root: Path, count: int) -> Path:
    """root/n<count>/class_c/...: symlinks to the first `count` pool images (a prefix: balanced classes)."""
    folder = root / f"n{count}"
    if folder.exists():
        shutil.rmtree(folder)
    for index in range(count):
        name = f"class_{index % CLASSES}/img_{index:06d}.jpg"
        link = folder / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(pool / name)
    return folder


# ---------------------------------------------------------------------------------------------------- sampling

def _read_kb(path: str, keys: tuple[str, ...]) -> dict[str, int]:
    out = {}
    try:
        with open(path) as handle:
            for line in handle:
                name, _, rest = line.partition(":")
                if name in keys:
                    out[name] = int(rest.split()[0])  # kB
    except OSError:  # the process ended between listing and reading
        pass
    return out


def _children_map() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as handle:
                stat = handle.read()
        except OSError:
            continue
        ppid = int(stat[stat.rfind(")") + 2:].split()[1])
        kids.setdefault(ppid, []).append(int(entry))
    return kids


def _exe(pid: int) -> str | None:
    try:
        return os.readlink(f"/proc/{pid}/exe")
    except OSError:
        return None


class TreeSampler(threading.Thread):
    """Samples the memory of a process and its descendants until stopped; `stage` is set from outside."""

    def __init__(self, pid: int, interval_s: float):
        super().__init__(daemon=True)
        self.pid, self.interval_s = pid, interval_s
        self.exe = _exe(pid)
        self.stage = "start"
        self.stop_event = threading.Event()
        self.samples = 0
        self.main = {"rss_kb": 0, "anon_kb": 0}
        self.workers: dict[int, dict] = {}  # pid -> peaks
        self.others: dict[int, str] = {}  # descendants that are not python workers (e.g. git)
        self.tree_pss_kb = 0
        self.tree_rss_kb = 0
        self.per_stage: dict[str, dict] = {}
        self.timeline: list[tuple[float, str, int, int, int]] = []  # (t, stage, main rss, worker rss sum, pss sum)

    def run(self) -> None:
        start = time.perf_counter()
        while not self.stop_event.is_set():
            self.sample(time.perf_counter() - start)
            self.stop_event.wait(self.interval_s)

    def sample(self, t: float) -> None:
        kids = _children_map()
        tree, todo = [], [self.pid]
        while todo:
            pid = todo.pop()
            tree.append(pid)
            todo.extend(kids.get(pid, []))
        stage = self.stage
        main_rss, worker_rss, pss_sum, rss_sum, largest_worker = 0, 0, 0, 0, 0
        for pid in tree:
            status = _read_kb(f"/proc/{pid}/status", ("VmRSS", "RssAnon"))
            if not status:
                continue
            rollup = _read_kb(f"/proc/{pid}/smaps_rollup", ("Pss",))
            rss, anon = status.get("VmRSS", 0), status.get("RssAnon", 0)
            pss_sum += rollup.get("Pss", 0)
            rss_sum += rss
            if pid == self.pid:
                main_rss = rss
                self.main["rss_kb"] = max(self.main["rss_kb"], rss)
                self.main["anon_kb"] = max(self.main["anon_kb"], anon)
            elif _exe(pid) == self.exe:
                peaks = self.workers.setdefault(pid, {"rss_kb": 0, "anon_kb": 0, "pss_kb": 0, "stage": stage})
                peaks["rss_kb"] = max(peaks["rss_kb"], rss)
                peaks["anon_kb"] = max(peaks["anon_kb"], anon)
                peaks["pss_kb"] = max(peaks["pss_kb"], rollup.get("Pss", 0))
                worker_rss += rss
                largest_worker = max(largest_worker, rss)
            else:
                try:
                    with open(f"/proc/{pid}/comm") as handle:
                        self.others[pid] = handle.read().strip()
                except OSError:
                    pass
        self.samples += 1
        self.tree_pss_kb = max(self.tree_pss_kb, pss_sum)
        self.tree_rss_kb = max(self.tree_rss_kb, rss_sum)
        peaks = self.per_stage.setdefault(stage, {"main_rss_kb": 0, "worker_rss_kb": 0, "tree_pss_kb": 0})
        peaks["main_rss_kb"] = max(peaks["main_rss_kb"], main_rss)
        peaks["worker_rss_kb"] = max(peaks["worker_rss_kb"], largest_worker)
        peaks["tree_pss_kb"] = max(peaks["tree_pss_kb"], pss_sum)
        self.timeline.append((round(t, 2), stage, main_rss, worker_rss, pss_sum))


# ---------------------------------------------------------------------------------------------------- one run

def run_pipeline(code: Path, folder: Path, run_dir: Path, overrides: list[str], cache_dir: Path, interval_s: float,
                 timeout_s: float | None) -> dict:
    """The pipeline on `folder` in a fresh process of checkout `code`, sampled; returns the measurements."""
    cmd = [sys.executable, "-m", "scan_dist.launch", "--run-dir", str(run_dir), "smoke", f"data.path={folder}",
           *overrides]
    env = {**os.environ, "SCAN_DIST_CACHE_DIR": str(cache_dir), "PYTHONUNBUFFERED": "1"}
    log_path = run_dir.parent / f"{run_dir.name}.log"
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=code, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    sampler = TreeSampler(proc.pid, interval_s)
    sampler.start()
    lines: list[str] = []
    timer = None
    if timeout_s is not None:
        timer = threading.Timer(timeout_s, proc.kill)
        timer.start()
    with open(log_path, "w") as log:
        for line in proc.stdout:  # stage boundaries, as the run logs them
            log.write(line)
            lines.append(line)
            match = STAGE_LINE.search(line)
            if match:
                sampler.stage = match.group(1)
    # wait4: the kernel's peak RSS of the launched process and of the children it reaped (its workers).
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - start
    if timer is not None:
        timer.cancel()
    sampler.stop_event.set()
    sampler.join()
    result = {"returncode": proc.returncode, "wall_s": wall, "samples": sampler.samples,
              "main_peak_rss_mb": sampler.main["rss_kb"] / 1024, "main_peak_anon_mb": sampler.main["anon_kb"] / 1024,
              "workers": len(sampler.workers),
              "worker_peak_rss_mb": max((w["rss_kb"] for w in sampler.workers.values()), default=0) / 1024,
              "worker_peak_anon_mb": max((w["anon_kb"] for w in sampler.workers.values()), default=0) / 1024,
              "worker_peak_pss_mb": max((w["pss_kb"] for w in sampler.workers.values()), default=0) / 1024,
              "tree_peak_pss_mb": sampler.tree_pss_kb / 1024, "tree_peak_rss_mb": sampler.tree_rss_kb / 1024,
              "wait4_maxrss_mb": usage.ru_maxrss / 1024,
              "per_stage": {stage: {k.replace("_kb", "_mb"): v / 1024 for k, v in peaks.items()}
                            for stage, peaks in sampler.per_stage.items()},
              "other_children": sorted(set(sampler.others.values())),
              "timeline": sampler.timeline[::max(1, len(sampler.timeline) // 400)], "log": str(log_path)}
    if proc.returncode != 0:
        result["error"] = "".join(lines[-15:])
    return result


def allowed_arrays(run_dir: Path, num_train: int, folder: Path) -> dict:
    """The O(N) state a run may hold: .npy files with a row per training image, and the reader's names/labels."""
    arrays, per_image = [], 0
    for path in sorted(run_dir.rglob("*.npy")):
        try:
            table = np.load(path, mmap_mode="r")
        except (ValueError, OSError):
            continue
        if table.ndim and table.shape[0] == num_train:
            row = table.nbytes // num_train
            per_image += row
            arrays.append({"file": str(path.relative_to(run_dir)), "shape": list(table.shape),
                           "dtype": str(table.dtype), "bytes": int(table.nbytes), "bytes_per_image": int(row)})
    longest = max(len(str(p.relative_to(folder)).encode()) for p in folder.rglob("*.jpg"))
    names = {"name_bytes_per_image": longest, "label_bytes_per_image": 8}
    return {"arrays": arrays, **names, "bytes_per_image": per_image + longest + 8}


def _slope(rows: list[dict], key: str) -> None:
    """Growth per 1,000 images of `key` between consecutive sizes (in the later row)."""
    for before, after in zip(rows, rows[1:]):
        if before.get(key) is not None and after.get(key) is not None:
            after[f"{key}_per_1k"] = (after[key] - before[key]) / (after["images"] - before["images"]) * 1000


# ---------------------------------------------------------------------------------------------------- main

def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--small", action="store_true",
                        help=f"fast check: {SMALL['sizes']} images of {SMALL['image_w']}x{SMALL['image_h']} at "
                             f"{SMALL['image_size']}px, no old code")
    parser.add_argument("--sizes", type=int, nargs="+", default=None, help="images per run (default 2000 8000 16000)")
    parser.add_argument("--old", default=None,
                        help="checkout of the code before the redesign to measure too (default /tmp/orig when it "
                             "exists; 'none' to skip)")
    parser.add_argument("--old-sizes", type=int, nargs="+", default=None, help="sizes for --old (default 2000 4000)")
    parser.add_argument("--eval-images", type=int, default=None, help=f"data.max_eval_images (default {EVAL_IMAGES})")
    parser.add_argument("--interval-s", type=float, default=0.2, help="sampling period of /proc (default 0.2 s)")
    parser.add_argument("--work-dir", type=Path, default=None,
                        help="where the images and runs go (default: a temporary folder, deleted at the end); an "
                             "existing folder keeps its generated images for the next call")
    parser.add_argument("--keep", action="store_true", help="keep the run folders (with --work-dir)")
    parser.add_argument("--out", type=Path, default=None, help="results folder (default benchmarks/results)")
    add_budget_argument(parser)
    args = parser.parse_args(argv)
    if args.sizes is None:
        args.sizes = SMALL["sizes"] if args.small else [2000, 8000, 16000]
    if args.old is None:
        args.old = "none" if args.small or not (Path("/tmp/orig") / "scan_dist").is_dir() else "/tmp/orig"
    if args.old_sizes is None:
        args.old_sizes = [2000, 4000]
    if args.eval_images is None:
        args.eval_images = SMALL["eval"] if args.small else EVAL_IMAGES
    args.sizes, args.old_sizes = sorted(args.sizes), sorted(args.old_sizes)
    return args


def _mem_available_mb() -> float:
    return _read_kb("/proc/meminfo", ("MemAvailable",)).get("MemAvailable", 0) / 1024


def main(argv=None) -> int:
    args = parse_args(argv)
    budget = Budget(args.budget_s)
    notes = ["wall_s is noisy: 2 shared cores; the memory figures are the measurement",
             "main/worker peak RSS sampled from /proc every %.2g s; RSS of a forked worker includes pages it shares "
             "with the main process, tree_peak_pss_mb counts every page once" % args.interval_s]
    work = Path(args.work_dir) if args.work_dir else Path(tempfile.mkdtemp(prefix="bench_data_memory-"))
    work.mkdir(parents=True, exist_ok=True)
    width, height = (SMALL["image_w"], SMALL["image_h"]) if args.small else (IMAGE_W, IMAGE_H)
    image_size = SMALL["image_size"] if args.small else 224
    overrides = [o if not o.startswith("data.image_size=") else f"data.image_size={image_size}" for o in OVERRIDES]
    overrides.append(f"data.max_eval_images={args.eval_images}")
    old = None if args.old == "none" else Path(args.old)
    plan = [("new", REPO, n) for n in args.sizes] + ([("old", old, n) for n in args.old_sizes] if old else [])
    largest = max(n for _, _, n in plan)
    pool = work / f"pool-{width}x{height}"
    print(f"generating {largest} JPEGs of {width}x{height} in {pool} ...", flush=True)
    data_facts = generate_pool(pool, largest, width, height)
    print(f"  {data_facts['generated']} new in {data_facts['seconds']:.0f} s, mean {data_facts['mean_file_bytes'] / 1e3:.0f} KB",
          flush=True)
    rows = []
    try:
        for index, (code_name, code, count) in enumerate(plan):
            share = budget.share(len(plan) - index)
            if index and share is not None and rows and rows[-1].get("wall_s") and \
                    budget.left() < rows[-1]["wall_s"] * count / rows[-1]["images"]:
                notes.append(f"{code_name} {count} images: skipped, --budget-s would not fit it")
                continue
            if code_name == "old":
                done = [r for r in rows if r["code"] == "old" and "error" not in r]
                if done:  # extrapolate the old code's peak linearly from its largest run so far
                    guess = done[-1]["tree_peak_rss_mb"] * count / done[-1]["images"]
                    if guess > 0.5 * _mem_available_mb():
                        notes.append(f"old {count} images: skipped, expected ~{guess / 1e3:.1f} GB RSS > half of the "
                                     f"{_mem_available_mb() / 1e3:.1f} GB available")
                        continue
            folder = size_folder(pool, work / "data", count)
            run_dir = work / "runs" / f"{code_name}-n{count}"
            if run_dir.exists():
                shutil.rmtree(run_dir)
            run_dir.parent.mkdir(parents=True, exist_ok=True)
            cache_dir = work / "cache"
            print(f"{code_name} code, {count} images ...", flush=True)
            timeout = None if budget.left() == float("inf") else max(60.0, budget.left())
            result = run_pipeline(code, folder, run_dir, overrides, cache_dir, args.interval_s, timeout)
            row = {"code": code_name, "images": count, **result}
            if result["returncode"] == 0:
                row["allowed"] = allowed_arrays(run_dir, count, folder)
                row["allowed_mb"] = row["allowed"]["bytes_per_image"] * count / 2**20
            else:
                notes.append(f"{code_name} {count} images failed (exit {result['returncode']}): "
                             f"{result['error'].strip().splitlines()[-1][:200]}")
            rows.append(row)
            print(f"  exit {row['returncode']}, {row['wall_s']:.0f} s, main {row['main_peak_rss_mb']:.0f} MB, "
                  f"largest worker {row['worker_peak_rss_mb']:.0f} MB, tree PSS {row['tree_peak_pss_mb']:.0f} MB",
                  flush=True)
            if not args.keep:
                shutil.rmtree(run_dir, ignore_errors=True)
    finally:
        if not args.work_dir:
            shutil.rmtree(work, ignore_errors=True)
    for code_name in ("new", "old"):
        done = [r for r in rows if r["code"] == code_name and r["returncode"] == 0]
        for key in ("main_peak_rss_mb", "main_peak_anon_mb", "worker_peak_rss_mb", "tree_peak_pss_mb", "allowed_mb"):
            _slope(done, key)
    for row in rows:
        row["shape"] = f"{row['code']} {row['images']}"
        row["allowed_kb_per_image"] = row.get("allowed", {}).get("bytes_per_image", 0) / 1e3 or None
    print_table(rows, ["code", "images", "wall_s", "main_peak_rss_mb", "main_peak_rss_mb_per_1k", "worker_peak_rss_mb",
                       "worker_peak_rss_mb_per_1k", "tree_peak_pss_mb", "tree_peak_pss_mb_per_1k", "wait4_maxrss_mb",
                       "allowed_mb", "allowed_mb_per_1k"])
    stages = sorted({s for r in rows for s in r["per_stage"]}, key=lambda s: list(
        ("start", "pretext", "embed", "mine", "scan", "selflabel", "evaluate")).index(s) if s in (
        "start", "pretext", "embed", "mine", "scan", "selflabel", "evaluate") else 99)
    print("\nmain-process peak RSS (MB) per stage:")
    print_table([{"run": r["shape"], **{s: r["per_stage"].get(s, {}).get("main_rss_mb") for s in stages}}
                 for r in rows], ["run", *stages])
    decoded = image_size * image_size * 3
    print(f"\nreference: a decoded {image_size}x{image_size}x3 uint8 image is {decoded / 1e3:.1f} KB -> "
          f"{decoded * 1000 / 2**20:.0f} MB per 1,000 images")
    for note in notes:
        print("note:", note)
    payload = {"benchmark": "data_memory", "environment": environment("cpu"),
               "config": {"small": args.small, "sizes": args.sizes, "old": str(old) if old else None,
                          "old_sizes": args.old_sizes if old else [], "eval_images": args.eval_images,
                          "image_wh": [width, height], "image_size": image_size, "classes": CLASSES,
                          "overrides": overrides, "preset": "smoke", "interval_s": args.interval_s,
                          "budget_s": args.budget_s, "decoded_image_bytes": image_size * image_size * 3,
                          "data": data_facts, "baselines": []},
               "results": rows, "notes": notes}
    print(f"wrote {write_results('data_memory', payload, args.out)}")
    failed = [r for r in rows if r["returncode"] != 0 and r["code"] == "new"]
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
