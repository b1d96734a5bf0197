"""benchmarks/gpu_check.sh end to end in its CPU mode (``--dry``: tiny shapes, Triton's interpreter), run through the
link farm a machine without an install of this project gets, so the one-command GPU check is known to execute
before a GPU ever runs it; plus the pieces that read its output."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import gpu_check

REPO = Path(__file__).resolve().parent.parent


# What the GPU image of 2026-12 lacks: with omegaconf absent, tests/test_mine.py's import of the config tree stopped
# pytest's collection of every kernel test (found just before the first real run), so the dry run hides them too.
ABSENT_ON_A_BARE_GPU_MACHINE = ("omegaconf", "deepspeed", "faiss", "submitit", "nvidia.dali")


def _hide_packages(folder: Path, names) -> Path:
    """A sitecustomize that makes `names` unimportable, as on a machine that does not have them."""
    folder.mkdir()
    (folder / "sitecustomize.py").write_text(
        "import sys\n"
        f"HIDDEN = {tuple(names)!r}\n"
        "class _Hide:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if any(name == h or name.startswith(h + '.') for h in HIDDEN):\n"
        "            raise ModuleNotFoundError(f'No module named {name!r} (hidden by the test)', name=name)\n"
        "sys.meta_path.insert(0, _Hide())\n")
    return folder


@pytest.mark.slow
def test_dry_run_end_to_end(tmp_path):
    pytest.importorskip("triton")
    pytest.importorskip("torchvision")
    out = tmp_path / "out"
    hidden = _hide_packages(tmp_path / "bare", ABSENT_ON_A_BARE_GPU_MACHINE)
    pythonpath = os.pathsep.join(p for p in (str(hidden), os.environ.get("PYTHONPATH", "")) if p)
    env = {**os.environ, "GPU_CHECK_FORCE_SHIM": "1", "PYTHON": sys.executable, "TMPDIR": str(tmp_path),
           "PYTHONPATH": pythonpath}
    env.pop("TRITON_INTERPRET", None)  # the script sets it itself in --dry mode
    proc = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_check.sh"), str(out), "--dry"], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads((out / "gpu_check.json").read_text())
    steps = data["steps"]
    assert list(steps) == ["env", "tests_gpu", "tests_kernels", "selfcheck", "scan_loss", "knn", "train_step",
                           "resources"]
    for name, step in steps.items():
        assert step["rc"] == 0 and not step["timed_out"], (name, step.get("log_tail"))
        if "data" in step:
            assert not step["data"]["errors"], (name, step["data"]["errors"])
            assert step["data"]["imported_project_config"] is False  # no omegaconf needed on a bare machine
    # Imported through the link farm, not through the editable install of this checkout.
    environment = steps["env"]["data"]["environment"]
    shim = Path(environment["scan_dist_kernels_file"]).parent.parent.parent
    assert shim.name.startswith("gpu_check_shim.") and shim.parent == tmp_path
    assert not shim.exists()  # removed on exit
    assert steps["tests_kernels"]["pytest"]["counts"].get("PASSED", 0) >= 5
    # Without omegaconf the mine-stage tests are left out by name instead of stopping pytest's collection.
    assert "omegaconf missing" in (out / "logs" / "mine_tests_skipped.log").read_text()
    assert not steps["tests_kernels"]["pytest"]["failed"]
    assert all(row["ok"] for row in steps["selfcheck"]["data"]["results"])
    impls = {row["impl"] for row in steps["scan_loss"]["data"]["results"]}
    assert {"parity", "triton", "eager", "compile", "kernel_fwd", "kernel_bwd"} <= impls
    knn = {row["impl"]: row for row in steps["knn"]["data"]["results"]}
    assert knn["triton_fp16"]["recall_vs_triton_fp32"] == 1.0  # exact: same neighbours as the fp32 kernel
    assert "all_queries_s_extrapolated" in knn["triton_fp32"]
    assert {row["loss_backend"] for row in steps["train_step"]["data"]["results"]} == {"triton", "torch"}
    (offline,) = steps["resources"]["data"]["results"]
    assert offline["regs"] > 0 and offline["arch"] == "sm_90"


def test_parse_pytest_log_plain_and_xdist():
    text = "\n".join([
        "tests/test_a.py::test_one PASSED                                  [ 33%]",
        "tests/test_a.py::test_two[x-1] FAILED                             [ 66%]",
        "[gw1] [ 90%] SKIPPED tests/test_b.py::test_three ",
        "[gw0] [100%] ERROR tests/test_b.py::test_four",
        "==== 1 failed, 1 passed, 1 skipped, 1 error in 3.2s ====",
    ])
    parsed = gpu_check.parse_pytest_log(text)
    assert parsed["counts"] == {"PASSED": 1, "FAILED": 1, "SKIPPED": 1, "ERROR": 1}
    assert parsed["failed"] == ["tests/test_a.py::test_two[x-1]", "tests/test_b.py::test_four"]
    assert parsed["summary_line"] == "1 failed, 1 passed, 1 skipped, 1 error in 3.2s"


def test_assemble_reports_a_killed_step(tmp_path):
    (tmp_path / "steps").mkdir()
    (tmp_path / "logs").mkdir()
    (tmp_path / "status.tsv").write_text("env\t0\t3\t25\nknn\t124\t90\t90\n")
    (tmp_path / "steps" / "knn.json").write_text(json.dumps({"results": [{"impl": "triton_fp32"}], "errors": []}))
    (tmp_path / "logs" / "knn.log").write_text("[knn] triton_fp32: Q=16384 0.2 s\n")
    combined = gpu_check.assemble(tmp_path)
    assert combined["steps"]["knn"]["timed_out"] and combined["steps"]["knn"]["data"]["results"]
    assert combined["steps"]["knn"]["log_tail"] == ["[knn] triton_fp32: Q=16384 0.2 s"]
    assert not combined["all_ok"] and combined["total_seconds"] == 93
    assert json.loads((tmp_path / "gpu_check.json").read_text())["steps"]["env"]["rc"] == 0


def test_caps_fit_eight_minutes():
    """The per-step caps of the GPU run add up to at most 8 minutes (less a margin for start-up and assembly)."""
    text = (REPO / "benchmarks" / "gpu_check.sh").read_text()
    gpu_caps = [line for line in text.splitlines() if line.strip().startswith("CAPS=(env:25")]
    assert len(gpu_caps) == 1
    total = sum(int(pair.split(":")[1]) for pair in gpu_caps[0].split("(")[1].rstrip(")").split())
    assert total <= 470, total
    result = subprocess.run(["bash", "-n", str(REPO / "benchmarks" / "gpu_check.sh")], capture_output=True)
    assert result.returncode == 0, result.stderr
