"""Label-free head selection by agreement (scan_dist/head_consensus.py)."""
import numpy as np
import pytest
import torch
from sklearn.metrics import normalized_mutual_info_score

from fake_heads import noisy_head
from scan_dist import head_consensus as hc


def test_nmi_matches_sklearn():
    rng = np.random.default_rng(0)
    a, b = rng.integers(0, 7, 3000), rng.integers(0, 7, 3000)
    b[:2000] = a[:2000]
    assert hc.nmi(a, b, 7) == pytest.approx(normalized_mutual_info_score(a, b), abs=1e-9)
    assert hc.nmi(a, a, 7) == pytest.approx(1.0)
    assert hc.nmi(np.zeros(10, int), np.zeros(10, int), 3) == 0.0  # no information: 0, not a division by zero


def test_the_most_typical_head_wins_whatever_its_loss_or_index():
    rng = np.random.default_rng(1)
    classes, truth = 6, rng.integers(0, 6, 4000)
    noise = [0.6, 0.5, 0.1, 0.55, 0.45, 0.5]  # head 2 is the cleanest clustering; the others err independently
    logits = np.stack([noisy_head(truth, n, classes, rng) for n in noise])
    (best, *_), _, scores = hc.ensemble(logits, classes, size=1)
    assert best == 2
    assert np.argsort(-scores)[-1] == 0  # the noisiest agrees least


def test_a_degenerate_head_neither_wins_nor_votes():
    rng = np.random.default_rng(2)
    classes, truth = 5, rng.integers(0, 5, 3000)
    heads = [noisy_head(truth, n, classes, rng) for n in (0.4, 0.3, 0.35)]
    collapsed = heads[1].copy()
    collapsed[:, 4] -= 100  # the cleanest head but cluster 4 empty: the entropy term failed
    logits = np.stack([*heads[:1], collapsed, heads[2]])
    (best, *_), _, scores = hc.ensemble(logits, classes, size=1)
    assert best != 1 and scores[1] == -1
    _, usable = hc.consensus_scores(hc.hard_assignments(logits), classes)
    assert usable.tolist() == [True, False, True]


def test_when_every_head_is_degenerate_the_fullest_still_compete():
    logits = np.zeros((2, 6, 3))
    logits[0, :3, 0] = logits[0, 3:, 1] = 1  # two clusters used
    logits[1, :, 0] = 1  # one cluster used
    (best, *_), _, scores = hc.ensemble(logits, 3, size=1)
    assert best == 0 and scores[1] == -1


def test_hard_assignments_reads_evenly_spaced_rows_of_a_memory_map(tmp_path):
    rng = np.random.default_rng(3)
    logits = rng.normal(size=(3, 1000, 4)).astype(np.float32)
    np.save(tmp_path / "l.npy", np.ascontiguousarray(logits.transpose(1, 0, 2)))
    mapped = np.swapaxes(np.load(tmp_path / "l.npy", mmap_mode="r"), 0, 1)  # [H, N, C] view, as the stage stores it
    sub = hc.hard_assignments(mapped, max_rows=100, chunk=7)
    rows = np.unique(np.linspace(0, 999, 100).round().astype(int))
    assert sub.shape == (3, len(rows)) and np.array_equal(sub, logits[:, rows].argmax(2))
    assert np.array_equal(hc.hard_assignments(torch.from_numpy(logits).numpy()), logits.argmax(2))


def test_alignment_relabels_one_to_one():
    rng = np.random.default_rng(4)
    reference = rng.integers(0, 5, 2000)
    perm = np.array([3, 0, 4, 1, 2])  # other's cluster c is reference's cluster perm[c]
    other = np.argsort(perm)[reference]
    other[:100] = rng.integers(0, 5, 100)  # some disagreement does not change the matching
    assert hc.alignment(reference, other, 5).tolist() == perm.tolist()


def test_ensemble_averages_aligned_heads_and_beats_its_members():
    rng = np.random.default_rng(5)
    classes, truth = 6, rng.integers(0, 6, 6000)
    noise = [0.45, 0.5, 0.4, 0.5, 0.45]  # independent errors: the vote corrects what any one head gets wrong
    logits = np.stack([noisy_head(truth, n, classes, rng) for n in noise])
    collapsed = logits[0].copy()
    collapsed[:, 2] -= 100
    logits = np.concatenate([logits, collapsed[None]])
    members, perms, _ = hc.ensemble(logits, classes, size=10)
    assert 5 not in members and len(members) == 5  # the degenerate head never joins, whatever the size asked
    assert members[0] == int(np.argmax(hc.consensus_scores(hc.hard_assignments(logits), classes)[0]))
    combined = hc.ensemble_log_probs(logits, members, perms)
    assert np.allclose(np.exp(combined).sum(axis=1), 1, atol=1e-5)

    def acc(labels):
        return max(np.mean(hc.alignment(truth, labels, classes)[labels] == truth), 0)

    assert acc(combined.argmax(1)) > max(acc(logits[h].argmax(1)) for h in range(5)) + 0.1
    assert hc.ensemble(logits, classes, size=2)[0] == members[:2]


def test_a_loss_ranked_ensemble_takes_the_lowest_losses_and_aligns_onto_the_lowest():
    """scan.ensemble_rank=loss: members in order of loss, degenerate heads skipped even at the lowest loss, every
    member relabelled onto the first one's numbering."""
    rng = np.random.default_rng(6)
    classes, truth = 4, rng.integers(0, 4, 3000)
    logits = np.stack([noisy_head(truth, 0.1, classes, rng) for _ in range(4)])
    logits[2] = logits[2][:, [2, 0, 3, 1]]  # head 2 numbers its clusters another way
    logits[3][:, 1] -= 100  # head 3 leaves cluster 1 empty
    losses = np.array([-1.0, -1.5, -2.0, -3.0])
    members, perms, _ = hc.ensemble(logits, classes, size=2, losses=losses)
    assert members == [2, 1]
    assert perms[0].tolist() == [0, 1, 2, 3]
    # head 1's cluster c is head 2's cluster perm[c]: the relabelled assignments match
    a2, a1 = logits[2].argmax(1), logits[1].argmax(1)
    assert np.mean(perms[1][a1] == a2) > 0.8 > 0.3 > np.mean(a1 == a2)
    assert hc.ensemble(logits, classes, size=3, losses=losses)[0] == [2, 1, 0]


def test_a_tie_ensemble_averages_the_usable_tied_heads_onto_the_lowest_losses_clusters():
    """scan.ensemble_rank=tie: the members are the tie's usable heads in its (loss) order, however many, each
    relabelled onto the first one's numbering; a degenerate tied head stays out, and a tie of degenerate heads
    only leaves its lowest-loss head."""
    rng = np.random.default_rng(7)
    classes, truth = 4, rng.integers(0, 4, 3000)
    logits = np.stack([noisy_head(truth, 0.1, classes, rng) for _ in range(5)])
    logits[4] = logits[4][:, [3, 2, 0, 1]]  # head 4 numbers its clusters another way
    logits[1][:, 2] -= 100  # head 1 leaves cluster 2 empty
    assignments = hc.hard_assignments(logits)
    agreement = hc.consensus_scores(assignments, classes)[0]
    assert agreement[1] == -1 and (agreement[[0, 2, 3, 4]] > 0).all()
    members, perms = hc.tie_ensemble(assignments, classes, [4, 1, 0, 2], agreement)
    assert members == [4, 0, 2]
    assert perms[0].tolist() == [0, 1, 2, 3]
    a4 = logits[4].argmax(1)
    for member, perm in zip(members[1:], perms[1:]):
        a = logits[member].argmax(1)
        assert np.mean(perm[a] == a4) > 0.8 > 0.3 > np.mean(a == a4)
    assert hc.tie_ensemble(assignments, classes, [1], agreement)[0] == [1]
    # the stage hands ensemble() the assignments it already read: the same members and perms as reading the logits
    given = hc.ensemble(None, classes, size=3, assignments=assignments)
    read = hc.ensemble(logits, classes, size=3)
    assert given[0] == read[0] and (given[1] == read[1]).all() and (given[2] == read[2]).all()


def test_a_tie_is_broken_by_agreement_and_a_clear_loss_gap_is_not_a_tie():
    losses = np.array([-2.110, -2.117, -2.115, -2.090, -2.116])
    errors = np.array([0.003, 0.0, 0.003, 0.003, 0.003])  # paired, against head 1 (the lowest)
    agreement = np.array([0.95, 0.60, 0.80, 0.99, -1.0])  # head 4 degenerate, head 3 far above in loss
    head, tie = hc.tie_break(losses, errors, agreement, z=2.0)
    assert tie == [1, 2]  # within 0.006: heads 1 and 2; head 4 is degenerate, heads 0 and 3 lie beyond 2 errors
    assert head == 2  # of the tie, the one agreeing most with the other heads
    head, tie = hc.tie_break(losses, errors, agreement, z=3.0)
    assert tie == [1, 2, 0] and head == 0  # 0.007 <= 0.009: head 0 joins and agrees most
    # z = 0: only the lowest loss ties with itself, the paper's loss rule
    assert hc.tie_break(losses, errors, agreement, z=0.0) == (1, [1])


def test_a_tie_keeps_the_lowest_loss_head_on_equal_agreement_and_when_it_alone_is_usable():
    losses, errors = np.array([-1.0, -1.001, -0.9995]), np.array([0.01, 0.0, 0.01])
    assert hc.tie_break(losses, errors, np.array([0.7, 0.7, 0.7]), z=2.0) == (1, [1, 0, 2])
    # the lowest head degenerate, every other beyond the tie: it is still what is kept (the loss rule's pick)
    assert hc.tie_break(np.array([-1.0, -2.0]), np.array([0.001, 0.0]), np.array([0.9, -1.0]), z=2.0) == (1, [1])

