"""SharedRows (scan_dist/distributed/shared_rows.py): rows written by two gloo ranks end up in one complete .npy."""
import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch.multiprocessing as mp

from gloo import free_port, gloo_group
from scan_dist.distributed import shared_rows
from scan_dist.distributed.shared_rows import SharedRows


def _worker(rank: int, world: int, port: int, out_dir: str):
    out = Path(out_dir)
    with gloo_group(rank, world, port):
        if rank == 1:  # a slow rank: it maps the file well after rank 0 has its map
            load = shared_rows.np.load

            def slow_load(*args, **kwargs):
                time.sleep(1.0)
                return load(*args, **kwargs)

            shared_rows.np.load = slow_load
        table = SharedRows(out / ".tmp-build" / "rows.npy", 6, (2,), np.float32)
        table.write(3 * rank, np.full((3, 2), rank + 1, np.float32))
        rows = table.close()
        if rank == 0:  # what the feature cache does next: move the finished folder into place
            os.replace(out / ".tmp-build", out / "build")
        np.save(out / f"seen{rank}.npy", np.asarray(rows))


@pytest.mark.dist
def test_two_ranks_fill_one_array_and_a_slow_rank_survives_the_rename(tmp_path):
    """close() returns only once every rank holds its map: CI once saw rank 1 fail to open the file that rank 0 had
    already moved (test_feature_cache.py::test_sharded_build_equals_one_process, FileNotFoundError)."""
    mp.spawn(_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    expected = np.array([[1, 1]] * 3 + [[2, 2]] * 3, np.float32)  # rank 0's rows, then rank 1's
    assert np.array_equal(np.load(tmp_path / "build" / "rows.npy"), expected)
    for rank in (0, 1):
        assert np.array_equal(np.load(tmp_path / f"seen{rank}.npy"), expected)
    assert not (tmp_path / ".tmp-build").exists()
