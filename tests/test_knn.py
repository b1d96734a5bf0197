"""Tests for kernels/knn.py: tiled exact k-NN vs brute force, tie rule, metrics,
faiss agreement, argument errors, and the 2-process sharded search."""

from __future__ import annotations

import os

import pytest
import torch

from gloo import free_port, gloo_group

try:
    from scan_dist.kernels import knn, knn_faiss, knn_sharded
    from scan_dist.kernels.knn import knn_reference, select_backend
except ImportError:  # not pip-installed: import from the repo root
    from kernels import knn, knn_faiss, knn_sharded
    from kernels.knn import knn_reference, select_backend


def _scores64(queries, keys, index, metric):
    q, x = queries.double(), keys.double()
    if metric == "cosine":
        q = torch.nn.functional.normalize(q, dim=1)
        x = torch.nn.functional.normalize(x, dim=1)
    return (q.unsqueeze(1) * x[index]).sum(-1)


def assert_same_knn(got, ref, queries, keys, metric, atol=1e-5):
    """Scores agree to fp32 rounding; indices agree except where two scores are
    within rounding of each other (tiles change the fp32 summation order)."""
    scores, index = got
    ref_scores, ref_index = ref
    assert scores.dtype == torch.float32 and index.dtype == torch.int64
    assert scores.shape == ref_scores.shape and index.shape == ref_index.shape
    atol = atol * max(1.0, ref_scores.abs().max().item())  # fp32 error grows with |score| (ip)
    torch.testing.assert_close(scores, ref_scores, rtol=0, atol=atol)
    # Sorted descending, and each reported score is the true score of its index.
    assert (scores[:, :-1] >= scores[:, 1:]).all()
    torch.testing.assert_close(_scores64(queries, keys, index, metric), scores.double(), rtol=0, atol=atol)
    differ = index != ref_index
    if differ.any():
        assert (ref_scores[differ] - scores[differ]).abs().max() <= atol
    # No key reported twice for a query.
    assert (index.sort(dim=1).values.diff(dim=1) > 0).all()


@pytest.mark.parametrize("metric", ["cosine", "ip"])
@pytest.mark.parametrize("chunks", [(None, None), (7, 9), (50, 1), (301, 13)])
def test_matches_reference(metric, chunks):
    gen = torch.Generator().manual_seed(0)
    queries = torch.randn(53, 72, generator=gen)
    keys = torch.randn(301, 72, generator=gen)
    got = knn(queries, keys, 21, metric=metric, chunk_size=chunks[0], query_chunk_size=chunks[1])
    assert_same_knn(got, knn_reference(queries, keys, 21, metric), queries, keys, metric)


def test_k_larger_than_chunk_and_k_equals_n():
    gen = torch.Generator().manual_seed(1)
    queries = torch.randn(11, 72, generator=gen)
    keys = torch.randn(29, 72, generator=gen)
    for k in (21, 29):
        got = knn(queries, keys, k, chunk_size=5, query_chunk_size=4)
        assert_same_knn(got, knn_reference(queries, keys, k), queries, keys, "cosine")


def test_low_precision_inputs_computed_in_fp32():
    gen = torch.Generator().manual_seed(2)
    queries = torch.randn(17, 72, generator=gen).half()
    keys = torch.randn(40, 72, generator=gen).bfloat16()
    got = knn(queries, keys, 5, chunk_size=8)
    ref = knn_reference(queries.float(), keys.float(), 5)
    assert_same_knn(got, ref, queries.float(), keys.float(), "cosine")


def test_exact_ties_prefer_smaller_index():
    # Integer-valued vectors: all inner products are exact in fp32, so duplicate
    # keys tie bit-for-bit whatever the tiling.
    gen = torch.Generator().manual_seed(3)
    base = torch.randint(-3, 4, (10, 72), generator=gen).float()
    keys = base[torch.randint(0, 10, (97,), generator=gen)]  # many duplicates
    queries = torch.randint(-3, 4, (13, 72), generator=gen).float()
    for metric in ("ip", "cosine"):
        ref = knn_reference(queries, keys, 30, metric)
        for chunks in [(None, None), (4, 3), (11, 5), (1, 1)]:
            scores, index = knn(queries, keys, 30, metric=metric, chunk_size=chunks[0],
                                query_chunk_size=chunks[1])
            if metric == "ip":
                assert torch.equal(scores, ref[0]) and torch.equal(index, ref[1])
            # Within every run of equal scores the indices ascend.
            same = scores[:, 1:] == scores[:, :-1]
            assert (index[:, 1:] > index[:, :-1])[same].all()
        # Independent check of the rule for ip: python sort by (-score, index).
        if metric == "ip":
            full = queries @ keys.T
            for row in range(queries.shape[0]):
                order = sorted(range(keys.shape[0]), key=lambda j: (-full[row, j].item(), j))[:30]
                assert index[row].tolist() == order


def test_tie_at_the_cut_keeps_smallest_indices():
    # 40 identical keys, k=5: the answer must be 0..4 even though topk may pick any 5.
    keys = torch.ones(40, 8)
    queries = torch.ones(3, 8)
    for chunks in [(None, None), (7, 2), (40, 1)]:
        scores, index = knn(queries, keys, 5, metric="ip", chunk_size=chunks[0], query_chunk_size=chunks[1])
        assert index.tolist() == [[0, 1, 2, 3, 4]] * 3
        assert (scores == 8.0).all()


def test_near_ties_order_by_score():
    # Scores differ by one ulp around 1.0; larger index has the larger score.
    n = 12
    keys = torch.zeros(n, 4)
    keys[:, 0] = 1.0 + torch.arange(n, dtype=torch.float32) * 2.0**-23
    queries = torch.tensor([[1.0, 0.0, 0.0, 0.0]])
    scores, index = knn(queries, keys, n, metric="ip", chunk_size=5)
    assert index[0].tolist() == list(range(n - 1, -1, -1))
    assert torch.equal(scores[0], keys[:, 0].flip(0))


def test_self_is_first_for_distinct_rows():
    gen = torch.Generator().manual_seed(4)
    bank = torch.randn(90, 72, generator=gen)
    scores, index = knn(bank, bank, 6, chunk_size=16, query_chunk_size=7)
    assert torch.equal(index[:, 0], torch.arange(90))
    torch.testing.assert_close(scores[:, 0], torch.ones(90), rtol=0, atol=1e-5)


def test_metric_ip_vs_cosine():
    gen = torch.Generator().manual_seed(5)
    queries = torch.randn(9, 72, generator=gen)
    keys = torch.randn(50, 72, generator=gen) * torch.linspace(0.1, 10.0, 50).unsqueeze(1)
    s_ip, i_ip = knn(queries, keys, 50, metric="ip")
    s_cos, i_cos = knn(queries, keys, 50, metric="cosine")
    full_ip = queries @ keys.T
    norms = queries.norm(dim=1, keepdim=True) * keys.norm(dim=1).unsqueeze(0)
    torch.testing.assert_close(s_ip, full_ip.gather(1, i_ip), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(s_cos, (full_ip / norms).gather(1, i_cos), rtol=1e-5, atol=1e-5)
    assert s_cos.abs().max() <= 1.0 + 1e-6
    assert not torch.equal(i_ip, i_cos)  # the key norms matter only for ip


def test_zero_vectors_cosine_no_nan():
    keys = torch.randn(10, 6)
    keys[3] = 0
    queries = torch.randn(4, 6)
    queries[1] = 0
    scores, index = knn(queries, keys, 10, metric="cosine", chunk_size=3)
    assert torch.isfinite(scores).all()
    assert (scores[1] == 0).all() and index[1].tolist() == list(range(10))  # all ties -> index order
    row0 = dict(zip(index[0].tolist(), scores[0].tolist()))
    assert row0[3] == 0.0


def test_faiss_agreement():
    pytest.importorskip("faiss", reason="faiss not installed (pip install faiss-cpu)")
    gen = torch.Generator().manual_seed(6)
    queries = torch.randn(31, 72, generator=gen)
    keys = torch.randn(257, 72, generator=gen)
    for metric in ("cosine", "ip"):
        got = knn_faiss(queries, keys, 21, metric)
        assert_same_knn(got, knn(queries, keys, 21, metric=metric), queries, keys, metric)


def test_errors():
    q, x = torch.randn(4, 8), torch.randn(10, 8)
    with pytest.raises(ValueError, match="larger than the number of keys"):
        knn(q, x, 11)
    with pytest.raises(ValueError, match="positive"):
        knn(q, x, 0)
    with pytest.raises(ValueError, match="positive"):
        knn(q, x, -2)
    with pytest.raises(ValueError, match="same dimension"):
        knn(q, torch.randn(10, 9), 3)
    with pytest.raises(ValueError, match="metric"):
        knn(q, x, 3, metric="l2")
    with pytest.raises(ValueError, match="ndim 2"):
        knn(q[0], x, 3)
    with pytest.raises(ValueError, match="chunk_size"):
        knn(q, x, 3, chunk_size=0)
    with pytest.raises(ValueError, match="larger than"):
        knn_reference(q, x, 11)
    with pytest.raises(ValueError, match="same dimension"):
        knn_faiss(q, torch.randn(10, 9), 3)


def test_select_backend():
    assert select_backend("auto", torch.device("cpu")) == "torch"
    assert select_backend("torch", "cuda") == "torch"
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="mine.backend"):
            select_backend("triton", "cuda")
    with pytest.raises(ValueError, match="unknown"):
        select_backend("annoy", "cpu")
    try:
        import faiss  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="pip install faiss-cpu"):
            select_backend("faiss", "cpu")
    else:
        assert select_backend("faiss", "cpu") == "faiss"


def test_sharded_without_process_group_is_knn():
    gen = torch.Generator().manual_seed(7)
    queries, keys = torch.randn(8, 72, generator=gen), torch.randn(40, 72, generator=gen)
    got = knn_sharded(queries, keys, 9)
    ref = knn(queries, keys, 9)
    assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1])


# --------------------------------------------------------------------------- #
# 2-process sharded search
# --------------------------------------------------------------------------- #
def _shard_data():
    gen = torch.Generator().manual_seed(99)
    queries = torch.randn(37, 72, generator=gen)
    keys = torch.randn(301, 72, generator=gen)
    # Integer bank with duplicates across the shard boundary for the tie rule.
    int_base = torch.randint(-2, 3, (6, 16), generator=gen).float()
    int_keys = int_base[torch.randint(0, 6, (45,), generator=gen)]
    int_queries = torch.randint(-2, 3, (9, 16), generator=gen).float()
    return queries, keys, int_queries, int_keys


# (name, rank-0 size) for keys of the random bank; the last leaves rank 0 with < k keys.
_CASES = [("even", 150), ("uneven", 211), ("small", 5)]


def _shard_worker(rank, world, port, out_dir):
    with gloo_group(rank, world, port) as dist:
        queries, keys, int_queries, int_keys = _shard_data()
        results = {}
        for name, cut in _CASES:
            local = keys[:cut] if rank == 0 else keys[cut:]
            results[name] = knn_sharded(queries, local, 21, metric="cosine", chunk_size=32)
            offset = 0 if rank == 0 else cut
            results[name + "_offset"] = knn_sharded(queries, local, 21, key_offset=offset, metric="ip")
        local = int_keys[:20] if rank == 0 else int_keys[20:]
        results["ties"] = knn_sharded(int_queries, local, 25, group=dist.group.WORLD, metric="ip")
        try:
            knn_sharded(queries, keys[:10] if rank == 0 else keys[10:20], 21)
        except ValueError as exc:
            results["error"] = str(exc)
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))


@pytest.mark.dist
def test_sharded_two_processes_match_single(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_shard_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    per_rank = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    queries, keys, int_queries, int_keys = _shard_data()

    ref_cos = knn(queries, keys, 21, metric="cosine")
    ref_ip = knn(queries, keys, 21, metric="ip")
    ref_ties = knn(int_queries, int_keys, 25, metric="ip")
    for res in per_rank:
        for name, _ in _CASES:
            assert_same_knn(res[name], ref_cos, queries, keys, "cosine")
            assert_same_knn(res[name + "_offset"], ref_ip, queries, keys, "ip")
        # Exact integer scores: bitwise equal, ties resolved to the smaller global index.
        assert torch.equal(res["ties"][0], ref_ties[0]) and torch.equal(res["ties"][1], ref_ties[1])
        assert "larger than the number of keys N=20" in res["error"]
    # Every rank returns the same answer.
    for name in per_rank[0]:
        if name != "error":
            assert torch.equal(per_rank[0][name][1], per_rank[1][name][1])
