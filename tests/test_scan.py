"""SCAN stage pieces: neighbour sampling (the image itself included), cached-view draws and the label-free head
selection (chunked: it must equal the whole-set formula; its paired standard errors must equal the per-image ones)."""
import numpy as np
import torch

from scan_dist import kernels
from scan_dist.data.loaders import sample_partners
from scan_dist.data.sampling import stream_key
from scan_dist.stages.feature_cache import ANCHOR_VIEW_DRAW, PARTNER_VIEW_DRAW, draw_views
from scan_dist.stages.scan import (consistency_moments, paired_standard_errors, selection_losses,
                                   selection_statistics)


def test_sample_partners_draws_from_list_and_self():
    neighbors = np.array([[1, 2], [2, 0], [0, 1]])
    anchors = np.array([0, 1, 2] * 400)
    # one draw per (epoch, anchor): gather the partners of every anchor over many epochs
    drawn_all = np.concatenate([sample_partners(neighbors, stream_key(0, "scan", e), np.arange(3)) for e in range(400)])
    partners, indices = torch.from_numpy(drawn_all), torch.from_numpy(anchors)
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
    logits = torch.stack([noisy, good, collapsed])
    losses = selection_losses(logits, neighbors.numpy(), entropy_weight=1.0, chunk=7)
    assert int(torch.argmin(losses)) == 1
    assert losses[1] < losses[2] and losses[1] < losses[0]
    # the chunked computation equals the loss of all (anchor, neighbour) pairs at once
    whole, _, _ = kernels.scan_loss(logits.repeat_interleave(2, dim=1), logits[:, neighbors.reshape(-1)], 1.0)
    torch.testing.assert_close(losses, whole, rtol=1e-5, atol=1e-5)


def test_cached_views_are_uniform_over_the_augmented_views():
    anchors = np.arange(6000)
    key = stream_key(0, "scan", 0)
    anchor_views = draw_views(key, anchors, ANCHOR_VIEW_DRAW, 4)
    partner_views = draw_views(key, anchors, PARTNER_VIEW_DRAW, 4)
    counts = torch.bincount(anchor_views, minlength=5)
    assert counts[0] == 0 and (counts[1:] - 1500).abs().max() < 150
    assert (anchor_views != partner_views).float().mean() > 0.6  # independent draws
    assert draw_views(key, anchors[:5], ANCHOR_VIEW_DRAW, 0).tolist() == [0] * 5


def test_paired_standard_errors_equal_those_of_the_per_image_differences():
    """The one-pass moments give, for every head, the standard error of its mean per-image consistency difference
    to a reference head, computed here image by image; and the means are the losses' consistency terms."""
    rng = np.random.default_rng(0)
    heads, num, classes, k = 4, 53, 5, 3
    logits = rng.normal(0, 2, (heads, num, classes)).astype(np.float32)
    neighbors = np.stack([rng.permutation(num) for _ in range(k)], axis=1)
    probs = torch.softmax(torch.from_numpy(logits).double(), dim=-1)
    per_image = torch.stack([-torch.log((probs * probs[:, neighbors[:, j]]).sum(-1)) for j in range(k)]).mean(0)
    mean, second, count = consistency_moments(logits, neighbors, chunk=10)
    assert count == num
    np.testing.assert_allclose(mean, per_image.mean(1).numpy(), rtol=1e-5)
    consistency_only = selection_losses(logits, neighbors, entropy_weight=0.0, chunk=10).numpy()
    np.testing.assert_allclose(mean, consistency_only, rtol=1e-5)
    for reference in range(heads):
        errors = paired_standard_errors((mean, second, count), reference)
        diffs = (per_image - per_image[reference]).numpy()
        np.testing.assert_allclose(errors, diffs.std(axis=1) / np.sqrt(num), rtol=1e-4, atol=1e-9)
        assert errors[reference] == 0.0


def test_one_pass_gives_the_loss_rules_losses_and_the_moments_of_separate_passes():
    """The SCAN stage reads the evaluation logits once for both (selection_statistics): its losses must be the loss
    rule's to the bit (a finished run's head must not change) and its moments those of a pass of their own."""
    rng = np.random.default_rng(1)
    logits = rng.normal(0, 3, (5, 47, 4)).astype(np.float32)
    neighbors = np.stack([rng.permutation(47) for _ in range(3)], axis=1)
    losses, moments = selection_statistics(logits, neighbors, 1.5, chunk=9)
    assert torch.equal(losses, selection_losses(logits, neighbors, 1.5, chunk=9))
    alone = consistency_moments(logits, neighbors, chunk=13)  # other chunk borders: only the summation order moves
    np.testing.assert_allclose(moments[0], alone[0], rtol=1e-12)
    np.testing.assert_allclose(moments[1], alone[1], rtol=1e-12)
    assert moments[2] == alone[2] == 47
    assert selection_statistics(logits, neighbors, 1.5, chunk=9, moments=False)[1] is None
