"""Atomic writes: a full disk during a checkpoint is one clear error and the previous checkpoint stays loadable."""
import subprocess

import pytest
import torch

from scan_dist.distributed.checkpoint import load_checkpoint, save_checkpoint
from scan_dist.errors import StorageError


def _tmpfs(path, size="300k"):
    path.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {mounted.stderr.decode().strip()}")
    return path


def test_full_disk_during_a_checkpoint_keeps_the_previous_one(tmp_path):
    folder = _tmpfs(tmp_path / "small")
    try:
        path = folder / "checkpoint.pt"
        save_checkpoint(path, "hash", {"epoch": 0, "step": 2}, {"weights": torch.zeros(1000)})  # 4 KB: fits
        with pytest.raises(StorageError, match="No space left on device") as info:
            save_checkpoint(path, "hash", {"epoch": 0, "step": 4}, {"weights": torch.zeros(200_000)})  # 800 KB
        assert "checkpoint.pt" in str(info.value) and "\n" not in str(info.value)
        kept = load_checkpoint(path, "hash")
        assert kept["position"]["step"] == 2  # the previous checkpoint, intact
        assert [p.name for p in folder.iterdir()] == ["checkpoint.pt"]  # no temporary file left behind
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)  # lazy: never leave a mount behind
