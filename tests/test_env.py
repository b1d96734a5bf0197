"""DistEnv detection: torchrun, SLURM (node lists, tasks per node, port), submitit, single; errors name the variable."""
import os
import stat

import pytest
import torch

from scan_dist.distributed import env as env_mod
from scan_dist.distributed.env import (DistEnv, destroy_process_group, detect, expand_nodelist, expand_nodelist_python,
                                init_process_group, parse_tasks_per_node, slurm_port)
from scan_dist.errors import ConfigError

TORCHRUN = {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2",
            "MASTER_ADDR": "10.0.0.5", "MASTER_PORT": "29400"}
SLURM = {"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1", "SLURM_NODEID": "2",
         "SLURM_TASKS_PER_NODE": "2(x4)", "SLURM_JOB_NODELIST": "gpu[07-09,12]", "SLURM_JOB_ID": "123456"}


@pytest.fixture
def no_scontrol(monkeypatch):
    monkeypatch.setattr(env_mod.shutil, "which", lambda name: None)


def test_single_process():
    env = detect("cpu", environ={})
    assert (env.rank, env.world_size, env.local_rank, env.local_world_size) == (0, 1, 0, 1)
    assert env.source == "single" and env.is_main and not env.distributed
    assert env.device == torch.device("cpu") and env.backend == "gloo"


def test_torchrun_variables():
    env = detect("cpu", environ=TORCHRUN)
    assert (env.rank, env.world_size, env.local_rank, env.local_world_size) == (3, 4, 1, 2)
    assert (env.master_addr, env.master_port, env.source) == ("10.0.0.5", 29400, "torchrun")
    assert not env.is_main and env.distributed


def test_torchrun_takes_precedence_over_slurm(no_scontrol):
    assert detect("cpu", environ={**SLURM, **TORCHRUN}).source == "torchrun"


def test_torchrun_single_process_needs_only_rank_and_world():
    env = detect("cpu", environ={"RANK": "0", "WORLD_SIZE": "1"})
    assert (env.world_size, env.local_rank, env.source) == (1, 0, "torchrun")


def test_slurm_variables(no_scontrol):
    env = detect("cpu", environ=SLURM)
    assert (env.rank, env.world_size, env.local_rank, env.local_world_size) == (5, 8, 1, 2)
    assert env.source == "slurm" and env.master_addr == "gpu07"
    assert env.master_port == 20000 + 123456 % 20000
    assert detect("cpu", environ={**SLURM, "MASTER_PORT": "31000", "MASTER_ADDR": "head"}).master_port == 31000


def test_slurm_tasks_per_node_forms(no_scontrol):
    uneven = {**SLURM, "SLURM_TASKS_PER_NODE": "3(x2),2", "SLURM_NODEID": "2", "SLURM_NTASKS": "8",
              "SLURM_PROCID": "7", "SLURM_LOCALID": "1"}
    assert detect("cpu", environ=uneven).local_world_size == 2
    explicit = {**SLURM, "SLURM_NTASKS_PER_NODE": "4"}
    assert detect("cpu", environ=explicit).local_world_size == 4
    assert parse_tasks_per_node("2(x3),1") == [2, 2, 2, 1]
    assert parse_tasks_per_node("4") == [4]
    with pytest.raises(ConfigError, match="SLURM_TASKS_PER_NODE"):
        parse_tasks_per_node("2(3)")


def test_nodelist_expansion_in_python():
    assert expand_nodelist_python("node[01-03,07],gpu5") == ["node01", "node02", "node03", "node07", "gpu5"]
    assert expand_nodelist_python("a[8-10]") == ["a8", "a9", "a10"]
    assert expand_nodelist_python("n[098-101]") == ["n098", "n099", "n100", "n101"]
    assert expand_nodelist_python("r[1-2]-n[1,3]") == ["r1-n1", "r1-n3", "r2-n1", "r2-n3"]
    assert expand_nodelist_python("single") == ["single"]
    with pytest.raises(ConfigError, match="SLURM_JOB_NODELIST"):
        expand_nodelist_python("node[01-")


def test_nodelist_prefers_scontrol(tmp_path, monkeypatch):
    fake = tmp_path / "scontrol"
    fake.write_text("#!/bin/sh\necho from-scontrol-1\necho from-scontrol-2\n")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    assert expand_nodelist("whatever[1-2]") == ["from-scontrol-1", "from-scontrol-2"]
    fake.write_text("#!/bin/sh\nexit 1\n")  # a broken scontrol (no slurm.conf): fall back to python
    assert expand_nodelist("node[1-2]") == ["node1", "node2"]


def test_slurm_port_is_in_the_high_range():
    assert slurm_port("0") == 20000 and slurm_port("19999") == 39999 and slurm_port("40001") == 20001
    assert 20000 <= slurm_port("123_4") < 40000  # array-style ids hash into the range


@pytest.mark.parametrize("environ, variable", [
    ({**TORCHRUN, "RANK": "4"}, "RANK"),
    ({**TORCHRUN, "RANK": "x"}, "RANK"),
    ({**TORCHRUN, "WORLD_SIZE": "0"}, "WORLD_SIZE"),
    ({**TORCHRUN, "LOCAL_RANK": "2"}, "LOCAL_RANK"),
    ({k: v for k, v in TORCHRUN.items() if k != "LOCAL_RANK"}, "LOCAL_RANK"),
    ({**TORCHRUN, "MASTER_PORT": "70000"}, "MASTER_PORT"),
    ({k: v for k, v in TORCHRUN.items() if k != "MASTER_ADDR"}, "MASTER_ADDR"),
    ({"RANK": "0"}, "WORLD_SIZE"),
    ({**SLURM, "SLURM_PROCID": "8"}, "SLURM_PROCID"),
    ({**SLURM, "SLURM_NTASKS": "eight"}, "SLURM_NTASKS"),
    ({**SLURM, "SLURM_LOCALID": "2"}, "SLURM_LOCALID"),
    ({**SLURM, "SLURM_NODEID": "4"}, "SLURM_NODEID"),
    ({**SLURM, "SLURM_TASKS_PER_NODE": "two"}, "SLURM_TASKS_PER_NODE"),
    ({**SLURM, "SLURM_JOB_NODELIST": "gpu[1-"}, "SLURM_JOB_NODELIST"),
])
def test_bad_values_name_the_variable(environ, variable, no_scontrol):
    with pytest.raises(ConfigError, match=variable):
        detect("cpu", environ=environ)


def test_device_preference(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert detect("auto", environ={}).device.type == "cpu"
    with pytest.raises(ConfigError, match="CUDA is not available"):
        detect("cuda", environ={})
    with pytest.raises(ConfigError, match="run.device"):
        detect("tpu", environ={})


def test_cuda_device_is_the_local_rank(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    env = detect("auto", environ=TORCHRUN)
    assert env.device == torch.device("cuda", 1) and env.backend == "nccl"
    assert detect("cpu", environ=TORCHRUN).backend == "gloo"
    with pytest.raises(ConfigError, match="local rank 2"):
        detect("cuda", environ={**TORCHRUN, "LOCAL_RANK": "2", "LOCAL_WORLD_SIZE": "4"})


def test_submitit_local_job():
    pytest.importorskip("submitit")
    environ = {"SUBMITIT_EXECUTOR": "local", "SUBMITIT_LOCAL_JOB_ID": "4242", "SUBMITIT_LOCAL_NTASKS": "2",
               "SUBMITIT_LOCAL_JOB_NUM_NODES": "1", "SUBMITIT_LOCAL_NODEID": "0", "SUBMITIT_LOCAL_GLOBALID": "1",
               "SUBMITIT_LOCAL_LOCALID": "1", "SUBMITIT_FOLDER": "/tmp"}
    before = dict(os.environ)
    env = detect("cpu", environ=environ)
    assert (env.rank, env.world_size, env.local_rank, env.local_world_size, env.source) == (1, 2, 1, 2, "submitit")
    assert env.master_port == slurm_port("4242")
    assert dict(os.environ) == before  # the temporary environment is undone


def test_single_process_group_is_a_noop_and_destroy_is_idempotent():
    env = detect("cpu", environ={})
    init_process_group(env, timeout_s=5)
    assert not torch.distributed.is_initialized()
    destroy_process_group()
    destroy_process_group()


def test_dist_env_is_frozen():
    env = DistEnv(0, 0, 1, 1, "127.0.0.1", 1, "single", torch.device("cpu"), "gloo")
    with pytest.raises(Exception):
        env.rank = 1
