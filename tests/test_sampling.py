"""Tests for scan_dist.data.sampling: counter-based uniforms, epoch order and rank slices."""
from __future__ import annotations

import numpy as np
import pytest

from scan_dist.data import sampling as S


def test_draws_are_uniform_and_fill_the_unit_interval():
    u = S.draws(S.stream_key(0, "test"), np.arange(4096), 0)
    assert u.shape == (4096, S.NUM_DRAWS) and u.dtype == np.float64
    assert 0.0 <= u.min() and u.max() < 1.0
    assert abs(u.mean() - 0.5) < 0.005 and abs(u.std() - np.sqrt(1 / 12)) < 0.003
    hist = np.histogram(u, bins=16, range=(0, 1))[0] / u.size
    assert np.abs(hist - 1 / 16).max() < 0.003
    # neighbouring draws, samples and views are uncorrelated
    assert abs(np.corrcoef(u[:, 0], u[:, 1])[0, 1]) < 0.05
    assert abs(np.corrcoef(u[:-1, 0], u[1:, 0])[0, 1]) < 0.05
    v = S.draws(S.stream_key(0, "test"), np.arange(4096), 1)
    assert abs(np.corrcoef(u[:, 0], v[:, 0])[0, 1]) < 0.05


def test_a_samples_draws_do_not_depend_on_its_batch():
    key = S.stream_key(3, "pretext", 2)
    whole = S.draws(key, np.arange(100), 1)
    assert np.array_equal(S.draws(key, np.array([57, 3]), 1), whole[[57, 3]])
    assert np.array_equal(S.draws(key, 57, 1)[0], whole[57])
    assert np.array_equal(S.uniform(key, np.array([57]), 1, draw=5), whole[[57], 5])
    assert np.array_equal(S.draws(key, np.arange(4), np.array([1, 1, 1, 1])), whole[:4])


def test_keys_separate_seeds_streams_epochs_and_views():
    index = np.arange(64)
    base = S.draws(S.stream_key(0, "scan", 0), index, 0)
    for other in (S.draws(S.stream_key(1, "scan", 0), index, 0), S.draws(S.stream_key(0, "pretext", 0), index, 0),
                  S.draws(S.stream_key(0, "scan", 1), index, 0), S.draws(S.stream_key(0, "scan", 0), index, 1)):
        assert not np.isclose(base, other).any()
    assert S.stream_key(0, "scan", 0) == S.stream_key(0, "scan", 0)


def test_draws_reject_out_of_range_counters():
    key = S.stream_key(0, "x")
    with pytest.raises(ValueError, match="indices"):
        S.draws(key, np.array([-1]), 0)
    with pytest.raises(ValueError, match="views"):
        S.draws(key, np.array([0]), S.MAX_VIEWS)


def test_epoch_order_is_a_seeded_permutation_per_stream_and_epoch():
    a = S.epoch_order(1000, 0, "pretext", 0)
    assert sorted(a.tolist()) == list(range(1000))
    assert np.array_equal(a, S.epoch_order(1000, 0, "pretext", 0))
    assert not np.array_equal(a, S.epoch_order(1000, 0, "pretext", 1))
    assert not np.array_equal(a, S.epoch_order(1000, 0, "scan", 0))
    assert not np.array_equal(a, S.epoch_order(1000, 1, "pretext", 0))


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_rank_slices_partition_every_global_batch(world):
    order = S.epoch_order(120, 0, "x", 0)
    batch = 12
    for step in range(S.steps_per_epoch(120, batch)):
        parts = [S.rank_slice(order, step, batch, rank, world) for rank in range(world)]
        assert np.array_equal(np.concatenate(parts), order[step * batch:(step + 1) * batch])
    assert S.steps_per_epoch(5, 8) == 1 and S.steps_per_epoch(100, 8) == 12
