"""One `.npy` array written by all ranks together, each its own rows, then memory-mapped by everyone.

`SharedRows(path, num_rows, row_shape, dtype)` is a collective: rank 0 creates ``.tmp-<name>`` (header + full size,
sparse) and every rank waits for it; `write(start, rows)` puts a block of rows with positioned file writes (not a
shared writable mapping, which is unsafe on network filesystems when two ranks' rows share a page); `close()` is
a collective again: every rank fsyncs, rank 0 renames the file into place (complete or absent, never half-written)
and everyone gets a read-only map. This is how O(N x D) results (embeddings, logits, cached features) are built
at ImageNet scale: nobody gathers them into memory, and the ranks of a node share one copy in the page cache.
The run folder must be visible to every rank, as for every stage.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from . import comm


class SharedRows:
    def __init__(self, path, num_rows: int, row_shape: tuple[int, ...], dtype):
        self.path = Path(path)
        self.tmp = self.path.parent / f".tmp-{self.path.name}"
        self.shape = (int(num_rows), *map(int, row_shape))
        self.dtype = np.dtype(dtype)
        if comm.is_main():
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # header written and the file sized (sparse); the rows are filled by positioned writes
            np.lib.format.open_memmap(self.tmp, mode="w+", dtype=self.dtype, shape=self.shape).flush()
        comm.barrier()
        self._offset = int(np.load(self.tmp, mmap_mode="r").offset)
        self._row_bytes = int(np.prod(self.shape[1:], dtype=np.int64)) * self.dtype.itemsize
        self._handle = open(self.tmp, "r+b")

    def write(self, start: int, rows: np.ndarray) -> None:
        rows = np.ascontiguousarray(rows, dtype=self.dtype)
        if rows.shape[1:] != self.shape[1:] or not 0 <= start <= start + len(rows) <= self.shape[0]:
            raise ValueError(f"rows {tuple(rows.shape)} at {start} do not fit {self.shape}")
        self._handle.seek(self._offset + start * self._row_bytes)
        self._handle.write(rows.tobytes())

    def close(self) -> np.ndarray:
        """Finish (collective) and return the read-only map of the whole array."""
        self._handle.flush()
        os.fsync(self._handle.fileno())
        self._handle.close()
        comm.barrier()  # every rank's rows are on disk
        if comm.is_main():
            os.replace(self.tmp, self.path)
        comm.barrier()
        table = np.load(self.path, mmap_mode="r")
        # A caller may move the file's folder as soon as close() returns (the feature cache renames its .tmp folder
        # into place); every rank holds its map, which survives a rename, before any rank goes on.
        comm.barrier()
        return table

    def abort(self) -> None:
        if not self._handle.closed:
            self._handle.close()
