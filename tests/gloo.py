"""Helpers for the 2-process gloo tests: a free loopback port and a process group that always closes."""
import contextlib
import datetime
import gc
import os
import socket
import sys

import torch
import torch.distributed as dist


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def gloo_group(rank: int, world: int, port: int):
    """The whole life of one spawned rank: its body must be the last thing the worker does.

    One thread per process (2 cores run both ranks); a timeout so a broken test fails instead of hanging.  A body
    that raises propagates (mp.spawn reports it).  A body that returns ends the process with os._exit(0) once the
    group is closed: CI once saw a finished rank abort in interpreter teardown ("terminate called without an active
    exception", SIGABRT) as gloo's worker threads were destroyed, failing a test whose results were already on disk.
    """
    torch.set_num_threads(1)
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60))
    try:
        yield dist
    except BaseException:
        dist.destroy_process_group()
        raise
    gc.collect()  # autograd graphs saved with a group reference keep it alive past destroy_process_group
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
