"""Mining: self removal with duplicates, pixel PCA, neighbours found in each search space, mutual neighbours."""
import json

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from gloo import free_port, gloo_group
from scan_dist.stages.mine import drop_self, find_neighbors, fit_pixel_pca, keep_mutual, mutual_split


def test_drop_self_wherever_it_is():
    index = torch.tensor([[0, 5, 6], [4, 1, 7], [8, 9, 3]])  # row 2 lacks itself (duplicates pushed it out)
    assert drop_self(index, 2).tolist() == [[5, 6], [4, 7], [8, 9]]


def test_find_neighbors_excludes_self_and_is_exact():
    torch.manual_seed(0)
    vectors = torch.nn.functional.normalize(torch.randn(50, 8), dim=1)
    nn = find_neighbors(vectors, 4, "torch", torch.device("cpu"))
    assert nn.shape == (50, 4)
    assert not (nn == torch.arange(50).unsqueeze(1)).any()
    sims = vectors @ vectors.t()
    sims.fill_diagonal_(-2)
    assert torch.equal(nn, sims.topk(4, dim=1).indices)


def test_find_neighbors_with_duplicate_rows():
    base = torch.nn.functional.normalize(torch.randn(5, 4), dim=1)
    vectors = torch.cat([base, base])  # every row has an exact twin
    nn = find_neighbors(vectors, 1, "torch", torch.device("cpu"))
    assert nn.squeeze(1).tolist() == [5, 6, 7, 8, 9, 0, 1, 2, 3, 4]


def test_keep_mutual_keeps_only_pairs_that_list_each_other():
    neighbors = np.array([
        [1, 2],  # 0: 1 lists 0 back, 2 does not
        [0, 3],  # 1: 0 lists 1, 3 does not
        [3, 4],  # 2: 3 lists 2, 4 does not
        [2, 0],  # 3: 2 lists 3, 0 does not
        [3, 0],  # 4: neither lists 4: the row is kept as it is
    ])
    rows, pairs, lonely = keep_mutual(neighbors, 0, 5)
    assert rows.tolist() == [[1, 1], [0, 0], [3, 3], [2, 2], [3, 0]]
    assert (pairs, lonely) == (4, 1)


def test_keep_mutual_is_the_same_in_any_chunks_and_shards():
    torch.manual_seed(0)
    vectors = torch.nn.functional.normalize(torch.randn(300, 6), dim=1)
    neighbors = find_neighbors(vectors, 7, "torch", torch.device("cpu")).numpy()
    whole, pairs, lonely = keep_mutual(neighbors, 0, 300)
    parts = [keep_mutual(neighbors, a, b, chunk=16) for a, b in [(0, 100), (100, 173), (173, 300)]]
    assert np.array_equal(np.concatenate([p[0] for p in parts]), whole)
    assert sum(p[1] for p in parts) == pairs and sum(p[2] for p in parts) == lonely
    listed = {(i, int(j)) for i in range(300) for j in neighbors[i]}
    mutual_pairs = 0
    for i in range(300):
        mutual = [int(j) for j in neighbors[i] if (int(j), i) in listed]
        mutual_pairs += len(mutual)
        if mutual:  # only mutual neighbours, each in 7 // m or 7 // m + 1 of the row's columns
            assert set(whole[i].tolist()) == set(mutual)
            counts = np.bincount(whole[i], minlength=300)[mutual]
            assert counts.max() - counts.min() <= 1
        else:
            assert whole[i].tolist() == neighbors[i].tolist()
    assert pairs == mutual_pairs


def _mutual_worker(rank: int, world: int, port: int, out_dir: str):
    with gloo_group(rank, world, port):
        knn = np.load(f"{out_dir}/knn.npy", mmap_mode="r")
        rows, pair_share, lonely_share = mutual_split(knn, f"{out_dir}/mutual.npy")
        with open(f"{out_dir}/seen{rank}.json", "w") as f:
            json.dump({"rows": np.asarray(rows).tolist(), "shares": [pair_share, lonely_share]}, f)


@pytest.mark.dist
def test_mutual_split_over_two_ranks_equals_one(tmp_path):
    torch.manual_seed(1)
    vectors = torch.nn.functional.normalize(torch.randn(101, 5), dim=1)
    neighbors = find_neighbors(vectors, 6, "torch", torch.device("cpu")).numpy()
    np.save(tmp_path / "knn.npy", neighbors)
    expected, pairs, lonely = keep_mutual(neighbors, 0, 101)
    mp.spawn(_mutual_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    assert np.array_equal(np.load(tmp_path / "mutual.npy"), expected)
    for rank in (0, 1):
        seen = json.loads((tmp_path / f"seen{rank}.json").read_text())
        assert seen["rows"] == expected.tolist()
        assert seen["shares"] == pytest.approx([pairs / neighbors.size, lonely / 101])


def test_pixel_pca_projects_onto_top_components():
    torch.manual_seed(0)
    # images varying along one pixel direction: the first component must capture it
    direction = torch.zeros(1, 1, 4, 4)
    direction[..., 1, 2] = 1.0
    images = (torch.rand(100, 1, 1, 1) * 200 * direction + 20).to(torch.uint8)
    flat = images.reshape(100, -1).float() / 255
    mean, basis = fit_pixel_pca(flat, dims=3, seed=0)
    train = (flat - mean) @ basis
    assert train.shape == (100, 3)
    variance = train.var(dim=0)
    assert variance[0] > 100 * variance[1:].max()
    state = torch.get_rng_state()
    fit_pixel_pca(flat, dims=3, seed=0)
    assert torch.equal(state, torch.get_rng_state())  # the caller's generator is left alone


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_find_neighbors_triton_backend_equals_torch(precision):
    """mine.backend=triton gives the torch backend's exact neighbours: the compiled kernel on a GPU, Triton's
    interpreter on CPU in CI (mine.backend=triton on a CPU device exists only under TRITON_INTERPRET=1)."""
    pytest.importorskip("triton")
    from scan_dist.kernels import _dispatch

    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cpu" and not _dispatch.interpreting():
        pytest.skip("no CUDA and TRITON_INTERPRET is not set: the Triton kernel cannot run")
    gen = torch.Generator().manual_seed(5)
    vectors = torch.nn.functional.normalize(torch.randn(70, 24, generator=gen), dim=1)
    vectors[7] = vectors[3]  # a duplicate: ties go to the smaller index on both backends
    expected = find_neighbors(vectors, 6, "torch", torch.device("cpu"))
    assert torch.equal(find_neighbors(vectors, 6, "triton", device, precision), expected)
