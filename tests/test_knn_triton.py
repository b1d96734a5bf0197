"""Tests for kernels/knn_triton.py: the Triton k-NN against brute force (awkward sizes, both metrics, input dtypes,
ties, zero rows), the provably exact bf16/tf32 fast path on adversarial near-tie data, backend selection, the
2-process sharded search with backend="triton", and a larger bank on a GPU.

Without CUDA the kernel runs in Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1): shapes are small.
"""
from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton", reason="triton is not installed (pip install triton); the torch path is tested in "
                    "test_knn.py")

from gloo import free_port, gloo_group  # noqa: E402

try:  # noqa: E402
    from scan_dist.kernels import knn, knn_sharded
    from scan_dist.kernels.knn import knn_reference, select_backend
except ImportError:  # not pip-installed: import from the repo root
    from kernels import knn, knn_sharded
    from kernels.knn import knn_reference, select_backend

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def _triton_module():
    # Imported lazily: the kernel is decorated at import, after conftest set TRITON_INTERPRET.
    try:
        from scan_dist.kernels import knn_triton
    except ImportError:
        from kernels import knn_triton
    return knn_triton


def _run(queries, keys, k, metric="cosine", precision="fp32", chunk_size=None, query_chunk_size=None,
         candidates=None):
    """(scores, index, stats) on DEV; stats say which pass resolved the rows (knn_triton_stats)."""
    return _triton_module().knn_triton_stats(queries.to(DEV), keys.to(DEV), k, metric, chunk_size,
                                             query_chunk_size, precision, candidates)


def assert_exact(got, ref, atol=1e-5):
    """Same indices as the reference, scores within fp32 rounding (scaled for large ip scores)."""
    scores, index = got[0].cpu(), got[1].cpu()
    ref_scores, ref_index = ref[0].cpu(), ref[1].cpu()
    assert scores.dtype == torch.float32 and index.dtype == torch.int64
    assert scores.shape == ref_scores.shape and index.shape == ref_index.shape
    assert torch.equal(index, ref_index)
    atol = atol * max(1.0, ref_scores.abs().max().item())
    torch.testing.assert_close(scores, ref_scores, rtol=0, atol=atol)


# --------------------------------------------------------------------------- #
# Agreement with brute force
# --------------------------------------------------------------------------- #
# (Q, N, D, k): awkward sizes, k = 1, k = N, D not a multiple of 16, N smaller than one key tile.
_SHAPES = [(37, 300, 72, 21), (5, 40, 10, 1), (9, 33, 24, 33), (70, 19, 5, 7)]


@pytest.mark.parametrize("metric", ["cosine", "ip"])
@pytest.mark.parametrize("shape", _SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_fp32_matches_reference(metric, shape):
    n_q, n_k, dim, k = shape
    gen = torch.Generator().manual_seed(sum(shape))
    queries, keys = torch.randn(n_q, dim, generator=gen), torch.randn(n_k, dim, generator=gen)
    scores, index, stats = _run(queries, keys, k, metric)
    assert stats["exact"] == n_q
    assert_exact((scores, index), knn_reference(queries, keys, k, metric))


@pytest.mark.parametrize("precision", ["fp16", "bf16", "tf32"])
@pytest.mark.parametrize("metric", ["cosine", "ip"])
def test_fast_path_matches_reference(metric, precision):
    gen = torch.Generator().manual_seed(11)
    queries, keys = torch.randn(37, 72, generator=gen), torch.randn(300, 72, generator=gen)
    keys[::7] *= 3.0  # uneven norms (matters for ip)
    for k in (21, 1):
        scores, index, stats = _run(queries, keys, k, metric, precision)
        assert_exact((scores, index), knn_reference(queries, keys, k, metric))
        assert stats["exact"] == 0 and stats["proved"][0] > 0


@pytest.mark.parametrize("dim", [32, 64, 100, 300])
def test_dimension_paths(monkeypatch, dim):
    """Every way the kernel walks D: zero-padded to a multiple of 16 (100 -> 112), a compile-time D (<= 256) whose
    slices divide it, the query tile loaded once per program (power-of-two D, switched on here), and a runtime D
    (300 -> 304 > 256)."""
    kt = _triton_module()
    monkeypatch.setattr(kt, "Q_ONCE", dict.fromkeys(kt.Q_ONCE, True))
    gen = torch.Generator().manual_seed(dim)
    queries, keys = torch.randn(19, dim, generator=gen), torch.randn(150, dim, generator=gen)
    keys[77] = queries[4]
    for metric in ("cosine", "ip"):
        ref = knn_reference(queries, keys, 9, metric)
        for precision in ("fp32", "fp16", "bf16"):
            assert_exact(_run(queries, keys, 9, metric, precision)[:2], ref)


def test_candidates_grow_with_dimension():
    kt = _triton_module()
    assert kt.default_candidates(21, "fp16") == 32 and kt.default_candidates(21, "fp16", 128) == 32
    assert kt.default_candidates(21, "fp16", 2048) == 64 and kt.default_candidates(21, "bf16", 2048) == 64
    assert kt.default_candidates(100, "fp16", 2048) == 256


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_inputs(dtype):
    gen = torch.Generator().manual_seed(2)
    queries, keys = torch.randn(17, 40, generator=gen).to(dtype), torch.randn(90, 40, generator=gen).to(dtype)
    for metric in ("cosine", "ip"):
        ref = knn_reference(queries.float(), keys.float(), 9, metric)
        for precision in ("fp32", "fp16", "bf16"):
            assert_exact(_run(queries, keys, 9, metric, precision)[:2], ref)


def test_public_knn_routes_to_triton_with_chunks():
    # Several key chunks (launches carrying the running threshold, chunks smaller than k) and query chunks.
    gen = torch.Generator().manual_seed(3)
    queries, keys = torch.randn(20, 40, generator=gen), torch.randn(120, 40, generator=gen)
    ref = knn_reference(queries, keys, 21)
    for chunks in [(50, 8), (16, 20)]:
        for precision in ("fp32", "fp16"):
            got = knn(queries.to(DEV), keys.to(DEV), 21, chunk_size=chunks[0], query_chunk_size=chunks[1],
                      backend="triton", precision=precision)
            assert_exact(got, ref)


# --------------------------------------------------------------------------- #
# Ties, duplicates, zero rows
# --------------------------------------------------------------------------- #
def test_exact_ties_and_duplicates_prefer_smaller_index():
    # Integer vectors: every inner product is exact in fp32 whatever the summation order, so duplicate keys tie
    # bit-for-bit and the answer is unique under (-score, index).
    gen = torch.Generator().manual_seed(4)
    base = torch.randint(-3, 4, (10, 24), generator=gen).float()
    keys = base[torch.randint(0, 10, (150,), generator=gen)]  # ~15 copies of each row
    queries = torch.randint(-3, 4, (13, 24), generator=gen).float()
    full = queries @ keys.T
    for precision in ("fp32", "bf16"):
        for chunks in [(None, None), (37, 7)]:
            scores, index, _ = _run(queries, keys, 30, "ip", precision, *chunks)
            ref = knn_reference(queries, keys, 30, "ip")
            assert torch.equal(scores.cpu(), ref[0]) and torch.equal(index.cpu(), ref[1])
            for row in range(queries.shape[0]):
                order = sorted(range(keys.shape[0]), key=lambda j: (-full[row, j].item(), j))[:30]
                assert index[row].tolist() == order
        # cosine: the scores of duplicates are equal, so within every run of equal scores indices ascend
        scores, index, _ = _run(queries, keys, 30, "cosine", precision)
        same = scores[:, 1:] == scores[:, :-1]
        assert (index[:, 1:] > index[:, :-1])[same].all()
        # Different key rows whose cosines are equal in exact arithmetic round differently under another summation
        # order (D padded to 16 here, tensor cores on a GPU): the answer is exact when every returned neighbour's
        # float64 cosine equals the reference's at that rank, to fp32 rounding (measured: 3e-8 apart).
        ref_scores, _ = knn_reference(queries, keys, 30, "cosine")
        true = F.normalize(queries.double(), dim=1) @ F.normalize(keys.double(), dim=1).T
        picked = torch.gather(true, 1, index.cpu())
        torch.testing.assert_close(picked, ref_scores.double(), rtol=0, atol=1e-6)
        torch.testing.assert_close(scores.cpu(), ref_scores, rtol=0, atol=1e-6)
        assert all(len(set(row)) == 30 for row in index.tolist())


def test_tie_at_the_cut_keeps_smallest_indices():
    keys, queries = torch.ones(40, 8), torch.ones(3, 8)
    for precision in ("fp32", "fp16", "bf16", "tf32"):
        for chunk in (None, 7):
            scores, index, _ = _run(queries, keys, 5, "ip", precision, chunk_size=chunk)
            assert index.tolist() == [[0, 1, 2, 3, 4]] * 3
            assert (scores == 8.0).all()


def test_one_ulp_near_ties_order_by_score():
    n = 12
    keys = torch.zeros(n, 4)
    keys[:, 0] = 1.0 + torch.arange(n, dtype=torch.float32) * 2.0 ** -23
    queries = torch.tensor([[1.0, 0.0, 0.0, 0.0]])
    for precision in ("fp32", "fp16", "bf16"):
        scores, index, _ = _run(queries, keys, n, "ip", precision, chunk_size=5)
        assert index[0].tolist() == list(range(n - 1, -1, -1))
        assert torch.equal(scores[0].cpu(), keys[:, 0].flip(0))


def test_zero_rows_cosine():
    gen = torch.Generator().manual_seed(5)
    keys, queries = torch.randn(10, 6, generator=gen), torch.randn(4, 6, generator=gen)
    keys[3] = 0
    queries[1] = 0
    for precision in ("fp32", "fp16"):
        scores, index, _ = _run(queries, keys, 10, "cosine", precision)
        assert torch.isfinite(scores).all()
        assert (scores[1] == 0).all() and index[1].tolist() == list(range(10))
        assert dict(zip(index[0].tolist(), scores[0].tolist()))[3] == 0.0
        assert_exact((scores, index), knn_reference(queries, keys, 10, "cosine"))


# --------------------------------------------------------------------------- #
# Fast path on adversarial data
# --------------------------------------------------------------------------- #
def _clustered(n_queries, dim, cluster, spacing, n_far, seed):
    """Query i = e_i; for each query a cluster of keys whose cosine to it is 0.99 - spacing * r (r = 0..cluster-1,
    shuffled so index order is not score order), plus ``n_far`` random keys far below (cosine < ~0.6)."""
    gen = torch.Generator().manual_seed(seed)
    queries = torch.eye(n_queries, dim)
    keys = []
    for i in range(n_queries):
        cos = 0.99 - spacing * torch.randperm(cluster, generator=gen).double()
        rest = torch.randn(cluster, dim, generator=gen, dtype=torch.float64)
        rest[:, i] = 0
        rest = rest / rest.norm(dim=1, keepdim=True)
        key = rest * (1 - cos * cos).sqrt().unsqueeze(1)
        key[:, i] = cos
        keys.append(key.float())
    keys.append(torch.randn(n_far, dim, generator=gen))
    keys = torch.cat(keys)
    perm = torch.randperm(keys.shape[0], generator=gen)
    return queries, keys[perm]


def test_fast_path_reorders_near_ties_inside_the_margin():
    # 30 keys per query within 0.003 of each other: below the bf16 margin (E ~ 0.008), far above fp32 rounding.
    # K' = 64 candidates still provably contain the top 21 (the rest score < 0.6), so no row needs a second pass,
    # and the fp32 re-rank must produce the exact order that bf16 scores alone get wrong.
    queries, keys = _clustered(6, 32, cluster=30, spacing=1e-4, n_far=150, seed=7)
    ref = knn_reference(queries, keys, 21)
    approx_order = torch.sort(queries.bfloat16().float() @ keys.bfloat16().float().T, dim=1, descending=True,
                              stable=True).indices[:, :21]
    assert not torch.equal(approx_order, ref[1])  # the data really is adversarial for bf16
    for precision in ("bf16", "fp16", "tf32"):
        scores, index, stats = _run(queries, keys, 21, "cosine", precision, candidates=64)
        assert stats["proved"] == [6] and stats["exact"] == 0
        assert_exact((scores, index), ref)


def test_fast_path_second_pass_and_exact_fallback():
    # 100 near-ties per query within 0.001 (inside every format's margin): 32 candidates cannot be proven to hold
    # the true top 21, the second pass (128 candidates) can.
    queries, keys = _clustered(3, 16, cluster=100, spacing=1e-5, n_far=40, seed=8)
    ref = knn_reference(queries, keys, 21)
    scores, index, stats = _run(queries, keys, 21, "cosine", "fp16", candidates=32)
    assert stats["candidates"] == [32, 128] and stats["proved"] == [0, 3] and stats["exact"] == 0
    assert_exact((scores, index), ref)
    # 16 -> 64 candidates: neither pass can prove it, every row is redone by the exact kernel -- still exact.
    scores, index, stats = _run(queries, keys, 21, "cosine", "bf16", candidates=16)
    assert stats["candidates"] == [21, 84] and stats["proved"] == [0, 0] and stats["exact"] == 3
    assert_exact((scores, index), ref)


def test_fast_path_many_duplicates():
    gen = torch.Generator().manual_seed(9)
    base = torch.randn(6, 40, generator=gen)
    keys = base[torch.randint(0, 6, (200,), generator=gen)]
    keys[50:60] = base[0] * 2.0  # cosine: bit-identical to the copies of row 0 (x2 is exact); ip: twice the score
    queries = torch.cat([base[:3], torch.randn(5, 40, generator=gen)])
    for metric in ("cosine", "ip"):
        ref = knn_reference(queries, keys, 25, metric)
        for precision in ("fp16", "bf16"):
            scores, index, _ = _run(queries, keys, 25, metric, precision)
            assert_exact((scores, index), ref)


def test_error_bound_holds_on_random_data():
    error_bound = _triton_module().error_bound
    gen = torch.Generator().manual_seed(10)
    for dim in (8, 72, 2048):
        q = torch.nn.functional.normalize(torch.randn(16, dim, generator=gen), dim=1)
        x = torch.nn.functional.normalize(torch.randn(64, dim, generator=gen), dim=1)
        x[:8] = q[:8]  # self-pairs: every rounding error has the same sign (the worst case of the rounding term)
        x[8] = q[8] * 1e-6  # tiny components: fp16 subnormals
        exact = q.double() @ x.double().T
        for precision, cast in (("bf16", torch.bfloat16), ("fp16", torch.float16)):
            approx = q.to(cast).double() @ x.to(cast).double().T
            bound = error_bound(precision, dim, torch.ones(16, dtype=torch.float64), 1.0)
            assert ((approx - exact).abs() <= bound.unsqueeze(1)).all()
        assert error_bound("fp16", dim, torch.ones(1, dtype=torch.float64), 1.0) < 2.5e-3


# --------------------------------------------------------------------------- #
# Backend selection and errors
# --------------------------------------------------------------------------- #
def test_select_backend_triton(monkeypatch):
    assert select_backend("torch", "cpu") == "torch"
    if torch.cuda.is_available():
        assert select_backend("auto", "cuda") == "triton"
        assert select_backend("triton", "cuda") == "triton"
    else:
        assert select_backend("auto", "cuda") == "triton"  # auto only looks at the device type
        with pytest.raises(RuntimeError, match="mine.backend=torch, faiss or auto"):
            select_backend("triton", "cuda")
    assert select_backend("auto", "cpu") == "torch"
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert select_backend("triton", "cpu") == "triton"
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="mine.backend"):
        select_backend("triton", "cpu")


def test_errors():
    q, x = torch.randn(4, 8, device=DEV), torch.randn(10, 8, device=DEV)
    with pytest.raises(ValueError, match="precision"):
        knn(q, x, 3, backend="triton", precision="fp8")
    with pytest.raises(ValueError, match="backend"):
        knn(q, x, 3, backend="cuda")
    with pytest.raises(ValueError, match="larger than the number of keys"):
        _run(q, x, 11)
    with pytest.raises(ValueError, match="candidates"):
        _run(q, x, 3, precision="fp16", candidates=0)


def test_auto_on_cpu_is_torch_and_agrees():
    gen = torch.Generator().manual_seed(12)
    queries, keys = torch.randn(8, 16, generator=gen), torch.randn(50, 16, generator=gen)
    auto = knn(queries, keys, 5)  # CPU: torch path
    assert_exact(auto, _run(queries, keys, 5)[:2])


# --------------------------------------------------------------------------- #
# 2-process sharded search with backend="triton"
# --------------------------------------------------------------------------- #
def _shard_data():
    gen = torch.Generator().manual_seed(99)
    queries = torch.randn(21, 40, generator=gen)
    keys = torch.randn(200, 40, generator=gen)
    int_base = torch.randint(-2, 3, (6, 16), generator=gen).float()
    int_keys = int_base[torch.randint(0, 6, (45,), generator=gen)]
    int_queries = torch.randint(-2, 3, (9, 16), generator=gen).float()
    return queries, keys, int_queries, int_keys


def _shard_worker(rank, world, port, out_dir):
    # gloo moves CPU tensors, so the kernel runs in the interpreter here even on a GPU machine.  Set before the
    # first knn call imports (and decorates) the kernel in this fresh process.
    os.environ["TRITON_INTERPRET"] = "1"
    with gloo_group(rank, world, port) as dist:
        queries, keys, int_queries, int_keys = _shard_data()
        results = {}
        for cut in (90, 5):  # uneven halves; rank 0 with fewer than k keys
            local = keys[:cut] if rank == 0 else keys[cut:]
            results[f"cos{cut}"] = knn_sharded(queries, local, 21, metric="cosine", backend="triton")
            results[f"fast{cut}"] = knn_sharded(queries, local, 21, key_offset=0 if rank == 0 else cut,
                                                metric="ip", backend="triton", precision="fp16")
        local = int_keys[:20] if rank == 0 else int_keys[20:]
        results["ties"] = knn_sharded(int_queries, local, 25, group=dist.group.WORLD, metric="ip",
                                      backend="triton")
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))


@pytest.mark.dist
def test_sharded_two_processes_triton_match_single(tmp_path):
    import torch.multiprocessing as mp

    try:
        from scan_dist.kernels import _dispatch
    except ImportError:
        from kernels import _dispatch
    if _dispatch.interpreter_problem():  # gloo ranks run the kernel in the interpreter, even on a GPU machine
        pytest.skip(_dispatch.interpreter_problem())

    mp.spawn(_shard_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    per_rank = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    queries, keys, int_queries, int_keys = _shard_data()
    ref_cos = _run(queries, keys, 21, "cosine")[:2]
    ref_ip = knn_reference(queries, keys, 21, "ip")
    ref_ties = knn_reference(int_queries, int_keys, 25, "ip")
    for res in per_rank:
        for cut in (90, 5):
            assert_exact(res[f"cos{cut}"], ref_cos)
            assert_exact(res[f"fast{cut}"], ref_ip)
        assert torch.equal(res["ties"][0], ref_ties[0]) and torch.equal(res["ties"][1], ref_ties[1])
    for name in per_rank[0]:
        assert torch.equal(per_rank[0][name][1], per_rank[1][name][1])


# --------------------------------------------------------------------------- #
# GPU: a larger random bank, compiled kernel
# --------------------------------------------------------------------------- #
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (the compiled Triton kernel)")
@pytest.mark.parametrize("dim", [128, 2048])
def test_gpu_large_bank(dim):
    gen = torch.Generator(device="cuda").manual_seed(13)
    n_keys = 200_000 if dim == 128 else 50_000
    keys = torch.randn(n_keys, dim, generator=gen, device="cuda")
    keys[1000:1100] = keys[:100]  # exact duplicates across tiles
    queries = torch.cat([keys[:64], torch.randn(960, dim, generator=gen, device="cuda")])
    for metric in ("cosine", "ip"):
        ref = knn(queries, keys, 21, metric=metric, backend="torch")
        for precision in ("fp32", "fp16", "bf16", "tf32"):
            scores, index, stats = _run(queries, keys, 21, metric, precision)
            # Different fp32 summation orders may swap keys whose scores are within rounding of each other.
            differ = index != ref[1]
            if differ.any():
                assert (scores[differ] - ref[0][differ]).abs().max() <= 1e-5 * max(1.0, ref[0].abs().max().item())
            torch.testing.assert_close(scores, ref[0], rtol=0, atol=1e-5 * max(1.0, ref[0].abs().max().item()))
            print(metric, precision, stats)
        # duplicates: the smaller index comes first within equal scores
        scores, index, _ = _run(queries, keys, 21, metric, "fp32")
        same = scores[:, 1:] == scores[:, :-1]
        assert (index[:, 1:] > index[:, :-1])[same].all()
