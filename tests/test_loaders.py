"""Tests for scan_dist.data.loaders: the views of a sample are the same however the work is split.

Bitwise on CPU: 1, 2 and 3 ranks (each rank's sampler slice, built by real DataLoader workers), 0 vs 2 workers,
a resumed epoch vs an uninterrupted one, the float phase in the loader vs in the consumer, arrays and decoded
files; plus bad files through workers (one error line, or counted skips).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from scan_dist.data.augment import AugmentConfig
from scan_dist.data.formats import open_dataset
from scan_dist.data.loaders import (BatchBuilder, BatchSource, EpochRequests, LoaderSettings, Partners, RangeRequests,
                                    ViewSpec, sample_partners)
from scan_dist.data.sampling import stream_key
from scan_dist.data.transforms import ViewTransform
from scan_dist.errors import DataError

FMNIST = "/usr/share/datasets/fashion-mnist"
CFG = AugmentConfig(blur_prob=0.3, translate_frac=0.05)
PRETEXT = [ViewSpec("simclr", "pretext", 0), ViewSpec("simclr", "pretext", 1)]


@pytest.fixture(scope="module")
def arrays(tmp_path_factory):
    return open_dataset(FMNIST, "train", max_images=96, cache_dir=tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """A flat folder of JPEGs of different sizes and aspect ratios (what a user's photos look like)."""
    root = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(0)
    for i in range(24):
        h, w = int(rng.integers(20, 60)), int(rng.integers(20, 60))
        pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(root / f"img{i:02d}.jpg", quality=90)
    return open_dataset(root, "train", fmt="flat", image_size=16)


def source(reader, specs, world=1, rank=0, workers=0, batch=12, finish_in_loader=True, partners=None, stream="s"):
    transforms = {spec.kind: ViewTransform(spec.kind, CFG, [0.5] * reader.channels, [0.25] * reader.channels,
                                           reader.image_size) for spec in specs}
    builder = BatchBuilder(reader, specs, transforms, seed=5, finish_in_loader=finish_in_loader,
                           on_bad_image="skip", partners=partners)
    sampler = EpochRequests(len(reader), batch, seed=5, stream=stream, rank=rank, world=world)
    return BatchSource(builder, sampler, LoaderSettings(workers=workers, prefetch=2))


def views_by_sample(src, epoch=0, start=0) -> dict:
    """{(step, sample index): tuple of its views} over one epoch."""
    out = {}
    for step, batch in enumerate(src.epoch(epoch, start), start=start):
        for row, index in enumerate(batch["index"].tolist()):
            out[(step, index)] = tuple(view[row] for view in batch["views"])
    src.close()
    return out


def assert_same(a: dict, b: dict):
    assert a.keys() == b.keys()
    for key in a:
        for x, y in zip(a[key], b[key]):
            assert torch.equal(x, y), key


@pytest.mark.parametrize("world", [2, 3])
def test_ranks_see_exactly_the_views_of_one_process(arrays, world):
    one = views_by_sample(source(arrays, PRETEXT, workers=2))
    split = {}
    for rank in range(world):
        split.update(views_by_sample(source(arrays, PRETEXT, world=world, rank=rank, workers=1 + rank % 2)))
    assert_same(one, split)


def test_workers_do_not_change_the_views(arrays, photos):
    for reader in (arrays, photos):
        specs = PRETEXT + [ViewSpec("strong", "selflabel", 0), ViewSpec("eval")]
        assert_same(views_by_sample(source(reader, specs, workers=0)),
                    views_by_sample(source(reader, specs, workers=2)))


def test_resumed_epoch_equals_the_tail_of_an_uninterrupted_one(arrays):
    whole = views_by_sample(source(arrays, PRETEXT, workers=1), epoch=1)
    resumed = views_by_sample(source(arrays, PRETEXT, workers=1), epoch=1, start=3)
    assert_same(resumed, {key: value for key, value in whole.items() if key[0] >= 3})
    other_epoch = views_by_sample(source(arrays, PRETEXT), epoch=2)
    assert set(other_epoch) != set(whole)  # another order


def test_float_phase_in_loader_or_consumer_gives_the_same_views(arrays):
    specs = PRETEXT + [ViewSpec("strong", "selflabel", 0)]
    assert_same(views_by_sample(source(arrays, specs, finish_in_loader=True)),
                views_by_sample(source(arrays, specs, finish_in_loader=False, workers=1)))


def test_views_of_one_batch_differ_and_a_view_is_normalised(arrays):
    batch = next(source(arrays, PRETEXT).epoch(0))
    first, second = batch["views"]
    assert first.shape == (12, 1, 28, 28) and first.dtype == torch.float32
    assert not torch.equal(first, second)


def test_partners_are_neighbours_or_self_and_independent_of_ranks(arrays, tmp_path):
    rng = np.random.default_rng(0)
    neighbors = rng.integers(0, len(arrays), (len(arrays), 4))
    np.save(tmp_path / "nn.npy", neighbors)
    partners = Partners(str(tmp_path / "nn.npy"), "scan")
    specs = [ViewSpec("weak", "scan", 0), ViewSpec("weak", "scan", 1, rows="partner")]
    picked = {}
    for rank in range(2):
        src = source(arrays, specs, world=2, rank=rank, workers=1, partners=partners)
        for batch in src.epoch(0):
            for anchor, partner in zip(batch["index"].tolist(), batch["partner"].tolist()):
                assert partner == anchor or partner in neighbors[anchor]
                picked[anchor] = partner
        src.close()
    key = stream_key(5, "scan", 0)
    anchors = np.array(sorted(picked))
    assert sample_partners(neighbors, key, anchors).tolist() == [picked[a] for a in anchors]
    assert sum(p != a for a, p in picked.items()) > len(picked) / 2  # itself only 1 time in k + 1


def test_files_of_any_size_become_network_size_views(photos):
    batch = next(source(photos, PRETEXT + [ViewSpec("eval")], batch=8).epoch(0))
    assert all(view.shape == (8, 3, 16, 16) for view in batch["views"])


def test_inference_ranges_cover_rows_in_order(arrays):
    transforms = {"eval": ViewTransform("eval", CFG, [0.5], [0.25], 28)}
    builder = BatchBuilder(arrays, [ViewSpec("eval")], transforms, 0, True)
    src = BatchSource(builder, RangeRequests(10, 45, 16), LoaderSettings(workers=1))
    rows = torch.cat([batch["index"] for batch in src])
    src.close()
    assert rows.tolist() == list(range(10, 45)) and len(src) == 3


def write_bad_folder(root):
    rng = np.random.default_rng(1)
    for i in range(6):
        Image.fromarray(rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)).save(root / f"ok{i}.jpg")
    data = (root / "ok0.jpg").read_bytes()
    (root / "broken.jpg").write_bytes(data[: len(data) // 2])  # a truncated JPEG


def test_bad_file_in_a_worker_fails_with_one_line_naming_it(tmp_path):
    write_bad_folder(tmp_path)
    with pytest.raises(DataError, match="broken.jpg"):  # the channel probe reads the headers at open time
        open_dataset(tmp_path, "train", fmt="flat", image_size=16)
    reader = open_dataset(tmp_path, "train", fmt="flat", image_size=16, channels=3)
    transforms = {"eval": ViewTransform("eval", CFG, [0.5] * 3, [0.25] * 3, 16)}
    builder = BatchBuilder(reader, [ViewSpec("eval")], transforms, 0, True, on_bad_image="fail")
    src = BatchSource(builder, RangeRequests(0, len(reader), 4), LoaderSettings(workers=1))
    with pytest.raises(DataError) as info:
        list(src)
    src.close()
    message = str(info.value)
    assert "broken.jpg" in message and "\n" not in message and "on_bad_image=skip" in message


def test_skipped_bad_files_are_black_and_counted(tmp_path):
    write_bad_folder(tmp_path)
    reader = open_dataset(tmp_path, "train", fmt="flat", image_size=16, on_bad_image="skip")
    transforms = {"eval": ViewTransform("eval", CFG, [0.0] * 3, [1.0] * 3, 16)}
    builder = BatchBuilder(reader, [ViewSpec("eval")], transforms, 0, True, on_bad_image="skip")
    src = BatchSource(builder, RangeRequests(0, len(reader), 4), LoaderSettings(workers=2))
    batches = list(src)
    src.close()
    broken = [i for i in range(len(reader)) if reader.name(i) == "broken.jpg"]
    assert src.bad == broken
    views = torch.cat([b["views"][0] for b in batches])
    assert views[broken[0]].abs().max() == 0 and views.abs().sum() > 0


def test_data_workers_outlive_the_stop_signals_so_the_main_process_can_checkpoint(arrays):
    """SLURM, `timeout` and `kill -- -PGID` signal every process of the group: a worker must not die of SIGTERM or
    USR2 first (the main process would then fail with "DataLoader worker ... killed by signal" instead of
    checkpointing; seen on the H200). Without the worker_init_fn both workers are dead after the kill below."""
    import os
    import signal
    import time

    src = source(arrays, PRETEXT, workers=2, batch=4)
    iterator = iter(src.loader)
    next(iterator)
    workers = list(iterator._workers)  # torch's worker processes (private attribute; only a test reads it)
    for worker, signum in zip(workers, (signal.SIGTERM, signal.SIGUSR2)):
        os.kill(worker.pid, signum)
    time.sleep(1.0)
    assert [worker.is_alive() for worker in workers] == [True, True]
    assert len(list(iterator)) == len(src) - 1  # the rest of the epoch still arrives
