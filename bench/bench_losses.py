"""Fused lm_head + top-k distillation loss vs a naive full-logits baseline (synthetic workload).

Run: ``.venv/bin/python -m pytest bench/bench_losses.py --benchmark-only -s`` (``GKD_BENCH_QUICK=1``:
small shapes with the same vocabularies, the memory of two variants only). Time: forward+backward, the
variants measured in the same run, rounds interleaved, ``GKD_BENCH_THREADS`` torch threads (default: all
cores; 1 in quick mode, where a 2-thread team on a shared 2-core machine mostly measures contention).
Memory: *extra* peak = peak RSS during one forward+backward minus the RSS of inputs and the bytes of their
gradients, each variant in a fresh process (glibc's mmap threshold is pinned so freed buffers leave the
RSS). Ratios (higher is better): ``fused_bucket_speedup`` / ``fused_none_speedup`` (naive time / fused
time, each its fastest round) and ``fused_bucket_memory_saving`` (naive extra peak / fused extra peak).
Full-mode results go to bench/results/losses.json.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from gkd.kernels import fused_linear_topk_distill_loss

K = 64
QUICK = os.environ.get("GKD_BENCH_QUICK") == "1"
# (N, H, V); the ids name the vocabulary, which quick mode keeps
SHAPES = [(256, 128, 32000), (64, 128, 151936)] if QUICK else [(4096, 1024, 32000), (2048, 896, 151936)]
SHAPE_IDS = [f"V{v}" for _, _, v in SHAPES]
ROUNDS = int(os.environ.get("GKD_BENCH_ROUNDS", "9" if QUICK else "3"))
THREADS = int(os.environ.get("GKD_BENCH_THREADS", "1" if QUICK else str(os.cpu_count() or 1)))
MEMORY_VARIANTS = ("naive", "fused_bucket") if QUICK else ("naive", "fused_none", "fused_bucket")
RESULTS = Path(__file__).resolve().parent / "results" / "losses.json"


def make_inputs(n, h, v, device="cpu", dtype=torch.float32, seed=0):
    """Synthetic: random hidden states, lm_head and a random teacher's top-K (ids unique per row)."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g).to(device, dtype).requires_grad_()
    weight = (torch.randn(v, h, generator=g) / h**0.5).to(device, dtype).requires_grad_()
    ids = torch.stack([torch.randperm(v, generator=g)[:K] for _ in range(n)]).to(device)
    lp = torch.log_softmax(torch.randn(n, K, generator=g) * 2, -1) + torch.log(torch.tensor(0.9))
    return hidden, weight, ids, lp.to(device)


def naive_loss(hidden, weight, ids, lp):
    """What one writes without a fused kernel: full logits, log_softmax, gather, KL, autograd."""
    logq = torch.log_softmax((hidden @ weight.t()).float(), dim=-1)  # [N, V]
    return (lp.exp() * (lp - logq.gather(1, ids))).sum()


def fused_loss(hidden, weight, ids, lp, tail="none", backend="torch"):
    return fused_linear_topk_distill_loss(
        hidden, weight, ids, lp, tail=tail, backend=backend, check_inputs=False
    )


VARIANTS = {
    "naive": naive_loss,
    "fused_none": lambda *a: fused_loss(*a, tail="none"),  # the same value as naive
    "fused_bucket": lambda *a: fused_loss(*a, tail="bucket"),  # gkd's default loss
}


def step(fn, inputs):
    hidden, weight = inputs[0], inputs[1]
    hidden.grad = weight.grad = None
    fn(*inputs).backward()


def _status_kb(field):
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def measure_memory(variant, n, h, v):
    """In this (fresh) process: extra peak bytes of one forward+backward beyond inputs and gradients."""
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    inputs = make_inputs(n, h, v)
    fn = VARIANTS[variant]
    step(fn, inputs)  # warm-up: thread pools, allocator, kernels
    grad_bytes = sum(t.grad.numel() * t.grad.element_size() for t in inputs[:2])
    inputs[0].grad = inputs[1].grad = None
    gc.collect()
    base = _status_kb("VmRSS") * 1024
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak (VmHWM) to the current RSS
    step(fn, inputs)
    peak = _status_kb("VmHWM") * 1024
    return {
        "variant": variant,
        "base_bytes": base,
        "grad_bytes": grad_bytes,
        "extra_bytes": peak - base - grad_bytes,
    }


def memory_in_fresh_process(variant, n, h, v):
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")
    cmd = [sys.executable, __file__, "--memory", variant, str(n), str(h), str(v)]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _record(key, value):
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    data = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    data[key] = value
    RESULTS.write_text(json.dumps(data, indent=2))


@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_fused_vs_naive_cpu(benchmark, shape):
    n, h, v = shape
    torch.set_num_threads(THREADS)
    inputs = make_inputs(n, h, v)
    times = {name: [] for name in VARIANTS}
    for fn in VARIANTS.values():  # warm-up each once
        step(fn, inputs)
    for _ in range(ROUNDS):  # interleaved so machine noise hits all variants alike
        for name, fn in VARIANTS.items():
            t0 = time.perf_counter()
            step(fn, inputs)
            times[name].append(time.perf_counter() - t0)
    benchmark.pedantic(step, args=(VARIANTS["fused_bucket"], inputs), rounds=1, iterations=1)
    del inputs
    gc.collect()
    mem = {name: memory_in_fresh_process(name, n, h, v) for name in MEMORY_VARIANTS}
    med = {name: statistics.median(ts) for name, ts in times.items()}
    best = {name: min(ts) for name, ts in times.items()}  # the round least disturbed by other load
    report = {
        "shape": {"N": n, "H": h, "V": v, "K": K, "dtype": "float32"},
        "median_s": med,
        "extra_peak_bytes": {name: m["extra_bytes"] for name, m in mem.items()},
        "time_ratio_vs_naive": {name: med[name] / med["naive"] for name in VARIANTS if name != "naive"},
        "extra_memory_ratio_vs_naive": {
            name: mem[name]["extra_bytes"] / mem["naive"]["extra_bytes"] for name in mem if name != "naive"
        },
        "threads": THREADS,
    }
    benchmark.extra_info.update(report)
    benchmark.extra_info["ratios"] = {
        "fused_bucket_speedup": best["naive"] / best["fused_bucket"],
        "fused_none_speedup": best["naive"] / best["fused_none"],
        "fused_bucket_memory_saving": mem["naive"]["extra_bytes"] / mem["fused_bucket"]["extra_bytes"],
    }
    if not QUICK:
        _record(f"cpu/N{n}_H{h}_V{v}", report)
    print(json.dumps(report, indent=2))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="GPU section: needs CUDA")
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_triton_vs_torch_vs_naive_gpu(benchmark, shape):
    n, h, v = shape
    inputs = make_inputs(n, h, v, device="cuda", dtype=torch.bfloat16)
    variants = {
        "naive": naive_loss,
        "torch": lambda *a: fused_loss(*a, tail="bucket", backend="torch"),
        "triton": lambda *a: fused_loss(*a, tail="bucket", backend="triton"),
    }
    stats = {}
    for name, fn in variants.items():
        step(fn, inputs)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(ROUNDS):
            step(fn, inputs)
        end.record()
        torch.cuda.synchronize()
        stats[name] = {
            "ms": start.elapsed_time(end) / ROUNDS,
            "extra_peak_bytes": torch.cuda.max_memory_allocated() - base,
        }
    benchmark.pedantic(step, args=(variants["triton"], inputs), rounds=1, iterations=1)
    report = {name: {**s, "time_ratio_vs_naive": s["ms"] / stats["naive"]["ms"]} for name, s in stats.items()}
    benchmark.extra_info.update(report)
    benchmark.extra_info["ratios"] = {
        f"{name}_speedup": stats["naive"]["ms"] / stats[name]["ms"] for name in ("torch", "triton")
    }
    _record(f"gpu/N{n}_H{h}_V{v}", report)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--memory", nargs=4, metavar=("VARIANT", "N", "H", "V"), required=True)
    a = parser.parse_args()
    print(json.dumps(measure_memory(a.memory[0], *(int(x) for x in a.memory[1:]))))
