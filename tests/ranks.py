"""Multi-process tests on gloo over 127.0.0.1: ranks forked from one server process that has imported torch,
transformers and gkd's trainer modules once, one intra-op thread each, one process group per rank, and rank
0's result handed back through a temporary folder."""

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

# What every rank imports anyway. The forkserver (started on the first call, kept for the session) imports
# them once and forks each rank from itself: a spawned rank would import them again, ~3-5 s of CPU each on
# two cores, which cost more than the tests themselves (a module that fails to import is skipped there).
PRELOAD = [
    "torch",
    "torch.distributed.fsdp",
    "torch.distributed.checkpoint",
    "transformers",
    "transformers.models.llama.modeling_llama",
    "gkd.trainer.checkpoint",
    "gkd.trainer.step",
    "gkd.weights.transfer",
]


def _one_thread(rank: int, worker, *args) -> None:
    """The rank's body: one intra-op thread (the forkserver's own setting may predate OMP_NUM_THREADS=1)."""
    torch.set_num_threads(1)
    worker(rank, *args)


def run_ranks(worker, *args, nprocs: int = 2, timeout_s: float = 120.0) -> None:
    """``worker(rank, *args)`` (a module-level function) in ``nprocs`` processes forked from the
    forkserver (one intra-op thread each); fails when they are not done within ``timeout_s``, killing
    those still running."""
    with pytest.MonkeyPatch.context() as mpatch:
        mpatch.setenv("OMP_NUM_THREADS", "1")  # the forkserver's environment when this call starts it
        mp.set_forkserver_preload(PRELOAD)
        ctx = mp.start_processes(
            _one_thread, args=(worker, *args), nprocs=nprocs, join=False, start_method="forkserver"
        )
        deadline = time.monotonic() + timeout_s
        try:
            while not ctx.join(timeout=1):
                assert time.monotonic() < deadline, f"workers did not finish within {timeout_s:.0f} s"
        finally:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()


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
