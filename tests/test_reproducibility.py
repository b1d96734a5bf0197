"""run.deterministic and run.cpu_kernels: the process-wide switches they set (that they rerun no stage:
test_pipeline.py's _EXCLUDED), and the machine records the report compares."""
import logging
import os
import platform
import subprocess
import sys
import textwrap

import pytest
import torch

from scan_dist import reproducibility
from scan_dist.errors import ConfigError


def _in_fresh_process(code: str, env: dict | None = None) -> str:
    # The switches are process-wide: check them in a child so this test process stays as it was.
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=120,
                         env={**os.environ, **(env or {})})
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def test_off_changes_nothing():
    assert reproducibility.apply(False) is None
    assert _in_fresh_process("""
        import os, torch
        os.environ.pop('CUBLAS_WORKSPACE_CONFIG', None)
        from scan_dist import reproducibility
        reproducibility.apply(False)
        print(torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.deterministic,
              'CUBLAS_WORKSPACE_CONFIG' in os.environ)
    """).split() == ["False", "False", "False"]


def test_on_sets_torch_cudnn_and_cublas():
    line = _in_fresh_process("""
        import os, torch
        from scan_dist import reproducibility
        msg = reproducibility.apply(True)
        print(torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
              torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark,
              os.environ['CUBLAS_WORKSPACE_CONFIG'], 'run.deterministic' in msg)
    """)
    assert line.split() == ["True", "True", "True", "False", ":4096:8", "True"]


def test_a_users_cublas_setting_is_kept():
    assert _in_fresh_process("""
        import os
        from scan_dist import reproducibility
        reproducibility.apply(True)
        print(os.environ['CUBLAS_WORKSPACE_CONFIG'])
    """, env={"CUBLAS_WORKSPACE_CONFIG": ":16:8"}) == ":16:8"


def test_machine_names_the_processor_threads_and_torch_build(monkeypatch):
    info = reproducibility.machine("cpu")
    assert info["cpu"] == reproducibility.cpu_model() and info["cpu"] != ""
    assert info["threads"] == torch.get_num_threads() and info["torch"] == torch.__version__
    assert "gpu" not in info  # a CPU stage names no GPU
    assert info["cpu_capability"] == torch.backends.cpu.get_cpu_capability()  # e.g. AVX2: picks the CPU kernels
    if os.path.isfile("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as cpuinfo:
            names = [line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")]
        if names:
            assert info["cpu"] == names[0]
    monkeypatch.setattr("builtins.open", lambda *a, **k: (_ for _ in ()).throw(OSError("no /proc")))
    assert reproducibility.cpu_model()  # falls back to the platform module, never fails


def test_same_kind_compares_what_picks_the_kernels():
    avx2 = {"cpu": "AMD EPYC", "cpu_capability": "AVX2", "cpus": 2, "threads": 2, "torch": "2.14.1",
            "python": "3.11.7"}
    assert reproducibility.same_kind(avx2, {**avx2, "cpus": 64, "python": "3.12.1"})  # neither picks a kernel
    for key, other in (("cpu_capability", "AVX512"), ("threads", 4), ("torch", "2.11.0"), ("cpu", "Intel Xeon")):
        assert reproducibility.same_kind(avx2, {**avx2, key: other}) is False, key
    older = {k: v for k, v in avx2.items() if k != "cpu_capability"}  # a record made before the field existed
    assert reproducibility.same_kind(avx2, older) is True
    assert reproducibility.same_kind(avx2, None) is None
    h200 = {**avx2, "gpu": "NVIDIA H200", "cuda": "13.0"}
    assert reproducibility.same_kind(h200, {**h200, "gpu": "NVIDIA H100 80GB HBM3"}) is False
    assert reproducibility.same_kind(h200, avx2) is False  # one host, the stage on its GPU or on its processor
    assert reproducibility.kind_label(avx2) == "AMD EPYC (AVX2), 2 threads, torch 2.14.1"
    assert reproducibility.kind_label(older) == "AMD EPYC, 2 threads, torch 2.14.1"
    assert reproducibility.kind_label(h200) == "NVIDIA H200, CUDA 13.0, torch 2.14.1"
    assert reproducibility.kind_label(None) == "?"


X86 = platform.machine().lower() in ("x86_64", "amd64")


@pytest.mark.skipif(not X86, reason="run.cpu_kernels caps x86 instruction sets")
def test_cpu_kernel_env_names_what_is_missing():
    wanted = reproducibility.CPU_KERNEL_ENV["avx2"]
    assert reproducibility.cpu_kernel_env("avx2", {}) == wanted
    assert reproducibility.cpu_kernel_env("avx2", dict(wanted)) == {}
    other = {**wanted, "ATEN_CPU_CAPABILITY": "avx512"}  # a user's own, different cap is replaced
    assert reproducibility.cpu_kernel_env("avx2", other) == {"ATEN_CPU_CAPABILITY": "avx2"}
    assert reproducibility.cpu_kernel_env("native", {}) == {}


def test_cpu_kernel_env_refuses_an_unknown_choice():
    with pytest.raises(ConfigError, match="run.cpu_kernels='avx9'.*native or avx2"):
        reproducibility.cpu_kernel_env("avx9", {})


def test_cpu_kernels_note_says_whether_the_cap_holds(monkeypatch):
    assert reproducibility.cpu_kernels_note("native") is None
    for key in reproducibility.CPU_KERNEL_ENV["avx2"]:
        monkeypatch.delenv(key, raising=False)
    level, line = reproducibility.cpu_kernels_note("avx2")
    if X86:  # this test process started without the variables: the cap cannot hold here, and says so
        assert level == logging.WARNING and "not in force" in line and "ATEN_CPU_CAPABILITY=avx2" in line
    else:
        assert level == logging.INFO and "not an x86" in line
