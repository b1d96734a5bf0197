"""SCAN stage pieces: neighbour sampling (the image itself included) and the label-free head selection."""
import torch

from scan_dist.stages.scan import sample_neighbors, selection_losses


def test_sample_neighbors_draws_from_list_and_self():
    torch.manual_seed(0)
    neighbors = torch.tensor([[1, 2], [2, 0], [0, 1]])
    indices = torch.tensor([0, 1, 2] * 400)
    partners = sample_neighbors(indices, neighbors)
    for anchor in range(3):
        drawn = partners[indices == anchor]
        allowed = set(neighbors[anchor].tolist()) | {anchor}
        assert set(drawn.tolist()) == allowed  # every option drawn, nothing else
        counts = torch.bincount(drawn, minlength=3)[sorted(allowed)].float()
        assert (counts / counts.sum() - 1 / 3).abs().max() < 0.08  # uniform over k neighbours + itself


def test_selection_prefers_the_head_that_agrees_with_neighbours():
    torch.manual_seed(0)
    num, classes = 60, 3
    labels = torch.arange(num) % classes
    # neighbours share the label: head 0 predicts the labels (consistent, balanced); head 1 is noise
    neighbors = torch.stack([(torch.arange(num) + classes * s) % num for s in (1, 2)], dim=1)
    good = torch.nn.functional.one_hot(labels, classes).float() * 8
    noisy = torch.randn(num, classes) * 3
    collapsed = torch.zeros(num, classes)
    collapsed[:, 0] = 8  # consistent but one cluster: the entropy term must reject it
    losses = selection_losses(torch.stack([noisy, good, collapsed]), neighbors, entropy_weight=1.0)
    assert int(torch.argmin(losses)) == 1
    assert losses[1] < losses[2] and losses[1] < losses[0]
