"""Multi-process tests on gloo over 127.0.0.1: ranks spawned with one intra-op thread each, one process
group per rank, and rank 0's result handed back through a temporary folder."""

from __future__ import annotations

import contextlib
import tempfile
import time
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tests.transport.helpers import free_port


def run_ranks(worker, *args, nprocs: int = 2, timeout_s: float = 120.0) -> None:
    """``worker(rank, *args)`` in ``nprocs`` spawned processes (one intra-op thread each); fails when they
    are not done within ``timeout_s``."""
    with pytest.MonkeyPatch.context() as mpatch:
        mpatch.setenv("OMP_NUM_THREADS", "1")  # inherited by the spawned ranks
        ctx = mp.spawn(worker, args=args, nprocs=nprocs, join=False)
        deadline = time.monotonic() + timeout_s
        while not ctx.join(timeout=1):
            assert time.monotonic() < deadline, f"workers did not finish within {timeout_s:.0f} s"


@contextlib.contextmanager
def gloo_group(rank: int, port: int, world_size: int = 2, timeout_s: float = 60.0):
    """The default process group of this rank for the body of the ``with``, destroyed after it."""
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world_size,
        timeout=timedelta(seconds=timeout_s),
    )
    try:
        yield
    finally:
        dist.destroy_process_group()


@contextlib.contextmanager
def rank0_result(worker, timeout_s: float):
    """Run ``worker(rank, port, out)`` on two ranks; yields ``(out, what rank 0 saved to out/rank0.pt)``
    while the folder ``out`` still exists."""
    with tempfile.TemporaryDirectory() as out:
        run_ranks(worker, free_port(), out, timeout_s=timeout_s)
        yield out, torch.load(f"{out}/rank0.pt", weights_only=True)
