"""Mining: self removal with duplicates, pixel PCA, and neighbours found in each search space."""
import pytest
import torch

from scan_dist.stages.mine import drop_self, find_neighbors, fit_pixel_pca


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
