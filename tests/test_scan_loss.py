"""Tests for kernels/scan_loss.py: the SCAN loss against a naive formula, dtypes,
extreme logits, gradcheck, and 2-process (gloo) equivalence with 1 process."""

from __future__ import annotations

import os

import pytest
import torch

from gloo import free_port, gloo_group

try:
    from scan_dist.kernels import _dispatch, partial_sums, scan_loss, scan_loss_reference
except ImportError:  # not pip-installed: import from the repo root
    from kernels import _dispatch, partial_sums, scan_loss, scan_loss_reference


def naive_scan_loss(a, n, entropy_weight, eps=1e-8):
    """The textbook formula (probability space), in float64."""
    p = torch.softmax(a.double(), dim=-1)
    q = torch.softmax(n.double(), dim=-1)
    consistency = -torch.log((p * q).sum(-1)).mean(-1)
    pbar = p.mean(dim=1)
    entropy = -(pbar * torch.log(pbar.clamp_min(eps))).sum(-1)
    return consistency - entropy_weight * entropy, consistency, entropy


def logspace_float64_loss(a, n, entropy_weight, eps=1e-8):
    """Independent float64 log-space formula, valid for huge logits."""
    lp = torch.log_softmax(a.double(), dim=-1)
    lq = torch.log_softmax(n.double(), dim=-1)
    consistency = -torch.logsumexp(lp + lq, dim=-1).mean(-1)
    pbar = lp.exp().mean(dim=1)
    entropy = -(pbar * torch.log(pbar.clamp_min(eps))).sum(-1)
    return consistency - entropy_weight * entropy, consistency, entropy


def _loss_and_grads(fn, a, n, weights, entropy_weight):
    a = a.detach().clone().requires_grad_(True)
    n = n.detach().clone().requires_grad_(True)
    outs = fn(a, n, entropy_weight)
    obj = sum((w.to(o.dtype) * o).sum() for w, o in zip(weights, outs))
    ga, gn = torch.autograd.grad(obj, (a, n))
    return [o.detach() for o in outs], ga, gn


SHAPES = [(3, 37, 13), (1, 5, 2), (2, 64, 1000)]
# Forward outputs are fp32 from the (rounded) inputs, so they are tight for every
# dtype; gradients come back in the input dtype and carry its rounding.
GRAD_TOL = {torch.float32: (1e-5, 1e-7), torch.bfloat16: (1.6e-2, 1e-5), torch.float16: (2e-3, 1e-6)}


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_matches_naive_formula(shape, dtype):
    gen = torch.Generator().manual_seed(1009 * shape[1] + 13 * shape[2] + str(dtype).__len__())
    a = (3 * torch.randn(shape, generator=gen)).to(dtype)
    n = (a.float() + 2 * torch.randn(shape, generator=gen)).to(dtype)
    weights = [torch.randn(shape[0], generator=gen) for _ in range(3)]
    w_e = 5.0

    outs, ga, gn = _loss_and_grads(scan_loss, a, n, weights, w_e)
    ref_outs, ref_ga, ref_gn = _loss_and_grads(naive_scan_loss, a, n, weights, w_e)

    for o, r in zip(outs, ref_outs):
        assert o.dtype == torch.float32 and o.shape == (shape[0],)
        torch.testing.assert_close(o.double(), r, rtol=1e-5, atol=1e-5)
    assert ga.dtype == dtype and gn.dtype == dtype
    rtol, atol = GRAD_TOL[dtype]
    torch.testing.assert_close(ga.double(), ref_ga.to(dtype).double(), rtol=rtol, atol=atol)
    torch.testing.assert_close(gn.double(), ref_gn.to(dtype).double(), rtol=rtol, atol=atol)

    # The reference entry point is the same formula.
    for o, r in zip(scan_loss_reference(a, n, w_e), outs):
        torch.testing.assert_close(o.detach(), r)


@pytest.mark.parametrize("scale", [30.0, 1e4])
def test_extreme_logits_finite_and_exact(scale):
    gen = torch.Generator().manual_seed(7)
    shape = (2, 23, 11)
    # Half the entries saturated at +-scale, half uniform in (-scale, scale):
    # neighbours often disagree, so <p, q> underflows in probability space.
    a = torch.where(torch.rand(shape, generator=gen) < 0.5,
                    scale * torch.sign(torch.randn(shape, generator=gen)),
                    scale * (2 * torch.rand(shape, generator=gen) - 1))
    n = scale * (2 * torch.rand(shape, generator=gen) - 1)
    weights = [torch.randn(2, generator=gen) for _ in range(3)]

    outs, ga, gn = _loss_and_grads(scan_loss, a, n, weights, 2.0)
    for t in (*outs, ga, gn):
        assert torch.isfinite(t).all()

    ref = naive_scan_loss if scale == 30.0 else logspace_float64_loss
    ref_outs, ref_ga, ref_gn = _loss_and_grads(ref, a, n, weights, 2.0)
    for o, r in zip(outs, ref_outs):
        torch.testing.assert_close(o.double(), r, rtol=1e-5, atol=1e-4)
    if scale == 30.0:
        torch.testing.assert_close(ga.double(), ref_ga.double(), rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(gn.double(), ref_gn.double(), rtol=1e-4, atol=1e-6)


def test_disjoint_one_hot_consistency_is_exact():
    # p = onehot(0), q = onehot(1) with logit gap 2e4: log<p,q> = log(2) - 2e4 - log1p-terms.
    a = torch.tensor([[[1e4, -1e4]]])
    n = torch.tensor([[[-1e4, 1e4]]])
    _, consistency, entropy = scan_loss(a, n, 1.0)
    expected = -torch.logsumexp(torch.log_softmax(a.double(), -1) + torch.log_softmax(n.double(), -1), -1)
    torch.testing.assert_close(consistency.double(), expected.reshape(1), rtol=1e-6, atol=0)
    assert torch.isfinite(consistency).all() and consistency.item() > 1.9e4
    assert entropy.item() == pytest.approx(0.0, abs=1e-6)


def test_gradcheck_float64():
    gen = torch.Generator().manual_seed(3)
    a = torch.randn(2, 3, 4, dtype=torch.float64, generator=gen, requires_grad=True)
    n = torch.randn(2, 3, 4, dtype=torch.float64, generator=gen, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, y: scan_loss(x, y, 1.7), (a, n))


def test_partial_sums():
    gen = torch.Generator().manual_seed(4)
    a = torch.randn(3, 9, 5, generator=gen)
    prob_sum, count = partial_sums(a)
    assert count == 9 and prob_sum.shape == (3, 5) and prob_sum.dtype == torch.float32
    torch.testing.assert_close(prob_sum, torch.softmax(a, -1).sum(1))
    torch.testing.assert_close(prob_sum.sum(-1), torch.full((3,), 9.0))


def test_shape_errors():
    x = torch.randn(2, 4, 3)
    with pytest.raises(ValueError, match="ndim 3"):
        scan_loss(torch.randn(4, 3), torch.randn(4, 3), 1.0)
    with pytest.raises(ValueError, match="same shape"):
        scan_loss(x, torch.randn(2, 4, 5), 1.0)
    with pytest.raises(ValueError, match="same shape"):
        scan_loss_reference(x, torch.randn(2, 5, 3), 1.0)
    with pytest.raises(ValueError, match="ndim 3"):
        partial_sums(torch.randn(3))
    with pytest.raises(ValueError, match="non-empty"):
        scan_loss(torch.randn(2, 0, 3), torch.randn(2, 0, 3), 1.0)


# --------------------------------------------------------------------------- #
# 2-process equivalence
# --------------------------------------------------------------------------- #
def _dist_data():
    gen = torch.Generator().manual_seed(1234)
    a = 2 * torch.randn(2, 24, 7, generator=gen)
    n = a + torch.randn(2, 24, 7, generator=gen)
    weights = [torch.randn(2, generator=gen) for _ in range(3)]
    return a, n, weights


# (rank-0 rows, rank-1 rows): equal halves, an uneven split, and rank 1 with an empty local batch.
_SPLITS = [(12, 12), (17, 7), (24, 0)]


def _dist_worker(rank, world, port, out_dir, backend):
    if backend == "triton":
        # gloo moves CPU tensors, so the kernel runs in the interpreter even on a GPU machine; set before the first
        # scan_loss call imports (and decorates) the kernel in this fresh process.
        os.environ["TRITON_INTERPRET"] = "1"
    with gloo_group(rank, world, port) as dist:
        a, n, weights = _dist_data()
        results = []
        for split in _SPLITS:
            lo = sum(split[:rank])
            rows = slice(lo, lo + split[rank])
            outs, ga, gn = _loss_and_grads(
                lambda x, y, w: scan_loss(x, y, w, process_group=dist.group.WORLD, backend=backend),
                a[:, rows], n[:, rows], weights, 5.0)
            results.append({"outs": outs, "ga": ga, "gn": gn})
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))


@pytest.mark.dist
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_two_processes_match_one(tmp_path, backend):
    """2 gloo processes on parts of a batch give one process's loss (torch backend) and their rows' gradients."""
    import torch.multiprocessing as mp

    if backend == "triton":
        pytest.importorskip("triton", reason="triton is not installed")
        if _dispatch.interpreter_problem():  # the ranks run the kernel in the interpreter, even on a GPU machine
            pytest.skip(_dispatch.interpreter_problem())
    mp.spawn(_dist_worker, args=(2, free_port(), str(tmp_path), backend), nprocs=2, join=True)
    per_rank = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]

    a, n, weights = _dist_data()
    outs, ga, gn = _loss_and_grads(lambda x, y, w: scan_loss(x, y, w, backend="torch"), a, n, weights, 5.0)
    for s, split in enumerate(_SPLITS):
        lo = 0
        for r in range(2):
            res = per_rank[r][s]
            for o, ref in zip(res["outs"], outs):
                torch.testing.assert_close(o, ref, rtol=1e-5, atol=1e-6)
            rows = slice(lo, lo + split[r])
            # W x the single-process gradient on those rows: the sum backward of the one cross-rank sum
            # (kernels/_collectives.py), which a DDP gradient average turns into the single-process gradient.
            torch.testing.assert_close(res["ga"], 2 * ga[:, rows], rtol=1e-4, atol=1e-7)
            torch.testing.assert_close(res["gn"], 2 * gn[:, rows], rtol=1e-4, atol=1e-7)
            lo += split[r]
