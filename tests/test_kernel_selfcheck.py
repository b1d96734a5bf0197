"""The kernels' first-use self-check and fallback (kernels/_selfcheck.py), forced to fail on CPU.

The check applies to CUDA by default; here "cpu" is added to its device types so the same logic runs with the
kernels in Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1 without CUDA).  Failures are forced by
monkeypatching the kernels' host functions to raise or to return wrong numbers; each test checks the answer is the
torch reference's, that exactly one warning names the kernel, the device and the Triton version, and that the
process keeps using torch afterwards.
"""
from __future__ import annotations

import logging

import pytest
import torch

triton = pytest.importorskip("triton", reason="the self-check guards the Triton kernels")

from scan_dist import kernels  # noqa: E402
from scan_dist.kernels import _dispatch, _selfcheck, knn, scan_loss  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu" and not _dispatch.interpreting():  # pragma: no cover - conftest sets it
    pytest.skip("no CUDA and TRITON_INTERPRET is not set: the Triton kernels cannot run", allow_module_level=True)

from scan_dist.kernels import knn_triton as kt  # noqa: E402
from scan_dist.kernels import scan_loss_triton as st  # noqa: E402


@pytest.fixture
def checks(monkeypatch, caplog):
    """Self-check on, applying to this test's device, fresh state; yields the kernel warnings seen so far."""
    _selfcheck.reset()
    monkeypatch.setattr(_selfcheck, "DEVICE_TYPES", frozenset({"cuda", "cpu"}))
    monkeypatch.setenv(_selfcheck.ENV_VAR, "1")
    caplog.set_level(logging.WARNING, logger="scan_dist.kernels")

    def warnings():
        return [r for r in caplog.records if r.name == "scan_dist.kernels" and r.levelno == logging.WARNING]

    yield warnings
    _selfcheck.reset()


def _logits(shape, seed, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    a = 2 * torch.randn(shape, generator=gen)
    n = a + torch.randn(shape, generator=gen)
    return a.to(DEVICE, dtype), n.to(DEVICE, dtype)


def _loss_grads(a, n, backend):
    x = a.clone().requires_grad_(True)
    y = n.clone().requires_grad_(True)
    total, cons, ent = scan_loss(x, y, 2.0, backend=backend)
    ga, gn = torch.autograd.grad((total * torch.arange(1.0, 1.0 + total.numel(), device=DEVICE)).sum(), (x, y))
    return torch.stack([total, cons, ent]).detach(), ga, gn


def _assert_same(got, ref):
    for g, r in zip(got, ref):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-6)


def _assert_one_warning(warnings, family):
    seen = warnings()
    assert len(seen) == 1, [r.getMessage() for r in seen]
    text = seen[0].getMessage()
    assert repr(family) in text
    assert _selfcheck.describe_device(torch.device(DEVICE)) in text
    assert f"triton {triton.__version__}" in text
    return text


class _Counter:
    """Wraps a function, counting calls (to see which path ran)."""

    def __init__(self, fn):
        self.fn, self.calls = fn, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.fn(*args, **kwargs)


# --------------------------------------------------------------------------- #
# SCAN loss
# --------------------------------------------------------------------------- #
def test_scan_loss_check_runs_once_per_specialisation(checks, monkeypatch):
    check = _Counter(st.self_check)
    monkeypatch.setattr(st, "self_check", check)
    a, n = _logits((2, 9, 13), seed=1)
    first = _loss_grads(a, n, "triton")
    _loss_grads(a, n, "triton")
    assert check.calls == 1  # same dtypes and C: checked once
    _loss_grads(*_logits((2, 9, 7), seed=2), "triton")
    assert check.calls == 2  # another C is another compiled kernel: checked too
    assert not checks()
    status = kernels.kernel_status()
    assert status["enabled"] and not status["failed"] and len(status["passed"]) == 2
    _assert_same(first, _loss_grads(a, n, "torch"))


def test_scan_loss_compile_error_falls_back_with_one_warning(checks, monkeypatch):
    forward = _Counter(lambda *args: (_ for _ in ()).throw(RuntimeError("PTX compile failed (forced)")))
    monkeypatch.setattr(st, "_forward", forward)
    a, n = _logits((2, 9, 13), seed=3)
    got = _loss_grads(a, n, "triton")
    _assert_same(got, _loss_grads(a, n, "torch"))
    text = _assert_one_warning(checks, "scan_loss")
    assert "PTX compile failed (forced)" in text and "torch reference" in text
    # From now on the process uses torch: no new check, no kernel call, no second warning; "auto" too on CUDA.
    calls = forward.calls
    _assert_same(_loss_grads(*_logits((3, 5, 21), seed=4), "triton"), _loss_grads(*_logits((3, 5, 21), seed=4),
                                                                                   "torch"))
    assert forward.calls == calls and len(checks()) == 1
    assert list(kernels.kernel_status()["failed"]) == [f"scan_loss on {DEVICE}" if DEVICE == "cpu" else
                                                       f"scan_loss on cuda:{torch.cuda.current_device()}"]


def test_scan_loss_wrong_gradient_is_caught(checks, monkeypatch):
    real = st._backward

    def doubled(*args):
        da, dn = real(*args)
        return (None if da is None else 2 * da), dn

    monkeypatch.setattr(st, "_backward", doubled)
    a, n = _logits((2, 9, 13), seed=5)
    _assert_same(_loss_grads(a, n, "triton"), _loss_grads(a, n, "torch"))
    assert "backward d anchor" in _assert_one_warning(checks, "scan_loss")


def test_scan_loss_wrong_forward_is_caught(checks, monkeypatch):
    real = st._forward

    def shifted(*args):
        cs, ps, stats = real(*args)
        return cs * 1.001, ps, stats  # 0.1 %: a row in 1000 lost

    monkeypatch.setattr(st, "_forward", shifted)
    a, n = _logits((2, 9, 13), seed=6, dtype=torch.bfloat16)
    _assert_same(_loss_grads(a, n, "triton"), _loss_grads(a, n, "torch"))
    assert "forward consistency_sum" in _assert_one_warning(checks, "scan_loss")


def test_scan_loss_failure_after_a_passed_check_is_guarded(checks, monkeypatch):
    """A specialisation the small case did not exercise (here: batches larger than the check's) fails in the real
    call: the forward and, separately, the backward fall back to the reference."""
    real_fwd, real_bwd = st._forward, st._backward
    big = st.CHECK_ROWS + 1

    def fwd(a, *rest):
        if a.shape[1] >= big:
            raise RuntimeError("out of resource: shared memory (forced)")  # not an out-of-memory error
        return real_fwd(a, *rest)

    monkeypatch.setattr(st, "_forward", fwd)
    a, n = _logits((1, big, 13), seed=7)
    _assert_same(_loss_grads(a, n, "triton"), _loss_grads(a, n, "torch"))
    assert "out of resource" in _assert_one_warning(checks, "scan_loss")

    _selfcheck.reset()
    monkeypatch.setattr(_selfcheck, "DEVICE_TYPES", frozenset({"cuda", "cpu"}))
    monkeypatch.setattr(st, "_forward", real_fwd)

    def bwd(a, *rest):
        if a.shape[1] >= big:
            raise RuntimeError("backward kernel crashed (forced)")
        return real_bwd(a, *rest)

    monkeypatch.setattr(st, "_backward", bwd)
    forward = _Counter(real_fwd)
    monkeypatch.setattr(st, "_forward", forward)
    _assert_same(_loss_grads(a, n, "triton"), _loss_grads(a, n, "torch"))  # forward ran Triton, backward fell back
    assert forward.calls >= 2  # the check's forward and the real one
    warned = [r for r in checks() if "backward kernel crashed" in r.getMessage()]
    assert len(warned) == 1
    calls = forward.calls
    _loss_grads(a, n, "triton")
    assert forward.calls == calls  # switched to torch for the rest of the process


def test_out_of_memory_is_not_a_kernel_fault(checks, monkeypatch):
    def oom(*args):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory (forced)")

    monkeypatch.setattr(st, "_forward", oom)
    with pytest.raises(torch.cuda.OutOfMemoryError):
        _loss_grads(*_logits((2, 9, 13), seed=8), "triton")
    assert not checks() and not kernels.kernel_status()["failed"]


# --------------------------------------------------------------------------- #
# k-NN
# --------------------------------------------------------------------------- #
def _bank(seed, n_q=11, n_k=90, dim=24):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n_q, dim, generator=gen).to(DEVICE), torch.randn(n_k, dim, generator=gen).to(DEVICE)


def test_knn_check_passes_for_the_real_kernel(checks, monkeypatch):
    check = _Counter(kt.self_check)
    monkeypatch.setattr(kt, "self_check", check)
    queries, keys = _bank(1)
    for precision in ("fp32", "fp16"):
        got = knn(queries, keys, 5, backend="triton", precision=precision)
        ref = knn(queries, keys, 5, backend="torch")
        assert torch.equal(got[1], ref[1])
    knn(queries, keys, 5, backend="triton", precision="fp16")
    assert check.calls == 2 and not checks()


def test_knn_launch_error_falls_back(checks, monkeypatch):
    launch = _Counter(lambda *args: (_ for _ in ()).throw(RuntimeError("triton.CompilationError (forced)")))
    monkeypatch.setattr(kt, "_launch", launch)
    queries, keys = _bank(2)
    got = knn(queries, keys, 7, backend="triton", precision="fp16")
    ref = knn(queries, keys, 7, backend="torch")
    assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1])
    assert "CompilationError (forced)" in _assert_one_warning(checks, "knn")
    calls = launch.calls
    knn(queries, keys, 3, backend="triton")
    assert launch.calls == calls and len(checks()) == 1


def test_knn_wrong_neighbours_are_caught(checks, monkeypatch):
    real = kt._launch

    def off_by_one(*args):
        scores, index = real(*args)
        return scores, torch.where(index >= 0, (index + 1) % args[1].shape[0], index).to(index.dtype)

    monkeypatch.setattr(kt, "_launch", off_by_one)
    queries, keys = _bank(3)
    got = knn(queries, keys, 6, backend="triton")
    ref = knn(queries, keys, 6, backend="torch")
    assert torch.equal(got[1], ref[1])
    assert "rows have other neighbours" in _assert_one_warning(checks, "knn")


# --------------------------------------------------------------------------- #
# The switch
# --------------------------------------------------------------------------- #
def _raising_forward(monkeypatch):
    def boom(*args):
        raise RuntimeError("kernel failure (forced)")
    monkeypatch.setattr(st, "_forward", boom)


def test_switched_off_by_environment(checks, monkeypatch):
    _raising_forward(monkeypatch)
    monkeypatch.setenv(_selfcheck.ENV_VAR, "0")
    with pytest.raises(RuntimeError, match="kernel failure"):
        _loss_grads(*_logits((2, 9, 13), seed=9), "triton")
    assert not checks()


def test_configure_wins_over_environment(checks, monkeypatch):
    _raising_forward(monkeypatch)
    a, n = _logits((2, 9, 13), seed=10)
    kernels.configure(self_check=False)
    with pytest.raises(RuntimeError, match="kernel failure"):
        _loss_grads(a, n, "triton")
    monkeypatch.setenv(_selfcheck.ENV_VAR, "0")
    kernels.configure(self_check=True)
    _assert_same(_loss_grads(a, n, "triton"), _loss_grads(a, n, "torch"))
    assert len(checks()) == 1
    with pytest.raises(TypeError):
        kernels.configure(self_check="yes")


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU interpreter only")
def test_not_applied_to_the_cpu_interpreter_by_default(monkeypatch):
    """Under TRITON_INTERPRET (tests) a kernel failure must surface, not be hidden by a fallback."""
    _selfcheck.reset()
    monkeypatch.setenv(_selfcheck.ENV_VAR, "1")
    _raising_forward(monkeypatch)
    with pytest.raises(RuntimeError, match="kernel failure"):
        _loss_grads(*_logits((2, 9, 13), seed=11), "triton")
    assert not kernels.kernel_status()["failed"]


# --------------------------------------------------------------------------- #
# No false alarms: the checks pass for the real kernels
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("dtype,classes", [(torch.float32, 13), (torch.bfloat16, 1000), (torch.float16, 2500)],
                         ids=["fp32-C13", "bf16-C1000", "fp16-C2500-chunked"])
def test_scan_loss_self_check_passes(dtype, classes):
    a = torch.zeros(1, 1, classes, dtype=dtype, device=DEVICE)
    assert st.self_check(a, a) is None


@pytest.mark.parametrize("precision,dim,k", [("fp32", 24, 5), ("fp16", 72, 21), ("bf16", 16, 1), ("tf32", 40, 33)])
def test_knn_self_check_passes(precision, dim, k):
    assert kt.self_check(dim, k, precision, torch.device(DEVICE)) is None


# --------------------------------------------------------------------------- #
# Supported versions: the interpreter's known incompatibility is named, not hit
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("triton_version,numpy_version,broken", [
    ("3.6.0", "2.4.6", True), ("3.6.0", "2.3.5", False), ("3.7.1", "2.4.6", False), ("3.8.0", "2.5.2", False),
    ("3.6.0+git1234", "2.5.0rc1", True)])
def test_interpreter_problem(monkeypatch, triton_version, numpy_version, broken):
    import numpy

    monkeypatch.setattr(triton, "__version__", triton_version)
    monkeypatch.setattr(numpy, "__version__", numpy_version)
    _dispatch.interpreter_problem.cache_clear()
    try:
        problem = _dispatch.interpreter_problem()
        assert bool(problem) == broken
        if broken:
            assert "numpy<2.4" in problem
            if DEVICE == "cpu":
                with pytest.raises(RuntimeError, match="interpreter"):
                    scan_loss(*_logits((1, 2, 3), seed=0), 1.0, backend="triton")
    finally:
        _dispatch.interpreter_problem.cache_clear()
