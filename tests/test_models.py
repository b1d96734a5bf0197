"""Backbones and heads: output shapes, batched heads equal separate linear layers, head selection copies."""
import pytest
import torch

from scan_dist.errors import ConfigError
from scan_dist.models.backbones import build_backbone
from scan_dist.models.heads import ClusterHeads, ClusterModel, SimCLRModel


@pytest.mark.parametrize("name, channels, size", [("cnn_small", 1, 28), ("cnn_small", 3, 20),
                                                  ("resnet18_cifar", 3, 32), ("resnet18_stl", 1, 40)])
def test_backbone_shapes(name, channels, size):
    net = build_backbone(name, channels, width=8).eval()
    out = net(torch.randn(2, channels, size, size))
    assert out.shape == (2, net.out_dim)


@pytest.mark.parametrize("name, channels, size", [("cnn_small", 1, 28), ("resnet18_cifar", 3, 32),
                                                  ("resnet18_stl", 1, 40)])
def test_feature_map_is_what_the_global_pool_averages(name, channels, size):
    net = build_backbone(name, channels, width=8).eval()
    x = torch.randn(2, channels, size, size)
    with torch.no_grad():
        fmap, pooled = net.feature_map(x), net(x)
    assert fmap.shape[:2] == (2, net.out_dim) and fmap.shape[-1] > 1
    assert torch.allclose(fmap.mean((2, 3)), pooled, atol=1e-5)


def test_grid_embedding_keeps_where_features_are():
    model = SimCLRModel(build_backbone("cnn_small", 1, width=4), 8).eval()
    x = torch.randn(3, 1, 28, 28)  # a 7x7 map
    with torch.no_grad():
        fmap = model.backbone.feature_map(x)
        one_cell = model.embedding(x, "grid", 1)
        full = model.embedding(x, "grid", 7)
        two = model.embedding(x, "grid", 2)
    assert torch.allclose(one_cell, model.embedding(x, "backbone", 2), atol=1e-6)  # 1 cell = the global pool
    assert torch.allclose(full, torch.nn.functional.normalize(fmap.flatten(1), dim=1), atol=1e-6)
    assert two.shape == (3, model.embedding_dim("grid", 2)) == (3, 16 * 4)
    assert torch.allclose(two.norm(dim=1), torch.ones(3))


def test_unknown_backbone():
    with pytest.raises(ConfigError, match="model.backbone"):
        build_backbone("vgg", 3)


def test_linear_heads_equal_separate_layers():
    torch.manual_seed(0)
    heads = ClusterHeads(in_dim=6, num_clusters=4, num_heads=3)
    x = torch.randn(5, 6)
    out = heads(x)
    assert out.shape == (3, 5, 4)
    for h in range(3):
        expected = x @ heads.weights[0][h] + heads.biases[0][h]
        assert torch.allclose(out[h], expected, atol=1e-6)


def test_mlp_heads_and_keep_head():
    torch.manual_seed(0)
    heads = ClusterHeads(in_dim=6, num_clusters=4, num_heads=3, hidden=5)
    x = torch.randn(7, 6)
    single = heads.keep_head(2)
    assert single.num_heads == 1
    assert torch.allclose(single(x)[0], heads(x)[2], atol=1e-6)


def test_models_compose():
    backbone = build_backbone("cnn_small", 1, width=8)
    model = ClusterModel(backbone, ClusterHeads(backbone.out_dim, 10, 2)).eval()
    assert model(torch.randn(3, 1, 28, 28)).shape == (2, 3, 10)
    simclr = SimCLRModel(build_backbone("cnn_small", 1, width=8), 16).eval()
    z = simclr(torch.randn(3, 1, 28, 28))
    assert z.shape == (3, 16) and torch.allclose(z.norm(dim=1), torch.ones(3), atol=1e-5)


def test_keep_heads_aligns_and_averages_into_one_output():
    torch.manual_seed(1)
    heads = ClusterHeads(in_dim=6, num_clusters=4, num_heads=3, hidden=5)
    x = torch.randn(9, 6)
    perms = [[0, 1, 2, 3], [2, 0, 3, 1]]  # head 2's cluster c becomes output cluster perms[1][c]
    ensemble = heads.keep_heads([0, 2], perms)
    out = ensemble(x)
    assert out.shape == (1, 9, 4) and ensemble.num_heads == 2
    probs = heads(x).softmax(-1)
    aligned = torch.empty_like(probs[2])
    aligned[:, torch.tensor(perms[1])] = probs[2]
    assert torch.allclose(out[0].exp(), (probs[0] + aligned) / 2, atol=1e-5)
    assert torch.allclose(out[0].softmax(-1), out[0].exp(), atol=1e-5)  # log-probabilities: softmax is identity
    copy = ClusterHeads(6, 4, 2, hidden=5, average=True)
    copy.load_state_dict(ensemble.state_dict())  # a saved ensemble loads into a fresh one of the same shape
    assert torch.allclose(copy(x), out)


def test_copy_heads_from_overwrites_the_first_heads_only():
    torch.manual_seed(2)
    pool, own = ClusterHeads(6, 4, 5, hidden=3), ClusterHeads(6, 4, 3, hidden=3)
    x = torch.randn(7, 6)
    own.copy_heads_from(pool, [4, 1])
    out, expected = own(x), pool(x)
    assert torch.equal(out[0], expected[4]) and torch.equal(out[1], expected[1])
    assert own.num_heads == 3 and not torch.equal(out[2], expected[2])  # the third head is left as it was
    pool.copy_heads_from(own, [0], at=[3])  # into chosen places: pool head 3 is now own head 0 (pool head 4)
    assert torch.equal(pool(x)[3], expected[4]) and torch.equal(pool(x)[2], expected[2])
