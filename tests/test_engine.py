"""Engine: none | ddp | deepspeed give the single-process result; accumulation, gathered gradients, resume, timeout.

Multi-process cases start real ranks as subprocesses (this file run as a script, torchrun's variables set by
hand, gloo on CPU) with a hard timeout, so a broken collective fails the test instead of hanging it. Each launch
runs several scenarios and writes tensors to tmp files; the tests compare them with one process in pytest.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

REPO = Path(__file__).resolve().parents[1]
if __name__ == "__main__":  # run as a rank: make `scan_dist` and the test helpers importable
    sys.path[:0] = [str(REPO), str(REPO / "tests")]

from gloo import free_port  # noqa: E402

from scan_dist.distributed.engine import CpuSyncBatchNorm, Engine, deepspeed_config  # noqa: E402
from scan_dist.distributed.env import DistEnv, detect  # noqa: E402
from scan_dist.errors import ConfigError  # noqa: E402

GLOBAL_BATCH = 8
STEPS = 4  # total optimizer steps of the reference runs
DDP_TOL = 1e-5
DS_TOL = 1e-5  # DeepSpeed flattens/partitions and reduces in another order: fp32 rounding only
DS_BF16_TOL = 1e-2  # bf16 autocast on both sides; the halves' bf16 roundings differ from the full batch's


# --------------------------------------------------------------------------- #
# Shared model, data and loop (used by the ranks and by the reference)
# --------------------------------------------------------------------------- #
def cfg(**kw):
    base = dict(backend="none", zero_stage=0, precision="fp32", grad_accum_steps=1, timeout_s=60)
    base.update(kw)
    return types.SimpleNamespace(**base)


def single_env() -> DistEnv:
    return detect("cpu", environ={})


def bn_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(2, 4, 3, bias=False), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(36, 3))


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(50, 16), nn.Tanh(), nn.Linear(16, 3))


def sgd(model):
    return torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)


def adamw(model):
    return torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.01)


def batch(step: int):
    gen = torch.Generator().manual_seed(1000 + step)
    return torch.randn(GLOBAL_BATCH, 2, 5, 5, generator=gen), torch.randn(GLOBAL_BATCH, 3, generator=gen)


def lr_at(step: int, base: float) -> float:
    return base * 0.7 ** step


def train(engine: Engine, start: int, steps: int, rank: int = 0, world: int = 1, accum: int = 1,
          base_lr: float | None = None) -> int:
    """`steps` optimizer steps; rank r takes its 1/world of the global batch, split into `accum` micro-batches."""
    stepped = 0
    for step in range(start, start + steps):
        if base_lr is not None:
            engine.set_lr([lr_at(step, base_lr)])
        x, y = batch(step)
        x, y = x.chunk(world)[rank], y.chunk(world)[rank]
        for xm, ym in zip(x.chunk(accum), y.chunk(accum)):
            engine.backward(F.mse_loss(engine(xm), ym))
            stepped += engine.step()
    return stepped


def contrastive(z_local, z_all, offset: int):
    """NT-Xent-like: each local row scores all global rows; its 'positive' is the next global row."""
    z_local, z_all = F.normalize(z_local, dim=1), F.normalize(z_all, dim=1)
    logits = z_local @ z_all.t() / 0.5
    targets = (torch.arange(len(z_local)) + offset + 1) % len(z_all)
    return F.cross_entropy(logits, targets)


def snapshot(module: nn.Module) -> dict:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def reference(model_fn, opt_fn, steps: int, base_lr: float | None = None, precision: str = "fp32") -> dict:
    model = model_fn()
    engine = Engine(model, opt_fn(model), cfg(precision=precision), single_env())
    train(engine, 0, steps, base_lr=base_lr)
    return snapshot(model)


def assert_close(got: dict, want: dict, tol: float) -> None:
    assert got.keys() == want.keys()
    for key in want:
        diff = (got[key].double() - want[key].double()).abs().max().item() if want[key].numel() else 0.0
        assert diff <= tol, f"{key}: max |diff| {diff:.3g} > {tol}"


def assert_equal(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    for key in want:
        assert torch.equal(got[key], want[key]), key


# --------------------------------------------------------------------------- #
# Rank side (this file as a script)
# --------------------------------------------------------------------------- #
def _rank_ddp(env: DistEnv, out: Path) -> None:
    rank, world = env.rank, env.world_size
    results = {"source": env.source}
    # 1. parity with a BatchNorm model (CPU sync BN)
    model = bn_model()
    engine = Engine(model, sgd(model), cfg(backend="ddp"), env)
    results["bn_converted"] = any(isinstance(m, CpuSyncBatchNorm) for m in engine.module.modules())
    train(engine, 0, STEPS, rank, world, base_lr=0.1)
    if rank == 0:
        torch.save(snapshot(engine.module), out / "ddp_parity.pt")
    # 2. gradient accumulation: 2 micro-batches per rank
    model = mlp()
    engine = Engine(model, sgd(model), cfg(backend="ddp", grad_accum_steps=2), env)
    results["accum_steps"] = train(engine, 0, STEPS, rank, world, accum=2)
    if rank == 0:
        torch.save(snapshot(engine.module), out / "ddp_accum.pt")
    # 3. all_gather with gradient
    model = mlp()
    engine = Engine(model, sgd(model), cfg(backend="ddp"), env)
    x, _ = batch(0)
    z = engine(x.chunk(world)[rank])
    engine.backward(contrastive(z, engine.all_gather(z, grad=True), rank * len(z)))
    if rank == 0:
        torch.save({k: p.grad.clone() for k, p in engine.module.named_parameters()}, out / "ddp_gather.pt")
    # 4. plain collectives
    t = torch.tensor([float(rank + 1)])
    results["gather"] = engine.all_gather(torch.full((2, 1), float(rank))).flatten().tolist()
    results["objects"] = engine.all_gather_object({"rank": rank})
    results["sum"] = engine.all_reduce(t.clone()).item()
    results["mean"] = engine.all_reduce(t.clone(), "mean").item()
    results["max"] = engine.all_reduce(t.clone(), "max").item()
    results["min"] = engine.all_reduce(t.clone(), "min").item()
    results["group"] = engine.process_group is not None
    engine.barrier()
    # 5. resume: state after 2 steps, continued 2 steps, equals a fresh engine loaded from that state
    model = bn_model()
    engine = Engine(model, sgd(model), cfg(backend="ddp"), env)
    train(engine, 0, 2, rank, world, base_lr=0.1)
    state = engine.state_dict()
    if rank == 0:
        torch.save(state, out / "ddp_state.pt")
    train(engine, 2, 2, rank, world, base_lr=0.1)
    fresh = nn.Sequential(nn.Conv2d(2, 4, 3, bias=False), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(36, 3))
    resumed = Engine(fresh, sgd(fresh), cfg(backend="ddp"), env)
    resumed.load_state_dict(state)
    train(resumed, 2, 2, rank, world, base_lr=0.1)
    if rank == 0:
        torch.save({"continued": snapshot(engine.module), "resumed": snapshot(resumed.module)},
                   out / "ddp_resume.pt")
        (out / "ddp_results.json").write_text(json.dumps(results))


def _rank_ds(env: DistEnv, out: Path, stage: int) -> None:
    rank, world = env.rank, env.world_size
    c = cfg(backend="deepspeed", zero_stage=stage)
    model = bn_model()
    engine = Engine(model, adamw(model), c, env)
    assert engine.uses_sharded_checkpoints == (stage > 0)
    t0 = time.time()
    train(engine, 0, 2, rank, world, base_lr=1e-2)
    engine.save_sharded(out / "ckpt", "step2")
    train(engine, 2, STEPS - 2, rank, world, base_lr=1e-2)
    save_s = time.time() - t0
    model2 = bn_model()
    resumed = Engine(model2, adamw(model2), c, env)
    missing = resumed.load_sharded(out / "ckpt", "absent")
    loaded = resumed.load_sharded(out / "ckpt", "step2")
    train(resumed, 2, STEPS - 2, rank, world, base_lr=1e-2)
    optimizer = type(engine.model.optimizer).__name__
    if rank == 0:
        torch.save({"continued": snapshot(engine.module), "resumed": snapshot(resumed.module)}, out / f"ds{stage}.pt")
        (out / f"ds{stage}.json").write_text(json.dumps({"missing": missing, "loaded": loaded, "train_s": save_s,
                                                         "optimizer": optimizer}))
    if stage == 1:  # gradient accumulation: 2 micro-batches per rank and step
        model = mlp()
        engine = Engine(model, adamw(model), cfg(backend="deepspeed", zero_stage=1, grad_accum_steps=2), env)
        stepped = train(engine, 0, STEPS, rank, world, accum=2, base_lr=1e-2)
        if rank == 0:
            torch.save({"params": snapshot(engine.module), "stepped": stepped}, out / "ds1_accum.pt")
    if stage == 2:  # mixed precision: DeepSpeed's torch_autocast with fp32 weights
        model = bn_model()
        engine = Engine(model, adamw(model), cfg(backend="deepspeed", zero_stage=2, precision="bf16"), env)
        train(engine, 0, STEPS, rank, world, base_lr=1e-2)
        if rank == 0:
            torch.save(snapshot(engine.module), out / "ds2_bf16.pt")


def _rank_ds_other_world(env: DistEnv, out: Path, stage: int) -> None:
    model = bn_model()
    engine = Engine(model, adamw(model), cfg(backend="deepspeed", zero_stage=stage), env)
    try:
        engine.load_sharded(out / "ckpt", "step2")
        message = None
    except ConfigError as exc:
        message = str(exc)
    # a plain state_dict (any backend) warm-starts a ZeRO engine: its weights, not ZeRO's stale fp32 copy, train on
    source = bn_model()
    train(Engine(source, sgd(source), cfg(), env), 0, 2)
    engine.load_state_dict(Engine(source, None, cfg(), env).state_dict())
    engine.set_lr([0.0])
    train(engine, 2, 1)
    kept = all(torch.equal(a, b) for a, b in zip(engine.module.parameters(), source.parameters()))
    # fp16 on CPU through DeepSpeed's torch_autocast: trains, and its GradScaler is part of the state
    model = mlp()
    engine = Engine(model, adamw(model), cfg(backend="deepspeed", precision="fp16"), env)
    train(engine, 0, 2, base_lr=1e-2)
    scaler = engine.state_dict()["scaler"]
    (out / "other_world.json").write_text(json.dumps({"error": message, "fp16_scale": scaler and scaler["scale"],
                                                      "group": engine.process_group is None,
                                                      "warm_start_kept": kept}))


def _rank_timeout(env: DistEnv, out: Path) -> None:
    (out / f"ready{env.rank}").touch()  # both ranks imported: the 3 s timeout then only measures the collective
    while not all((out / f"ready{r}").exists() for r in range(env.world_size)):
        time.sleep(0.05)
    engine = Engine(mlp(), None, cfg(backend="ddp", timeout_s=3), env)
    engine.barrier()
    if env.rank == 1:  # a stuck rank that later dies: never joins the all_reduce
        time.sleep(30)
        os._exit(0)
    start = time.time()
    try:
        engine.all_reduce(torch.ones(4))
        error = None
    except Exception as exc:  # gloo raises RuntimeError/DistBackendError after the timeout
        error = f"{type(exc).__name__}: {str(exc)[:200]}"
    (out / "timeout.json").write_text(json.dumps({"error": error, "elapsed": time.time() - start}))
    os._exit(0)  # skip the group teardown, which would wait for the stuck peer


def _main(argv: list[str]) -> None:
    torch.set_num_threads(1)
    scenario, out = argv[0], Path(argv[1])
    env = detect("cpu")
    assert env.source == "torchrun", env
    if scenario == "ddp":
        _rank_ddp(env, out)
    elif scenario == "ds":
        _rank_ds(env, out, int(argv[2]))
    elif scenario == "ds_other_world":
        _rank_ds_other_world(env, out, int(argv[2]))
    elif scenario == "timeout":
        _rank_timeout(env, out)
    else:
        raise SystemExit(f"unknown scenario {scenario}")
    from scan_dist.distributed.env import destroy_process_group

    destroy_process_group()
    # Results are on disk. Skip interpreter teardown: a DeepSpeed/gloo background thread was once destroyed while
    # joinable there ("terminate called without an active exception", SIGABRT), failing a finished rank.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


# --------------------------------------------------------------------------- #
# Launcher
# --------------------------------------------------------------------------- #
def launch(scenario: str, world: int, out: Path, *args: str, timeout: float = 240, wait_all: bool = True) -> None:
    """Start `world` ranks of this file; fail (never hang) on timeout or a non-zero exit, showing the logs."""
    port = free_port()
    procs, logs = [], []
    for rank in range(world):
        env = dict(os.environ, RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                   LOCAL_WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                   OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu")
        for name in ("SLURM_PROCID", "SLURM_NTASKS", "SUBMITIT_EXECUTOR"):
            env.pop(name, None)
        log = out / f"{scenario}_rank{rank}.log"
        logs.append(log)
        with open(log, "w") as handle:
            procs.append(subprocess.Popen([sys.executable, __file__, scenario, str(out), *args], env=env,
                                          stdout=handle, stderr=subprocess.STDOUT, cwd=REPO))
    deadline = time.time() + timeout
    failed = None
    try:
        for rank, proc in enumerate(procs if wait_all else procs[:1]):
            try:
                code = proc.wait(timeout=max(deadline - time.time(), 1))
            except subprocess.TimeoutExpired:
                failed = f"rank {rank} still running after {timeout:.0f} s"
                break
            if code != 0:
                failed = f"rank {rank} exited with {code}"
                break
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    if failed:
        tails = "\n".join(f"--- {log.name}\n" + log.read_text()[-3000:] for log in logs)
        pytest.fail(f"{scenario}: {failed}\n{tails}")


# --------------------------------------------------------------------------- #
# Single-process tests
# --------------------------------------------------------------------------- #
def test_none_backend_trains_and_reports_world_one():
    model = bn_model()
    engine = Engine(model, sgd(model), cfg(), single_env())
    assert engine.model is engine.module is model
    assert (engine.rank, engine.world_size, engine.is_main, engine.process_group) == (0, 1, True, None)
    assert train(engine, 0, 2) == 2
    t = torch.arange(3.0)
    assert engine.all_gather(t) is t and engine.all_gather(t, grad=True) is t
    assert engine.all_reduce(t, "mean") is t and engine.all_gather_object("x") == ["x"]
    assert not engine.uses_sharded_checkpoints
    engine.barrier()


def test_ddp_with_one_process_is_unwrapped_and_equals_none():
    model = bn_model()
    engine = Engine(model, sgd(model), cfg(backend="ddp"), single_env())
    assert engine.model is model
    train(engine, 0, STEPS, base_lr=0.1)
    assert_equal(snapshot(model), reference(bn_model, sgd, STEPS, base_lr=0.1))


def test_gradient_accumulation_equals_full_batch():
    model = mlp()
    engine = Engine(model, sgd(model), cfg(grad_accum_steps=2), single_env())
    assert train(engine, 0, STEPS, accum=2) == STEPS
    assert_close(snapshot(model), reference(mlp, sgd, STEPS), 1e-6)


def test_state_dict_round_trip_resumes_bit_exactly(tmp_path):
    model = bn_model()
    engine = Engine(model, sgd(model), cfg(), single_env())
    train(engine, 0, 2)
    torch.save(engine.state_dict(), tmp_path / "s.pt")
    train(engine, 2, 2)
    fresh = bn_model()
    resumed = Engine(fresh, sgd(fresh), cfg(), single_env())
    resumed.load_state_dict(torch.load(tmp_path / "s.pt", weights_only=True))
    train(resumed, 2, 2)
    assert_equal(snapshot(fresh), snapshot(model))


def test_scheduler_steps_on_the_boundary_and_resumes():
    model = mlp()
    opt = sgd(model)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    engine = Engine(model, opt, cfg(grad_accum_steps=2), single_env(), scheduler=sched)
    train(engine, 0, 2, accum=2)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.1 * 0.25)
    state = engine.state_dict()
    assert state["micro_step"] == 4 and state["scheduler"]["last_epoch"] == 2
    fresh = mlp()
    opt2 = sgd(fresh)
    engine2 = Engine(fresh, opt2, cfg(grad_accum_steps=2), single_env(),
                     scheduler=torch.optim.lr_scheduler.StepLR(opt2, step_size=1, gamma=0.5))
    engine2.load_state_dict(state)
    assert opt2.param_groups[0]["lr"] == pytest.approx(0.1 * 0.25)


def test_scale_multiplies_the_gradient():
    grads = []
    for scale in (1.0, 3.0):
        model = mlp()
        engine = Engine(model, sgd(model), cfg(), single_env())
        x, y = batch(0)
        engine.backward(F.mse_loss(engine(x), y), scale=scale)
        grads.append(model[1].weight.grad.clone())
    torch.testing.assert_close(grads[1], 3 * grads[0])


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_low_precision_runs_on_cpu(precision):
    model = mlp()
    engine = Engine(model, sgd(model), cfg(precision=precision, grad_clip=1.0), single_env())
    assert (engine.scaler is not None) == (precision == "fp16")
    x, _ = batch(0)
    assert engine(x).dtype == (torch.bfloat16 if precision == "bf16" else torch.float16)
    before = snapshot(model)
    train(engine, 0, 2)
    assert all(torch.isfinite(v).all() for v in model.state_dict().values())
    assert not torch.equal(before["1.weight"], model.state_dict()["1.weight"])
    assert engine.state_dict()["scaler"] is not None or precision == "bf16"


def test_grad_clip_bounds_the_update():
    model = mlp()
    engine = Engine(model, torch.optim.SGD(model.parameters(), lr=1.0), cfg(grad_clip=1e-3), single_env())
    before = snapshot(model)
    x, y = batch(0)
    engine.backward(F.mse_loss(engine(x), y) * 1e3)
    engine.step()
    delta = torch.cat([(model.state_dict()[k] - before[k]).flatten() for k in before])
    assert delta.norm().item() == pytest.approx(1e-3, rel=1e-4)


def test_config_errors():
    two = DistEnv(rank=0, local_rank=0, world_size=2, local_world_size=2, master_addr="127.0.0.1",
                  master_port=1, source="torchrun", device=torch.device("cpu"), backend="gloo")
    with pytest.raises(ConfigError, match="dist.backend=none"):
        Engine(mlp(), None, cfg(), two)
    for bad, match in [(dict(backend="ddp", zero_stage=1), "zero_stage"), (dict(backend="fsdp"), "dist.backend"),
                       (dict(precision="fp8"), "dist.precision"), (dict(grad_accum_steps=0), "grad_accum_steps"),
                       (dict(backend="deepspeed"), "needs an optimizer")]:
        with pytest.raises(ConfigError, match=match):
            Engine(mlp(), None, cfg(**bad), single_env())
    with pytest.raises(RuntimeError, match="deepspeed"):
        Engine(mlp(), None, cfg(), single_env()).save_sharded(Path("x"), "t")


def test_missing_deepspeed_is_a_config_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "deepspeed", None)  # import deepspeed -> ImportError
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")  # the engine's setdefault must not leak into this process
    model = mlp()
    with pytest.raises(ConfigError, match="pip install deepspeed"):
        Engine(model, sgd(model), cfg(backend="deepspeed"), single_env())


def test_deepspeed_config_from_cfg_dist():
    config = deepspeed_config(cfg(backend="deepspeed", zero_stage=2, precision="bf16", grad_accum_steps=4,
                                  grad_clip=0.5), world_size=2)
    assert config["zero_optimization"] == {"stage": 2} and config["gradient_accumulation_steps"] == 4
    assert config["train_batch_size"] == 8 and config["gradient_clipping"] == 0.5
    assert config["torch_autocast"]["dtype"] == "bfloat16" and "bf16" not in config and "fp16" not in config
    assert config["torch_autocast"]["lower_precision_safe_modules"] == []  # gradients reduced in fp32
    assert deepspeed_config(cfg(), 1)["gradient_clipping"] == 0.0  # DeepSpeed's own default is 1.0


def test_cpu_sync_batchnorm_conversion_keeps_parameters_and_keys():
    model = bn_model()
    params = list(model.parameters())
    keys = list(model.state_dict())
    converted = CpuSyncBatchNorm.convert(model)
    assert isinstance(converted[1], CpuSyncBatchNorm)
    assert all(a is b for a, b in zip(converted.parameters(), params))
    assert list(converted.state_dict()) == keys
    plain = bn_model()
    x, _ = batch(0)
    torch.testing.assert_close(converted(x), plain(x))  # no process group: plain BatchNorm
    torch.testing.assert_close(converted[1].running_mean, plain[1].running_mean)


# --------------------------------------------------------------------------- #
# Multi-process tests
# --------------------------------------------------------------------------- #
@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    launch("ddp", 2, out)
    return out


@pytest.mark.dist
def test_ddp_matches_one_process_with_synced_batchnorm(ddp_run):
    results = json.loads((ddp_run / "ddp_results.json").read_text())
    assert results["source"] == "torchrun" and results["bn_converted"]
    got = torch.load(ddp_run / "ddp_parity.pt", weights_only=True)
    assert_close(got, reference(bn_model, sgd, STEPS, base_lr=0.1), DDP_TOL)


@pytest.mark.dist
def test_ddp_gradient_accumulation(ddp_run):
    results = json.loads((ddp_run / "ddp_results.json").read_text())
    assert results["accum_steps"] == STEPS
    assert_close(torch.load(ddp_run / "ddp_accum.pt", weights_only=True), reference(mlp, sgd, STEPS), DDP_TOL)


@pytest.mark.dist
def test_all_gather_with_grad_gives_the_global_batch_gradient(ddp_run):
    model = mlp()
    x, _ = batch(0)
    z = model(x)
    contrastive(z, z, 0).backward()
    want = {k: p.grad for k, p in model.named_parameters()}
    assert_close(torch.load(ddp_run / "ddp_gather.pt", weights_only=True), want, 1e-6)


@pytest.mark.dist
def test_ddp_collectives(ddp_run):
    results = json.loads((ddp_run / "ddp_results.json").read_text())
    assert results["gather"] == [0.0, 0.0, 1.0, 1.0]
    assert results["objects"] == [{"rank": 0}, {"rank": 1}]
    assert (results["sum"], results["mean"], results["max"], results["min"]) == (3.0, 1.5, 2.0, 1.0)
    assert results["group"]


@pytest.mark.dist
def test_ddp_resume_is_bit_exact_and_loads_into_one_process(ddp_run):
    runs = torch.load(ddp_run / "ddp_resume.pt", weights_only=True)
    assert_equal(runs["resumed"], runs["continued"])
    # world-size change: the 2-rank state after 2 steps, continued by one process on the full batch
    model = bn_model()
    engine = Engine(model, sgd(model), cfg(), single_env())
    engine.load_state_dict(torch.load(ddp_run / "ddp_state.pt", weights_only=True))
    train(engine, 2, 2, base_lr=0.1)
    assert_close(snapshot(model), reference(bn_model, sgd, STEPS, base_lr=0.1), DDP_TOL)


def _check_deepspeed(out: Path, stage: int) -> None:
    meta = json.loads((out / f"ds{stage}.json").read_text())
    assert meta == {**meta, "missing": False, "loaded": True}
    assert meta["optimizer"] == ("AdamW" if stage == 0 else "DeepSpeedZeroOptimizer")
    runs = torch.load(out / f"ds{stage}.pt", weights_only=True)
    assert_equal(runs["resumed"], runs["continued"])
    assert_close(runs["continued"], reference(bn_model, adamw, STEPS, base_lr=1e-2), DS_TOL)


@pytest.mark.dist
def test_deepspeed_zero2_matches_torch_resumes_and_rejects_other_world(tmp_path):
    pytest.importorskip("deepspeed")
    launch("ds", 2, tmp_path, "2")
    _check_deepspeed(tmp_path, 2)
    bf16 = torch.load(tmp_path / "ds2_bf16.pt", weights_only=True)
    assert all(v.dtype == torch.float32 for k, v in bf16.items() if "num_batches" not in k)
    assert_close(bf16, reference(bn_model, adamw, STEPS, base_lr=1e-2, precision="bf16"), DS_BF16_TOL)
    launch("ds_other_world", 1, tmp_path, "2")
    result = json.loads((tmp_path / "other_world.json").read_text())
    error = result["error"]
    assert error and "2 processes" in error and "this job has 1" in error
    assert result["fp16_scale"] and result["group"] and result["warm_start_kept"]


@pytest.mark.dist
@pytest.mark.parametrize("stage", [0, 1])
def test_deepspeed_zero_stages_match_torch_and_resume(tmp_path, stage):
    """ZeRO 0 and 1 (and, at stage 1, gradient accumulation through DeepSpeed)."""
    pytest.importorskip("deepspeed")
    launch("ds", 2, tmp_path, str(stage))
    _check_deepspeed(tmp_path, stage)
    if stage == 1:
        accum = torch.load(tmp_path / "ds1_accum.pt", weights_only=True)
        assert accum["stepped"] == STEPS
        assert_close(accum["params"], reference(mlp, adamw, STEPS, base_lr=1e-2), DS_TOL)


@pytest.mark.dist
def test_collective_timeout_raises_instead_of_hanging(tmp_path):
    launch("timeout", 2, tmp_path, timeout=90, wait_all=False)
    result = json.loads((tmp_path / "timeout.json").read_text())
    assert result["error"] is not None
    assert result["elapsed"] < 3 + 15, result


if __name__ == "__main__":
    _main(sys.argv[1:])


def test_unit_stride_parameters_fixes_channels_last_1x1_convs():
    """DeepSpeed's byte-view broadcast needs stride(-1) == 1; a channels_last 1x1 conv weight has stride C_in."""
    from scan_dist.distributed.engine import unit_stride_parameters

    model = torch.nn.Sequential(torch.nn.Conv2d(8, 4, 1), torch.nn.Conv2d(4, 4, 3)).to(
        memory_format=torch.channels_last)
    before = [p for p in model.parameters()]
    values = [p.detach().clone() for p in before]
    assert model[0].weight.stride(-1) != 1 and model[0].weight.is_contiguous()
    unit_stride_parameters(model)
    assert all(p.stride(-1) == 1 for p in model.parameters())
    assert all(a is b for a, b in zip(before, model.parameters()))
    assert all(torch.equal(p, v) for p, v in zip(model.parameters(), values))
