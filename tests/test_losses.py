"""NT-Xent, the SCAN objective wrapper and the confidence-based self-label loss against direct formulas."""
import torch
import torch.nn.functional as F

from scan_dist.losses import confident_targets, nt_xent, scan_objective, self_label_loss


def test_nt_xent_matches_explicit_formula():
    torch.manual_seed(0)
    z1, z2 = F.normalize(torch.randn(6, 8), dim=1), F.normalize(torch.randn(6, 8), dim=1)
    t = 0.5
    z = torch.cat([z1, z2])
    expected = 0.0
    for i in range(12):
        positive = (i + 6) % 12
        sims = torch.stack([z[i] @ z[j] / t for j in range(12) if j != i])
        others = [j for j in range(12) if j != i]
        expected += -(z[i] @ z[positive] / t - torch.logsumexp(sims, 0))
        assert positive in others
    assert torch.allclose(nt_xent(z1, z2, t), expected / 12, atol=1e-5)


def test_nt_xent_is_low_for_matching_views():
    torch.manual_seed(0)
    z = F.normalize(torch.randn(32, 16), dim=1)
    assert nt_xent(z, z, 0.1) < nt_xent(z, F.normalize(torch.randn(32, 16), dim=1), 0.1)


def test_scan_objective_sums_heads():
    torch.manual_seed(0)
    a, n = torch.randn(3, 10, 4, requires_grad=True), torch.randn(3, 10, 4)
    loss, total, consistency, entropy = scan_objective(a, n, 2.0)
    assert torch.allclose(loss, total.sum())
    assert torch.allclose(total, consistency - 2.0 * entropy)
    loss.backward()
    assert a.grad is not None and torch.isfinite(a.grad).all()


def test_confident_targets_threshold_is_strict():
    logits = torch.log(torch.tensor([[0.995, 0.005], [0.98, 0.02], [0.3, 0.7]]))
    mask, labels = confident_targets(logits, 0.99)
    assert mask.tolist() == [True, False, False]
    assert labels.tolist() == [0, 0, 1]


def test_self_label_loss_class_balance_averages_per_class():
    logits = torch.randn(5, 3)
    labels = torch.tensor([0, 0, 0, 1, 2])
    mask = torch.tensor([True, True, True, True, False])
    per_sample = F.cross_entropy(logits, labels, reduction="none")
    balanced = (per_sample[:3].mean() + per_sample[3]) / 2
    assert torch.allclose(self_label_loss(logits, labels, mask, class_balance=True), balanced)
    assert torch.allclose(self_label_loss(logits, labels, mask, class_balance=False), per_sample[:4].mean())
    assert self_label_loss(logits, labels, torch.zeros(5, dtype=torch.bool), True) is None
