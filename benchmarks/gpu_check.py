"""The steps of ``benchmarks/gpu_check.sh``: a first GPU contact that fits a few minutes of a bare H100/H200.

Each step runs in its own process (``python -m benchmarks.gpu_check STEP OUT [--dry] [--budget-s S]``), under a
``timeout`` set by the shell script, and writes ``OUT/steps/STEP.json`` after every measurement, so a step that
is killed still leaves what it measured.  ``assemble`` merges the step files, the pytest log and each step's exit
status into ``OUT/gpu_check.json``.

Steps (full size on CUDA; ``--dry``: tiny shapes on CPU with Triton's interpreter, to prove the script runs):

* ``env``        -- versions, GPU, optional packages, how ``scan_dist.kernels`` was imported (no install needed,
  and ``scan_dist.config`` / omegaconf never imported by these steps), device-to-device copy bandwidth.
* ``selfcheck``  -- the kernels' first-use self-check (``kernels/_selfcheck.py``) for every specialisation the
  benchmarks use: would a user's first run keep the Triton path?  Compile + check seconds each.
* ``scan_loss``  -- SCAN loss forward + backward, bf16, H10 B4096 C1000 and H1 B65536 C1000: torch eager,
  ``torch.compile`` of the same reference, the Triton kernels, the Triton path replayed as a CUDA graph, and the
  kernels alone (forward / backward launches without the torch glue).  Median of per-iteration times of
  back-to-back iterations (host work included: it is part of a training step); bytes floor from the copy
  bandwidth measured in the same process.
* ``knn``        -- exact k-NN, N = 1,281,167, D = 128, k = 21, clustered bank: Triton fp32 on a query subset,
  fp16 on a larger subset and on all N queries when the subset predicts it fits the step's budget; naive mm+topk
  in fp32 and bf16 on the fp32 subset; recall@k and identical rows against the Triton fp32 answer; times for all
  N queries extrapolated linearly in Q (stated per row) where not measured; a D = 2048 subset if time is left.
* ``train_step`` -- one SCAN step of a torchvision ResNet-50 + 10 heads x 1000 classes, bf16 autocast,
  channels_last, SGD: images/s with the SCAN loss on Triton and on torch (no project config involved).
* ``resources``  -- registers / spills / shared memory of every kernel compiled by the JIT in this process (the
  benchmark specialisations are launched first), plus the offline sm_90a compile of ``kernel_resources``.
* ``assemble``   -- the one JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

IMAGENET_1K = 1_281_167
STEPS = ("env", "selfcheck", "scan_loss", "knn", "train_step", "resources")


# --------------------------------------------------------------------------- #
# Plumbing
# --------------------------------------------------------------------------- #
class Step:
    """Accumulates one step's results and rewrites ``OUT/steps/<name>.json`` after every change."""

    def __init__(self, name: str, out: Path, dry: bool, budget_s: float):
        self.name, self.dry, self.budget_s = name, dry, budget_s
        self.path = out / "steps" / f"{name}.json"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.start = time.perf_counter()
        self.data: dict[str, Any] = {"step": name, "dry": dry, "budget_s": budget_s, "results": [], "notes": [],
                                     "errors": []}
        self.save()

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def left(self) -> float:
        return self.budget_s - self.elapsed()

    def add(self, row: dict) -> None:
        self.data["results"].append(row)
        self.save()

    def note(self, text: str) -> None:
        print(f"[{self.name}] note: {text}", flush=True)
        self.data["notes"].append(text)
        self.save()

    def set(self, key: str, value: Any) -> None:
        self.data[key] = value
        self.save()

    def attempt(self, what: str, fn: Callable[[], Any]) -> Any:
        """Run ``fn``; an exception is recorded (with its traceback tail) and None returned, so the step goes on."""
        try:
            return fn()
        except Exception as exc:  # noqa: BLE001 - a failed measurement is a result
            tail = traceback.format_exc().strip().splitlines()[-6:]
            self.data["errors"].append({"what": what, "error": f"{type(exc).__name__}: {str(exc)[:500]}",
                                        "traceback_tail": tail})
            print(f"[{self.name}] {what} FAILED: {type(exc).__name__}: {str(exc)[:300]}", flush=True)
            self.save()
            return None

    def save(self) -> None:
        self.data["seconds"] = round(self.elapsed(), 2)
        tmp = self.path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.data, indent=2, default=str) + "\n")
        os.replace(tmp, self.path)


def _device(dry: bool) -> torch.device:
    if dry:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise SystemExit("gpu_check: no CUDA device (use --dry for the CPU smoke run)")
    return torch.device("cuda")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_iters(fn: Callable[[], Any], device: torch.device, iters: int, rounds: int = 5, warmup: int = 2) -> dict:
    """Median over ``rounds`` of the mean time of ``iters`` back-to-back calls (one sync per round), in ms."""
    for _ in range(warmup):
        fn()
    _sync(device)
    samples = []
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(iters):
            fn()
        _sync(device)
        samples.append((time.perf_counter() - start) * 1e3 / iters)
    return {"median_ms": statistics.median(samples), "min_ms": min(samples), "max_ms": max(samples),
            "iters": iters, "rounds": rounds}


def time_once(fn: Callable[[], Any], device: torch.device) -> tuple[float, Any]:
    _sync(device)
    start = time.perf_counter()
    out = fn()
    _sync(device)
    return time.perf_counter() - start, out


def copy_bandwidth_gbs(device: torch.device) -> float | None:
    """Device-to-device copy, bytes read + written per second (the practical HBM ceiling of a streaming kernel)."""
    if device.type != "cuda":
        return None
    src = torch.empty(1 << 28, dtype=torch.float32, device=device)  # 1 GiB
    dst = torch.empty_like(src)
    stats = time_iters(lambda: dst.copy_(src), device, iters=5, rounds=3)
    return round(2 * src.numel() * 4 / (stats["median_ms"] * 1e-3) / 1e9, 1)


# --------------------------------------------------------------------------- #
# env
# --------------------------------------------------------------------------- #
def step_env(step: Step) -> None:
    import importlib.util

    import scan_dist
    import scan_dist.kernels as kernels

    info: dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__,
                            "cuda_runtime": torch.version.cuda, "host": platform.node(),
                            "scan_dist_file": scan_dist.__file__, "scan_dist_kernels_file": kernels.__file__,
                            "TRITON_INTERPRET": os.environ.get("TRITON_INTERPRET", "")}
    try:
        import triton
        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    import numpy
    info["numpy"] = numpy.__version__
    def present(name: str) -> bool:
        try:
            return importlib.util.find_spec(name) is not None
        except ImportError:  # a dotted name whose parent package is missing
            return False

    info["optional_packages"] = {name: present(name) for name in ("omegaconf", "deepspeed", "nvidia.dali", "faiss",
                                                                   "torchvision", "pytest", "xdist")}
    info["not_run"] = "DALI / DeepSpeed / faiss rows are not part of this check (benchmarks/bench_*.py run them)"
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info["gpu"] = {"name": props.name, "capability": f"{props.major}.{props.minor}",
                       "sms": props.multi_processor_count, "memory_gib": round(props.total_memory / 2 ** 30, 1)}
        try:
            smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,clocks.max.sm,clocks.max.mem,"
                                  "power.limit", "--format=csv,noheader"], capture_output=True, text=True,
                                 timeout=20)
            info["nvidia_smi"] = smi.stdout.strip()
        except (OSError, subprocess.SubprocessError) as exc:
            info["nvidia_smi"] = f"unavailable: {exc}"
    step.set("environment", info)
    step.set("copy_gbs", step.attempt("copy bandwidth", lambda: copy_bandwidth_gbs(_device(step.dry))))


# --------------------------------------------------------------------------- #
# selfcheck
# --------------------------------------------------------------------------- #
def _specialisations(dry: bool) -> tuple[list, list]:
    """(scan cases (dtype, C), knn cases (precision, D, k)) the benchmarks and a default run use."""
    if dry:
        return [(torch.bfloat16, 100), (torch.float32, 13)], [("fp16", 32, 21), ("fp32", 32, 21)]
    return ([(torch.bfloat16, 1000), (torch.float32, 1000), (torch.bfloat16, 20000)],
            [("fp16", 128, 21), ("fp32", 128, 21), ("bf16", 128, 21), ("tf32", 128, 21), ("fp16", 2048, 21)])


def step_selfcheck(step: Step) -> None:
    from scan_dist.kernels import _selfcheck, knn_triton, scan_loss_triton

    device = _device(step.dry)
    # Checks apply to CUDA; in the dry run the same machinery runs on the CPU interpreter.
    _selfcheck.DEVICE_TYPES = frozenset({"cuda", device.type})
    _selfcheck.configure(True)
    scan_cases, knn_cases = _specialisations(step.dry)
    for dtype, classes in scan_cases:
        probe = torch.empty(1, 1, classes, dtype=dtype, device=device)
        key = scan_loss_triton.check_key(probe, probe)
        seconds, ok = time_once(lambda: _selfcheck.ensure("scan_loss", device, key,
                                                          lambda: scan_loss_triton.self_check(probe, probe)), device)
        step.add({"kernel": "scan_loss", "key": str(key), "ok": ok, "compile_and_check_s": round(seconds, 2)})
    for precision, dim, k in knn_cases:
        key = knn_triton.check_key(dim, k, precision)
        seconds, ok = time_once(lambda: _selfcheck.ensure("knn", device, key,
                                                          lambda: knn_triton.self_check(dim, k, precision, device)),
                                device)
        step.add({"kernel": "knn", "key": str(key), "ok": ok, "compile_and_check_s": round(seconds, 2)})
    step.set("status", _selfcheck.status())


# --------------------------------------------------------------------------- #
# scan_loss
# --------------------------------------------------------------------------- #
def step_scan_loss(step: Step) -> None:
    from benchmarks.bench_scan_loss import ENTROPY_WEIGHT, _inputs
    from scan_dist.kernels import configure, scan_loss
    from scan_dist.kernels import scan_loss_triton as st

    device = _device(step.dry)
    configure(self_check=False)  # time the kernels themselves; the parity check comes first, explicitly
    shapes = [(2, 64, 100), (1, 128, 100)] if step.dry else [(10, 4096, 1000), (1, 65536, 1000)]
    iters = 2 if step.dry else 20
    copy_gbs = step.attempt("copy bandwidth", lambda: copy_bandwidth_gbs(device))
    step.set("copy_gbs", copy_gbs)

    def reference(x, y):
        return scan_loss(x, y, ENTROPY_WEIGHT, backend="torch")

    def triton_loss(x, y):
        return scan_loss(x, y, ENTROPY_WEIGHT, backend="triton")

    for shape in shapes:
        heads, batch, classes = shape
        a, n = _inputs(shape, torch.bfloat16, device)
        label = f"{heads}x{batch}x{classes}"
        floor_bytes = 6 * heads * batch * classes * 2
        base = {"shape": label, "dtype": "bf16", "floor_bytes": floor_bytes,
                "floor_ms": floor_bytes / (copy_gbs * 1e9) * 1e3 if copy_gbs else None}

        def step_fn(loss_fn):
            def run():
                a.grad = None
                n.grad = None
                total, _, _ = loss_fn(a, n)
                total.sum().backward()
            return run

        problem = step.attempt(f"{label} parity", lambda: st.self_check(a, n))
        parity_ok = problem is None and not any(e["what"] == f"{label} parity" for e in step.data["errors"])
        step.add({**base, "impl": "parity", "ok": parity_ok, "problem": problem})

        def timed(name: str, measure: Callable[[], dict]) -> None:
            if step.left() < 10 and not step.dry:
                step.note(f"{label} {name}: skipped, step budget spent")
                return
            start = time.perf_counter()
            stats = step.attempt(f"{label} {name}", measure)
            if stats:
                row = {**base, "impl": name, **stats, "wall_s": round(time.perf_counter() - start, 1)}
                if base["floor_ms"]:
                    row["floor_frac"] = base["floor_ms"] / stats["median_ms"]
                step.add(row)

        # Ours first, the slow-to-compile baseline last: a step cut short by its cap loses the least.
        if parity_ok:
            timed("triton", lambda: time_iters(step_fn(triton_loss), device, iters))
            if device.type == "cuda":
                timed("triton_graph", lambda: _graph_timing(step_fn(triton_loss), device, iters))
        timed("eager", lambda: time_iters(step_fn(reference), device, iters))
        torch._dynamo.reset()
        # Dry run: the "eager" dynamo backend exercises the torch.compile code path without a C++ toolchain.
        compiled = torch.compile(reference, dynamic=False, **({"backend": "eager"} if step.dry else {}))
        timed("compile", lambda: time_iters(step_fn(compiled), device, iters))
        if parity_ok:
            # The kernels alone, without autograd and the torch glue: what the host work costs is the difference.
            a_d, n_d = a.detach(), n.detach()
            _, _, stats_t = st._forward(a_d, n_d, st.MAX_FUSED_C)
            g_cs = torch.ones(heads, device=device)
            g_ps = torch.ones(heads, classes, device=device)
            for name, fn in (("kernel_fwd", lambda: st._forward(a_d, n_d, st.MAX_FUSED_C)),
                             ("kernel_bwd", lambda: st._backward(a_d, n_d, stats_t, g_cs, g_ps, True, True,
                                                                 st.MAX_FUSED_C))):
                stats = step.attempt(f"{label} {name}", lambda: time_iters(fn, device, iters))
                if stats:
                    step.add({**base, "impl": name, **stats})
        rows = {r["impl"]: r for r in step.data["results"] if r.get("shape") == label and "median_ms" in r}
        summary = {f"{impl}_ms": round(rows[impl]["median_ms"], 4) for impl in rows}
        for impl in ("triton", "triton_graph"):
            if impl in rows and "compile" in rows:
                summary[f"{impl}_speedup_vs_compile"] = round(rows["compile"]["median_ms"] / rows[impl]["median_ms"],
                                                              3)
        step.data.setdefault("summary", {})[label] = summary
        step.save()


def _graph_timing(run: Callable[[], None], device: torch.device, iters: int) -> dict:
    """Capture one forward + backward in a CUDA graph and time its replay (host work leaves the step)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):  # warm-up on a side stream, as CUDA graph capture requires
            run()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        run()
    return time_iters(graph.replay, device, iters)


# --------------------------------------------------------------------------- #
# knn
# --------------------------------------------------------------------------- #
def step_knn(step: Step) -> None:
    from benchmarks.bench_knn import make_bank, naive, recall
    from scan_dist.kernels import configure
    from scan_dist.kernels.knn_triton import knn_triton_stats

    device = _device(step.dry)
    configure(self_check=False)
    torch.backends.cuda.matmul.allow_tf32 = False  # naive_fp32 must be true fp32
    n_bank, dim, k = (2048, 32, 21) if step.dry else (IMAGENET_1K, 128, 21)
    q32, q16 = (32, 64) if step.dry else (16384, 65536)
    step.set("config", {"N": n_bank, "D": dim, "k": k, "data": "clustered (1 centre per 100 rows + noise)",
                        "fp32_queries": q32, "fp16_queries": q16})
    bank = make_bank(n_bank, dim, "clustered", 0, device)
    warm = bank[:min(256, q32)]

    def extrapolated(seconds: float, queries: int) -> float:
        return seconds * n_bank / queries

    results: dict[str, Any] = {}

    def measure(impl: str, queries: int, fn: Callable[[Tensor], Any]) -> None:
        step.attempt(f"{impl} warm-up", lambda: fn(warm))  # compiles outside the timed call
        timed = step.attempt(impl, lambda: time_once(lambda: fn(bank[:queries]), device))
        if timed is None:
            return
        seconds, out = timed
        results[impl] = out
        row = {"impl": impl, "queries": queries, "N": n_bank, "D": dim, "k": k, "seconds": round(seconds, 4),
               "interpreter": step.dry and impl.startswith("triton")}
        if queries < n_bank:
            row["all_queries_s_extrapolated"] = round(extrapolated(seconds, queries), 3)
            row["extrapolation"] = f"linear in Q: seconds x {n_bank}/{queries}"
        else:
            row["all_queries_s_measured"] = round(seconds, 3)
        if isinstance(out, tuple) and len(out) == 3:
            row["stats"] = out[2]
        step.add(row)
        print(f"[knn] {impl}: Q={queries} {seconds:.3f} s", flush=True)

    measure("triton_fp32", q32, lambda q: knn_triton_stats(q, bank, k, precision="fp32"))
    measure("triton_fp16", q16, lambda q: knn_triton_stats(q, bank, k, precision="fp16"))

    def q_once(q):  # the A/B of knn_triton.Q_ONCE (query tile loaded once, key loads not pipelined)
        from scan_dist.kernels import knn_triton as kt

        saved = dict(kt.Q_ONCE)
        kt.Q_ONCE["fp16"] = True
        try:
            return knn_triton_stats(q, bank, k, precision="fp16")
        finally:
            kt.Q_ONCE.update(saved)

    measure("triton_fp16_q_once", q16, q_once)
    fp16_rows = [r for r in step.data["results"] if r["impl"] == "triton_fp16"]
    if fp16_rows and not step.dry:
        predicted = fp16_rows[0]["all_queries_s_extrapolated"]
        if predicted < min(45.0, step.left() / 3):
            measure("triton_fp16_all", n_bank, lambda q: knn_triton_stats(q, bank, k, precision="fp16"))
        else:
            step.note(f"fp16 on all {n_bank} queries skipped: predicted {predicted:.1f} s, {step.left():.0f} s left")
    if step.dry:
        measure("triton_fp16_all", n_bank // 16, lambda q: knn_triton_stats(q, bank, k, precision="fp16"))
    measure("naive_fp32", q32, lambda q: naive(q, bank, k, torch.float32))
    measure("naive_bf16", q32, lambda q: naive(q, bank, k, torch.bfloat16))

    ref = results.get("triton_fp32")
    if ref is not None:
        for row in step.data["results"]:
            out = results.get(row["impl"])
            if out is None or "recall_vs_triton_fp32" in row:
                continue
            rows = min(ref[1].shape[0], out[1].shape[0])
            row["recall_vs_triton_fp32"], row["rows_equal_vs_triton_fp32"] = recall(out[1][:rows], ref[1][:rows])
            row["recall_rows"] = rows
        step.save()
    results.clear()
    if not step.dry and step.left() > 60:
        big = step.attempt("D=2048 bank", lambda: make_bank(n_bank, 2048, "clustered", 1, device))
        if big is not None:
            step.attempt("D=2048 warm-up", lambda: knn_triton_stats(big[:256], big, k, precision="fp16"))
            timed = step.attempt("triton_fp16 D=2048", lambda: time_once(
                lambda: knn_triton_stats(big[:4096], big, k, precision="fp16"), device))
            if timed:
                seconds, out = timed
                step.add({"impl": "triton_fp16", "queries": 4096, "N": n_bank, "D": 2048, "k": k,
                          "seconds": round(seconds, 4), "stats": out[2],
                          "all_queries_s_extrapolated": round(extrapolated(seconds, 4096), 2),
                          "extrapolation": f"linear in Q: seconds x {n_bank}/4096"})


Tensor = torch.Tensor


# --------------------------------------------------------------------------- #
# train_step
# --------------------------------------------------------------------------- #
def step_train_step(step: Step) -> None:
    import torchvision

    from scan_dist.kernels import configure, scan_loss

    device = _device(step.dry)
    configure(self_check=False)
    heads, classes = 10, 1000
    batch, size = (2, 32) if step.dry else (256, 224)
    iters = 1 if step.dry else 8
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    backbone = torchvision.models.resnet50(weights=None)
    backbone.fc = torch.nn.Identity()
    head = torch.nn.Linear(2048, heads * classes)
    model = torch.nn.Sequential(backbone, head).to(device).to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9, weight_decay=1e-4)
    gen = torch.Generator(device=device).manual_seed(0)
    images = torch.randn(2 * batch, 3, size, size, generator=gen, device=device).to(
        memory_format=torch.channels_last)
    step.set("config", {"model": "torchvision resnet50 + Linear(2048, 10 x 1000)", "anchors_per_step": batch,
                        "images_per_step": 2 * batch, "image_size": size, "precision": "bf16 autocast",
                        "channels_last": True, "optimizer": "SGD momentum 0.9",
                        "note": "img_s counts anchors + neighbours (both go forward and backward)"})

    for backend in ("triton", "torch") if device.type == "cuda" or step.dry else ("torch",):
        def train_step():
            with torch.autocast(device.type, dtype=torch.bfloat16):
                logits = model(images)
            logits = logits.float().view(2 * batch, heads, classes).permute(1, 0, 2)
            total, _, _ = scan_loss(logits[:, :batch], logits[:, batch:], 5.0, backend=backend)
            total.sum().backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        stats = step.attempt(f"loss backend {backend}", lambda: time_iters(train_step, device, iters, rounds=3,
                                                                            warmup=1 if step.dry else 3))
        if stats:
            row = {"loss_backend": backend, **stats, "img_s": round(2 * batch / (stats["median_ms"] * 1e-3), 1),
                   "anchors_s": round(batch / (stats["median_ms"] * 1e-3), 1)}
            if device.type == "cuda":
                row["peak_mem_gib"] = round(torch.cuda.max_memory_allocated() / 2 ** 30, 2)
            step.add(row)


# --------------------------------------------------------------------------- #
# resources
# --------------------------------------------------------------------------- #
def step_resources(step: Step) -> None:
    from benchmarks import kernel_resources

    if step.dry:
        # Offline sm_90a compile of one kernel: proves the tool runs (needs TRITON_INTERPRET unset, see the .sh).
        launches = kernel_resources.scan_launches((2, 64, 100))[:1]
        for launch in launches:
            row = step.attempt("offline compile", lambda: kernel_resources.compile_offline(launch, 90))
            if row:
                step.add({"source": "offline", **row})
        return
    from scan_dist.kernels import configure, knn_triton, scan_loss_triton

    configure(self_check=False)
    device = torch.device("cuda")
    # Launch the benchmark specialisations so the JIT caches hold exactly what the benchmarks ran.
    for shape in ((10, 4096, 1000), (2, 1024, 20000)):
        a = torch.randn(shape, device=device, dtype=torch.bfloat16)
        _, _, stats = scan_loss_triton._forward(a, a, scan_loss_triton.MAX_FUSED_C)
        scan_loss_triton._backward(a, a, stats, torch.ones(shape[0], device=device),
                                   torch.ones(shape[0], shape[2], device=device), True, True,
                                   scan_loss_triton.MAX_FUSED_C)
    for precision, dim in (("fp16", 128), ("fp32", 128), ("fp16", 2048)):
        x = torch.randn(4096, dim, device=device)
        step.attempt(f"knn {precision} D{dim}", lambda: knn_triton.knn_triton(x[:512], x, 21, precision=precision))
    torch.cuda.synchronize()
    for row in kernel_resources.jit_kernels():
        step.add({"source": "jit", **row})
    for launch in kernel_resources.default_launches():
        if step.left() < 5:
            step.note("offline compiles stopped: step budget spent")
            break
        row = step.attempt(f"offline {launch['case']}", lambda: kernel_resources.compile_offline(launch, 90))
        if row:
            step.add({"source": "offline", **row})


# --------------------------------------------------------------------------- #
# assemble
# --------------------------------------------------------------------------- #
# "path::test PASSED [ 5%]" (pytest -v) or "[gw0] [ 5%] PASSED path::test" (pytest-xdist -v).
_PYTEST_LINE = re.compile(r"^(\S+::\S+)\s+(PASSED|FAILED|SKIPPED|ERROR|XFAIL|XPASS)")
_XDIST_LINE = re.compile(r"^\[gw\d+\]\s+\[\s*\d+%\]\s+(PASSED|FAILED|SKIPPED|ERROR|XFAIL|XPASS)\s+(\S+::\S+)")


def parse_pytest_log(text: str) -> dict:
    """Per-test outcomes from ``pytest -v`` output (streamed, so a killed run still has the finished tests)."""
    outcomes: dict[str, str] = {}
    for line in text.splitlines():
        line = line.strip()
        match = _PYTEST_LINE.match(line)
        if match:
            outcomes[match.group(1)] = match.group(2)
        match = _XDIST_LINE.match(line)
        if match:
            outcomes[match.group(2)] = match.group(1)
    counts: dict[str, int] = {}
    for outcome in outcomes.values():
        counts[outcome] = counts.get(outcome, 0) + 1
    summary = [line for line in text.splitlines() if re.search(r"\d+ (passed|failed|skipped|error)", line)]
    return {"counts": counts, "failed": sorted(t for t, o in outcomes.items() if o in ("FAILED", "ERROR")),
            "outcomes": outcomes, "summary_line": summary[-1].strip("= ") if summary else None}


def assemble(out: Path) -> dict:
    status_file = out / "status.tsv"
    statuses = {}
    if status_file.exists():
        for line in status_file.read_text().splitlines():
            parts = line.split("\t")
            if len(parts) == 4:
                name, rc, seconds, cap = parts
                statuses[name] = {"rc": int(rc), "seconds": float(seconds), "cap_s": float(cap),
                                  "timed_out": int(rc) in (124, 137)}
    combined: dict[str, Any] = {"gpu_check": "benchmarks/gpu_check.sh", "steps": {}}
    for name, status in statuses.items():
        entry: dict[str, Any] = dict(status)
        step_json = out / "steps" / f"{name}.json"
        if step_json.exists():
            try:
                entry["data"] = json.loads(step_json.read_text())
            except ValueError as exc:
                entry["data_error"] = str(exc)
        log = out / "logs" / f"{name}.log"
        if log.exists():
            text = log.read_text(errors="replace")
            if name.startswith("tests"):
                entry["pytest"] = parse_pytest_log(text)
            if status["rc"] != 0 or name.startswith("tests"):
                entry["log_tail"] = text.splitlines()[-25:]
        combined["steps"][name] = entry
    combined["total_seconds"] = round(sum(s["seconds"] for s in statuses.values()), 1)
    combined["all_ok"] = bool(statuses) and all(s["rc"] == 0 for s in statuses.values())
    path = out / "gpu_check.json"
    path.write_text(json.dumps(combined, indent=2, default=str) + "\n")
    return combined


# --------------------------------------------------------------------------- #
# main
# --------------------------------------------------------------------------- #
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("step", choices=[*STEPS, "assemble"])
    parser.add_argument("out", type=Path)
    parser.add_argument("--dry", action="store_true", help="CPU, tiny shapes, Triton interpreter")
    parser.add_argument("--budget-s", type=float, default=60.0, help="seconds this step may take (its timeout)")
    args = parser.parse_args(argv)
    if args.step == "assemble":
        combined = assemble(args.out)
        print(json.dumps({k: {"rc": v["rc"], "seconds": v["seconds"]} for k, v in combined["steps"].items()}))
        print(f"wrote {args.out / 'gpu_check.json'}")
        return 0
    step = Step(args.step, args.out, args.dry, args.budget_s)
    func = globals()[f"step_{args.step}"]
    failed = step.attempt(args.step, lambda: func(step)) is None and bool(step.data["errors"])
    # Never imported by these steps: a bare machine has no omegaconf, and the kernels must not need it.
    step.set("imported_project_config", "scan_dist.config" in sys.modules or "omegaconf" in sys.modules)
    step.save()
    return 1 if failed and not step.data["results"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
