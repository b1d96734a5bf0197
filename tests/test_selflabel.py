"""Self-labelling: the head-only mode on a frozen backbone's cached features (selflabel.mode=cached)."""
import json
import subprocess
import sys

import numpy as np
import pytest

from scan_dist.config import load_config
from scan_dist.errors import ConfigError


def test_cached_mode_needs_views():
    with pytest.raises(ConfigError, match="selflabel.cached_views"):
        load_config("smoke", ["selflabel.mode=cached", "selflabel.cached_views=0"])


@pytest.mark.slow
def test_cached_self_labelling_end_to_end(tmp_path, fashion_mnist):
    run_dir = tmp_path / "run"
    result = subprocess.run([sys.executable, "-m", "scan_dist.launch", "--run-dir", str(run_dir), "smoke",
                             "run.progress=false", "selflabel.mode=cached", "selflabel.cached_views=2",
                             "selflabel.threshold=0.3"], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    stage = json.loads((run_dir / "selflabel" / "DONE").read_text())["metrics"]
    assert stage["final_confident"] > 0 and "final_loss" in stage  # the head actually trained
    (cache,) = (run_dir / "selflabel" / "cache").iterdir()
    table = np.load(cache / "features.npy", mmap_mode="r")
    assert table.dtype == np.float16 and table.shape[:2] == (3000, 3)  # plain view + 2 strong views
    assert json.loads((run_dir / "metrics.json").read_text())["acc"] > 0.2
