"""Shared pieces of bench/gpu_kernels.py and bench/gpu_kernels_fused.py: a skipped case, timing (CUDA
events on a GPU), extra peak memory, the normwise error."""

from __future__ import annotations

import gc
import statistics
import time


class Skip(Exception):
    """A case that cannot run here (its reason goes into the row)."""


def _free():
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _sync(dev):
    import torch

    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def median_seconds(fn, dev, iters: int, warmup: int = 1) -> float:
    """Median wall time of ``fn`` (CUDA events on a GPU)."""
    import torch

    for _ in range(warmup):
        fn()
    _sync(dev)
    times = []
    for _ in range(iters):
        if dev.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def extra_peak_bytes(fn, dev) -> int | None:
    """Peak bytes allocated during ``fn`` beyond what was allocated before it (CUDA only)."""
    import torch

    if dev.type != "cuda":
        return None
    _sync(dev)
    _free()
    torch.cuda.reset_peak_memory_stats(dev)
    base = torch.cuda.memory_allocated(dev)
    fn()
    _sync(dev)
    return torch.cuda.max_memory_allocated(dev) - base


def normwise(got, want) -> float:
    """max |got - want| / max |want| (0 when both are 0)."""
    err = (got.double() - want.double()).abs().max().item() if got.numel() else 0.0
    scale = want.double().abs().max().item() if want.numel() else 0.0
    return err / scale if scale > 0 else err
