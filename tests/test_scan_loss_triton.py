"""Tests for the Triton SCAN loss (kernels/scan_loss_triton.py) against the torch reference.

Without CUDA these run in Triton's CPU interpreter (tests/conftest.py sets TRITON_INTERPRET=1), which is slow, so
every case is small; the class counts still cover the single-pass kernels (C <= MAX_FUSED_C, non-powers of two)
and the chunked path (C > MAX_FUSED_C, or a small ``max_fused_c`` forcing several chunks on a small C).
With CUDA the same tests run compiled on the GPU, plus the ``gpu``-marked benchmark-shape parity test.
"""
from __future__ import annotations

import pytest
import torch

try:
    import triton  # noqa: F401
except ImportError:  # pragma: no cover - depends on the machine
    pytest.skip("triton is not installed (pip install triton); the torch path is covered by test_scan_loss.py",
                allow_module_level=True)

try:
    from scan_dist.kernels import _dispatch, scan_loss
    from scan_dist.kernels import scan_loss_triton as st
    from scan_dist.kernels.scan_loss import _finish, _local_terms_torch
except ImportError:  # not pip-installed: import from the repo root
    from kernels import _dispatch, scan_loss
    from kernels import scan_loss_triton as st
    from kernels.scan_loss import _finish, _local_terms_torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu" and not _dispatch.interpreting():  # pragma: no cover - conftest sets it
    pytest.skip("no CUDA and TRITON_INTERPRET is not set: the Triton kernels cannot run", allow_module_level=True)


def _logits(shape, dtype, seed, scale=3.0):
    gen = torch.Generator().manual_seed(seed)
    a = scale * torch.randn(shape, generator=gen)
    n = a + 2 * torch.randn(shape, generator=gen)
    weights = [torch.randn(shape[0], generator=gen) for _ in range(3)]
    return a.to(dtype).to(DEVICE), n.to(dtype).to(DEVICE), [w.to(DEVICE) for w in weights]


def _loss_and_grads(a, n, weights, backend, entropy_weight=5.0, process_group=None):
    """Outputs and (d/da, d/dn) of sum_i w_i . out_i: grad_outputs that are neither 1 nor equal across heads."""
    a = a.detach().clone().requires_grad_(True)
    n = n.detach().clone().requires_grad_(True)
    outs = scan_loss(a, n, entropy_weight, process_group=process_group, backend=backend)
    obj = sum((w.to(o.dtype) * o).sum() for w, o in zip(weights, outs))
    ga, gn = torch.autograd.grad(obj, (a, n))
    return [o.detach() for o in outs], ga, gn


# Gradients come back in the input dtype, so both sides carry its rounding: compare with a relative tolerance and
# an absolute one scaled by the gradient's magnitude (softmax gradients span many orders of magnitude).
GRAD_TOL = {torch.float32: (1e-4, 1e-5), torch.bfloat16: (1.6e-2, 1e-2), torch.float16: (2e-3, 1e-3)}


def _assert_grad_close(got, ref, dtype):
    assert got.dtype == ref.dtype and got.shape == ref.shape
    rtol, rel_atol = GRAD_TOL[dtype]
    scale = ref.double().abs().max().item()
    torch.testing.assert_close(got.double(), ref.double(), rtol=rtol, atol=rel_atol * scale + 1e-30)


def _assert_outputs_close(got, ref, rtol=1e-5, atol=1e-5):
    for o, r in zip(got, ref):
        assert o.dtype == r.dtype and o.shape == r.shape
        torch.testing.assert_close(o, r, rtol=rtol, atol=atol)


# (3,37,13), (1,5,2): odd sizes, one row block per head; (2,33,1000): the benchmark C, several batch slices per
# head; (1,9,2500): C > MAX_FUSED_C, the chunked kernels with a partial last chunk (2500 = 2*1024 + 452).
SHAPES = [(3, 37, 13), (1, 5, 2), (2, 33, 1000), (1, 9, 2500)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_matches_torch_backend(shape, dtype):
    a, n, weights = _logits(shape, dtype, seed=sum(shape) + len(str(dtype)))
    outs, ga, gn = _loss_and_grads(a, n, weights, "triton")
    ref_outs, ref_ga, ref_gn = _loss_and_grads(a, n, weights, "torch")
    _assert_outputs_close(outs, ref_outs)
    assert all(o.dtype == torch.float32 for o in outs)
    _assert_grad_close(ga, ref_ga, dtype)
    _assert_grad_close(gn, ref_gn, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape,max_fused_c", [((2, 11, 37), 8), ((1, 6, 13), 4), ((2, 5, 16), 8)],
                         ids=["37-in-8s", "13-in-4s", "16-in-8s-even"])
def test_chunked_path_on_small_classes(shape, max_fused_c, dtype):
    """max_fused_c forces the multi-chunk kernels (online logsumexp, column-block prob sums, 2-pass backward)."""
    a, n, _ = _logits(shape, dtype, seed=7 + shape[2])
    gen = torch.Generator().manual_seed(shape[2])
    g_cs = torch.randn(shape[0], generator=gen).to(DEVICE)
    g_ps = torch.randn(shape[0], shape[2], generator=gen).to(DEVICE)

    def run(fn):
        x = a.detach().clone().requires_grad_(True)
        y = n.detach().clone().requires_grad_(True)
        cs, ps = fn(x, y)
        ga, gn = torch.autograd.grad((cs * g_cs).sum() + (ps * g_ps).sum(), (x, y))
        return cs.detach(), ps.detach(), ga, gn

    cs, ps, ga, gn = run(lambda x, y: st.local_terms(x, y, max_fused_c=max_fused_c))
    ref_cs, ref_ps, ref_ga, ref_gn = run(_local_terms_torch)
    torch.testing.assert_close(cs, ref_cs, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ps, ref_ps, rtol=1e-5, atol=1e-5)
    _assert_grad_close(ga, ref_ga, dtype)
    _assert_grad_close(gn, ref_gn, dtype)


def _extreme(scale, shape=(2, 23, 11)):
    gen = torch.Generator().manual_seed(7)
    # Half the entries saturated at +-scale, half uniform: neighbours often disagree, so <p, q> underflows in
    # probability space and only a log-space evaluation stays finite.
    a = torch.where(torch.rand(shape, generator=gen) < 0.5,
                    scale * torch.sign(torch.randn(shape, generator=gen)),
                    scale * (2 * torch.rand(shape, generator=gen) - 1))
    n = scale * (2 * torch.rand(shape, generator=gen) - 1)
    return a, n, [torch.randn(shape[0], generator=gen) for _ in range(3)]


def _float64_logspace(a, n, entropy_weight, eps=1e-8):
    """Independent float64 log-space formula with autograd: exact reference for huge logits."""
    lp = torch.log_softmax(a, dim=-1)
    lq = torch.log_softmax(n, dim=-1)
    consistency = -torch.logsumexp(lp + lq, dim=-1).mean(-1)
    pbar = lp.exp().mean(dim=1)
    entropy = -(pbar * torch.log(pbar.clamp_min(eps))).sum(-1)
    return consistency - entropy_weight * entropy, consistency, entropy


@pytest.mark.parametrize("max_fused_c", [st.MAX_FUSED_C, 4], ids=["fused", "chunked"])
@pytest.mark.parametrize("scale", [30.0, 1e4])
def test_extreme_logits_finite_and_exact(scale, max_fused_c):
    a, n, weights = _extreme(scale)
    x = a.to(DEVICE).requires_grad_(True)
    y = n.to(DEVICE).requires_grad_(True)
    cs, ps = st.local_terms(x, y, max_fused_c=max_fused_c)
    outs = _finish(cs, ps, float(a.shape[1]), 2.0, 1e-8)
    ga, gn = torch.autograd.grad(sum((w.to(DEVICE) * o).sum() for w, o in zip(weights, outs)), (x, y))
    for t in (*outs, ga, gn):
        assert torch.isfinite(t).all()

    xd = a.double().requires_grad_(True)
    yd = n.double().requires_grad_(True)
    ref = _float64_logspace(xd, yd, 2.0)
    ref_ga, ref_gn = torch.autograd.grad(sum((w.double() * o).sum() for w, o in zip(weights, ref)), (xd, yd))
    for o, r in zip(outs, ref):
        # consistency is ~1e4 for disjoint rows; fp32 resolves it to ~ulp(2e4) = 2e-3.
        torch.testing.assert_close(o.cpu().double(), r.detach(), rtol=1e-5, atol=1e-4)
    # Softmax gradients stay bounded whatever the scale; recomputed from the saved row maxima and log-sums they
    # are exact to fp32 rounding, not just to ulp(scale).
    atol = 1e-6 * ref_ga.abs().max().item()
    torch.testing.assert_close(ga.cpu().double(), ref_ga, rtol=1e-4, atol=atol)
    torch.testing.assert_close(gn.cpu().double(), ref_gn, rtol=1e-4, atol=atol)


@pytest.mark.parametrize("max_fused_c", [st.MAX_FUSED_C, 1], ids=["fused", "chunked"])
def test_disjoint_one_hot_consistency_is_exact(max_fused_c):
    # p = onehot(0), q = onehot(1) with logit gap 2e4: <p, q> = exp(-2e4) underflows; its log must not.
    a = torch.tensor([[[1e4, -1e4]]], device=DEVICE)
    n = torch.tensor([[[-1e4, 1e4]]], device=DEVICE)
    cs, ps = st.local_terms(a, n, max_fused_c=max_fused_c)
    expected = -torch.logsumexp(torch.log_softmax(a.double(), -1) + torch.log_softmax(n.double(), -1), -1)
    torch.testing.assert_close(cs.double(), expected.reshape(1), rtol=1e-6, atol=0)
    torch.testing.assert_close(ps, torch.tensor([[1.0, 0.0]], device=DEVICE))


def test_deterministic_bits():
    # Several batch slices per head (B=33 > one row block), so the two-stage reduction is exercised.
    a, n, weights = _logits((2, 33, 1000), torch.bfloat16, seed=11)
    first = _loss_and_grads(a, n, weights, "triton")
    second = _loss_and_grads(a, n, weights, "triton")
    for x, y in zip([*first[0], first[1], first[2]], [*second[0], second[1], second[2]]):
        assert torch.equal(x, y)


def test_strided_inputs_and_gradient_layout():
    """A [B, H, C] -> [H, B, C] permuted view is read in place and its gradient keeps that layout; a class-strided
    view (copied) and an expanded one (stride 0 over heads) give the reference gradients too."""
    gen = torch.Generator().manual_seed(5)
    heads, batch, classes = 3, 10, 7
    base_a = torch.randn(batch, heads, classes, generator=gen).to(DEVICE)
    base_n = torch.randn(batch, heads, classes, generator=gen).to(DEVICE)
    weights = [torch.randn(heads, generator=gen).to(DEVICE) for _ in range(3)]

    def both(make):
        results = []
        for backend in ("triton", "torch"):
            x = base_a.clone().requires_grad_(True)
            y = base_n.clone().requires_grad_(True)
            xa, yn = make(x), make(y)
            seen = []  # the gradient exactly as the loss hands it to the view (retain_grad would copy it)
            xa.register_hook(seen.append)
            outs = scan_loss(xa, yn, 5.0, backend=backend)
            (sum((w * o).sum() for w, o in zip(weights, outs))).backward()
            results.append((outs, x.grad, y.grad, seen[0]))
        return results

    for make in (lambda t: t.permute(1, 0, 2),                                   # strides (C, H*C, 1)
                 lambda t: t.permute(1, 2, 0).contiguous().permute(0, 2, 1),     # class stride B: copied
                 lambda t: t[:, :1].permute(1, 0, 2).expand(heads, batch, classes)):  # head stride 0
        (outs, ga, gn, gxa), (ref_outs, ref_ga, ref_gn, _) = both(make)
        _assert_outputs_close(outs, ref_outs)
        _assert_grad_close(ga, ref_ga, torch.float32)
        _assert_grad_close(gn, ref_gn, torch.float32)
    # The permuted view's gradient has the view's strides (empty_like keeps dense layouts).
    (_, _, _, gxa), _ = both(lambda t: t.permute(1, 0, 2))
    assert gxa.stride() == base_a.permute(1, 0, 2).stride()


@pytest.mark.parametrize("side", ["anchor", "neighbor"])
def test_gradient_on_one_side_only(side):
    a, n, weights = _logits((2, 9, 13), torch.float32, seed=3)
    results = []
    for backend in ("triton", "torch"):
        x = a.clone().requires_grad_(side == "anchor")
        y = n.clone().requires_grad_(side == "neighbor")
        outs = scan_loss(x, y, 5.0, backend=backend)
        (grad,) = torch.autograd.grad(sum((w * o).sum() for w, o in zip(weights, outs)),
                                      (x if side == "anchor" else y,))
        results.append(grad)
    _assert_grad_close(results[0], results[1], torch.float32)


@pytest.mark.parametrize("used", ["consistency_sum", "prob_sum"])
@pytest.mark.parametrize("max_fused_c", [st.MAX_FUSED_C, 4], ids=["fused", "chunked"])
def test_only_one_output_used(used, max_fused_c):
    """An unused output reaches backward as None (no materialised zeros): its term is skipped, and with only
    prob_sum used the neighbour gradient is exactly zero."""
    a, n, _ = _logits((2, 7, 11), torch.float32, seed=9)
    g = torch.randn(2, 11, device=DEVICE) if used == "prob_sum" else torch.randn(2, device=DEVICE)
    grads = []
    for fn in (lambda x, y: st.local_terms(x, y, max_fused_c=max_fused_c), _local_terms_torch):
        x = a.clone().requires_grad_(True)
        y = n.clone().requires_grad_(True)
        cs, ps = fn(x, y)
        out = ps if used == "prob_sum" else cs
        grads.append(torch.autograd.grad((out * g).sum(), (x, y), allow_unused=True, materialize_grads=True))
    for got, ref in zip(*grads):
        _assert_grad_close(got, ref, torch.float32)
    if used == "prob_sum":
        assert torch.count_nonzero(grads[0][1]) == 0


def test_single_class_and_mixed_dtypes():
    # C = 1: p = q = 1, every term is 0 (BLOCK_C = 1 kernels).  Mixed input dtypes: each gradient in its own dtype.
    a, n, weights = _logits((2, 3, 1), torch.float32, seed=4)
    outs, ga, gn = _loss_and_grads(a, n, weights, "triton")
    assert all(torch.equal(o, torch.zeros(2, device=DEVICE)) for o in outs)
    assert torch.equal(ga, torch.zeros_like(a)) and torch.equal(gn, torch.zeros_like(n))

    a, n, weights = _logits((2, 7, 5), torch.float32, seed=6)
    n = n.to(torch.bfloat16)
    outs, ga, gn = _loss_and_grads(a, n, weights, "triton")
    ref_outs, ref_ga, ref_gn = _loss_and_grads(a, n, weights, "torch")
    _assert_outputs_close(outs, ref_outs)
    _assert_grad_close(ga, ref_ga, torch.float32)
    _assert_grad_close(gn, ref_gn, torch.bfloat16)


def test_empty_local_batch():
    a = torch.randn(2, 0, 5, device=DEVICE, requires_grad=True)
    n = torch.randn(2, 0, 5, device=DEVICE, requires_grad=True)
    cs, ps = st.local_terms(a, n)
    assert torch.equal(cs, torch.zeros(2, device=DEVICE)) and torch.equal(ps, torch.zeros(2, 5, device=DEVICE))
    assert cs.requires_grad and ps.requires_grad  # still in the graph: the all-reduce backward must run
    ga, gn = torch.autograd.grad(cs.sum() + ps.sum(), (a, n))
    assert ga.shape == a.shape and gn.shape == n.shape


def test_float64_and_backend_names():
    a, n, _ = _logits((2, 4, 3), torch.float64, seed=1)
    # float64 always takes the exact torch path, even when "triton" is asked for.
    for o, r in zip(scan_loss(a, n, 1.5, backend="triton"), scan_loss(a, n, 1.5, backend="torch")):
        assert o.dtype == torch.float64
        torch.testing.assert_close(o, r, rtol=0, atol=0)
    with pytest.raises(ValueError, match="backend"):
        scan_loss(a.float(), n.float(), 1.5, backend="cuda")
    with pytest.raises(TypeError, match="float64"):
        st.local_terms(a, n)


# --------------------------------------------------------------------------- #
# Training: the same loss curve with both backends
# --------------------------------------------------------------------------- #
def _train(backend, steps=20, heads=2, classes=5, batch=24, dim=8):
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(21)
    x = torch.randn(batch, dim, generator=gen).to(DEVICE)
    x_nb = (x + 0.3 * torch.randn(batch, dim, generator=gen).to(DEVICE))
    model = torch.nn.Linear(dim, heads * classes).to(DEVICE)
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    losses = []
    for _ in range(steps):
        # [B, H*C] -> [H, B, C] as a permuted view, the way a multi-head model hands its logits over.
        logits = model(torch.cat([x, x_nb])).view(2 * batch, heads, classes).permute(1, 0, 2)
        total, _, _ = scan_loss(logits[:, :batch], logits[:, batch:], 5.0, backend=backend)
        loss = total.sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return torch.tensor(losses), [p.detach().clone() for p in model.parameters()]


def test_training_curve_matches_torch():
    losses, params = _train("triton")
    ref_losses, ref_params = _train("torch")
    assert ref_losses[-1] < ref_losses[0]  # it actually trains
    torch.testing.assert_close(losses, ref_losses, rtol=1e-4, atol=1e-4)
    for p, r in zip(params, ref_params):
        torch.testing.assert_close(p, r, rtol=1e-4, atol=1e-4)


# --------------------------------------------------------------------------- #
# GPU: the benchmark shapes
# --------------------------------------------------------------------------- #
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (benchmark-shape parity)")
@pytest.mark.parametrize("shape", [(10, 4096, 1000), (1, 65536, 1000), (2, 1024, 20000)],
                         ids=["H10-B4096-C1000", "H1-B65536-C1000", "H2-B1024-C20000-chunked"])
def test_gpu_benchmark_shapes_bf16(shape):
    a, n, weights = _logits(shape, torch.bfloat16, seed=2)
    outs, ga, gn = _loss_and_grads(a, n, weights, "triton")
    ref_outs, ref_ga, ref_gn = _loss_and_grads(a, n, weights, "torch")
    # fp32 sums over up to 65536 rows in different orders: relative agreement ~1e-6, checked at 1e-4.
    _assert_outputs_close(outs, ref_outs, rtol=1e-4, atol=1e-4)
    _assert_grad_close(ga, ref_ga, torch.bfloat16)
    _assert_grad_close(gn, ref_gn, torch.bfloat16)
    again = _loss_and_grads(a, n, weights, "triton")
    assert all(torch.equal(x, y) for x, y in zip([*outs, ga, gn], [*again[0], again[1], again[2]]))
