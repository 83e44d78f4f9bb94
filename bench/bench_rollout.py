"""Rollout: the CPU engine against plain ``transformers`` ``generate``, and applying a weight version.

Run: ``.venv/bin/python -m pytest bench/bench_rollout.py --benchmark-only -s`` (``GKD_BENCH_QUICK=1``:
16 new tokens, 3 rounds, no seeded variant). Ratios (higher is better): ``speedup_vs_generate``,
``seeded_speedup_vs_generate``, ``raw_copy_over_apply`` (the apply's fraction of a raw copy's speed) and,
with vLLM, ``vllm_speedup_vs_cpu_engine``, each from the variants' fastest rounds. Full-mode results go to
bench/results/rollout.json. The vLLM section runs where vllm is importable (skipped elsewhere):
``VLLM_CPU_KVCACHE_SPACE=1 .venv-vllm/bin/python -m pytest bench/bench_rollout.py -k vllm --benchmark-only``
(needs ``pytest-benchmark`` in that venv).

Model: a SmolLM-135M-shaped Llama built from a config (vocab 49152, hidden 576, 6 layers instead of 30,
tied embeddings), float32 on CPU, ``GKD_BENCH_THREADS`` intra-op threads (default 1: on a shared 2-core
machine a 2-thread OpenMP team mostly measures contention).

- Generation: 8 prompts x 64 tokens, 64 new tokens each, temperature 1, no top-k/top-p. Baseline:
  ``model.generate(do_sample=True, top_k=0, output_scores=True, return_dict_in_generate=True)`` plus
  ``compute_transition_scores(normalize_logits=True)`` for the sampled tokens' log-probs (what the engine
  returns), EOS disabled so both produce exactly 64 tokens per row. The engine runs unseeded (one
  multinomial per step, as generate) and seeded (one generator per prompt). Rounds are interleaved; the
  figure is generate's median time over the engine's (target >= 1.0).
- Weight apply: the staged version (the ``WeightReceiver``'s flat bucket buffers, 256 MiB buckets) copied
  into the engine by ``engine.load_weights`` (strict name/shape check + per-tensor copies), against one
  raw ``copy_`` of the same number of bytes between two flat buffers. Figure: apply / raw copy.
- vLLM (same model, saved to a temporary folder, ``enforce_eager=True`` unless ``GKD_BENCH_VLLM_EAGER=0``):
  the weight apply as above through ``VLLMRolloutEngine.load_weights`` (on CPU: the worker's
  ``reload_weights``, which rebuilds the oneDNN-packed layers, + the tied head + a prefix-cache reset)
  against the same raw copy; and generation (the batch above, seeded) against the CPU engine, interleaved.
"""

from __future__ import annotations

import importlib.util
import json
import os
import statistics
import time

import pytest
import torch

from bench._common import QUICK, interleaved_times, record, rounded
from gkd.rollout.hf_engine import HFRolloutEngine
from gkd.rollout.types import SamplingConfig
from gkd.weights.flat import FlatBuffer, TensorMeta, plan_buckets
from tests.tiny_llama import tiny_llama

ROUNDS = int(os.environ.get("GKD_BENCH_ROUNDS", "3" if QUICK else "5"))
THREADS = int(os.environ.get("GKD_BENCH_THREADS", "1"))
BATCH, PROMPT, NEW = 8, 64, 16 if QUICK else 64


def _model():
    model = tiny_llama(0, 49152, 2048, hidden=576, intermediate=1536, layers=6, heads=9, kv_heads=3, tie=True)
    model.generation_config.eos_token_id = None  # both sides generate exactly NEW tokens per row
    model.generation_config.pad_token_id = 0
    return model


def _save(name: str, report: dict) -> None:
    if not QUICK:  # quick-mode figures are for bench_check, not the recorded results
        record("rollout", name, report)


def _staged_version(params: dict[str, torch.Tensor]) -> list[FlatBuffer]:
    """The WeightReceiver's staging buffers holding a "new version": the given weights, perturbed."""
    metas = [TensorMeta(n, p.dtype, tuple(p.shape)) for n, p in params.items()]
    staging = [FlatBuffer.empty(b.metas, b.nbytes) for b in plan_buckets(metas, 256 << 20, 256)]
    with torch.no_grad():
        for fb in staging:
            fb.write({m.name: params[m.name] + 0.01 for m in fb.metas})
    return staging


def _apply_vs_raw_copy(benchmark, engine, params, context: dict, check, name: str) -> None:
    """Time ``engine.load_weights`` of a staged version of ``params`` against one raw copy of as many
    bytes, interleaved; ``check(staging)`` after the applies; report ``raw_copy_over_apply``."""
    staging = _staged_version(params)
    nbytes = sum(p.numel() * p.element_size() for p in params.values())
    src = torch.full((nbytes,), 1, dtype=torch.uint8)
    dst = torch.zeros_like(src)

    def apply():
        engine.load_weights(((n, t) for fb in staging for n, t in fb.unpack().items()), version=1)

    times = interleaved_times({"apply": apply, "raw_copy": lambda: dst.copy_(src)}, max(ROUNDS, 5))
    check(staging)
    benchmark.pedantic(apply, rounds=1, iterations=1)
    med = {k: statistics.median(v) for k, v in times.items()}
    report = {
        **context,
        "bytes": nbytes,
        "tensors": len(params),
        "apply_s": round(med["apply"], 4),
        "raw_copy_s": round(med["raw_copy"], 4),
        "apply_over_raw_copy": round(med["apply"] / med["raw_copy"], 3),
        "apply_GBps": round(nbytes / med["apply"] / 1e9, 2),
        "all_s": rounded(times),
    }
    benchmark.extra_info.update(report)
    benchmark.extra_info["ratios"] = {"raw_copy_over_apply": min(times["raw_copy"]) / min(times["apply"])}
    _save(name, report)
    print(json.dumps(report, indent=2))


@pytest.fixture(scope="module")
def model():
    torch.set_num_threads(THREADS)
    return _model()


def test_engine_vs_transformers_generate(benchmark, model):
    engine = HFRolloutEngine(model, max_batch_size=BATCH)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, engine.vocab_size, (BATCH, PROMPT), generator=g)
    prompts = ids.tolist()
    unseeded = SamplingConfig(max_new_tokens=NEW, temperature=1.0)
    seeded = SamplingConfig(max_new_tokens=NEW, temperature=1.0, seed=7)

    @torch.no_grad()
    def hf_generate():
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            do_sample=True,
            temperature=1.0,
            top_k=0,
            top_p=1.0,
            max_new_tokens=NEW,
            output_scores=True,
            return_dict_in_generate=True,
        )
        logprobs = model.compute_transition_scores(out.sequences, out.scores, normalize_logits=True)
        assert logprobs.shape == (BATCH, NEW)
        return out.sequences, logprobs

    def engine_unseeded():
        samples = engine.generate(prompts, unseeded)
        assert all(len(s.response_ids) == NEW for s in samples)

    def engine_seeded():
        engine.generate(prompts, seeded)

    variants = {"generate": hf_generate, "engine": engine_unseeded, "engine_seeded": engine_seeded}
    if QUICK:
        del variants["engine_seeded"]
    times = interleaved_times(variants, ROUNDS)
    benchmark.pedantic(engine_unseeded, rounds=1, iterations=1)
    med = {k: statistics.median(v) for k, v in times.items()}
    report = {
        "batch": f"{BATCH} prompts x {PROMPT} tokens, {NEW} new tokens, vocab {engine.vocab_size}, 6 layers",
        "torch_threads": THREADS,
        "rounds": ROUNDS,
        **{f"{k}_s": round(v, 4) for k, v in med.items()},
        "speedup_vs_generate": round(med["generate"] / med["engine"], 3),
        "all_s": rounded(times),
    }
    benchmark.extra_info.update(report)
    best = {k: min(v) for k, v in times.items()}  # the rounds least disturbed by other load
    ratios = {f"{'seeded_' if k == 'engine_seeded' else ''}speedup_vs_generate": best["generate"] / best[k]
              for k in best if k != "generate"}  # fmt: skip
    benchmark.extra_info["ratios"] = ratios
    report.update({f"{k}_x": round(v, 3) for k, v in ratios.items()})
    _save("engine_vs_generate", report)
    print(json.dumps(report, indent=2))


def test_apply_version_vs_raw_copy(benchmark, model):
    engine = HFRolloutEngine(model)
    params = engine.parameters_spec()

    def check(staging):
        first = next(iter(staging[0].metas))
        assert torch.equal(params[first.name], staging[0].unpack()[first.name])

    _apply_vs_raw_copy(benchmark, engine, params, {"torch_threads": THREADS}, check, "apply_version")


# ---------------------------------------------------------------------------------------------- vLLM

needs_vllm = pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vllm is not installed")


@pytest.fixture(scope="module")
def vllm_engine(model, tmp_path_factory):
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from gkd.rollout.vllm_engine import VLLMRolloutEngine

    path = tmp_path_factory.mktemp("bench-student")
    model.save_pretrained(path)
    eager = os.environ.get("GKD_BENCH_VLLM_EAGER", "1") == "1"
    start = time.perf_counter()
    engine = VLLMRolloutEngine(str(path), enforce_eager=eager, max_model_len=PROMPT + NEW)
    return engine, {"vllm_start_s": round(time.perf_counter() - start, 1), "enforce_eager": eager}


@needs_vllm
def test_vllm_apply_version_vs_raw_copy(benchmark, model, vllm_engine):
    engine, info = vllm_engine

    def check(_):
        assert engine.policy_version == 1

    context = {**info, "on_cpu": engine.on_cpu}
    _apply_vs_raw_copy(
        benchmark, engine, dict(model.named_parameters()), context, check, "vllm_apply_version"
    )


@needs_vllm
def test_vllm_vs_cpu_engine(benchmark, model, vllm_engine):
    engine, info = vllm_engine
    hf = HFRolloutEngine(model, max_batch_size=BATCH)
    if engine.policy_version != 0:  # the apply benchmark left perturbed weights: back to the model's
        engine.load_weights(hf.parameters_spec().items(), version=0)
    g = torch.Generator().manual_seed(1)
    prompts = torch.randint(0, engine.vocab_size, (BATCH, PROMPT), generator=g).tolist()
    seeded = SamplingConfig(max_new_tokens=NEW, temperature=1.0, seed=7)

    def run_vllm():
        assert all(len(s.response_ids) == NEW for s in engine.generate(prompts, seeded))

    def run_hf():
        hf.generate(prompts, seeded)

    times = interleaved_times({"cpu_engine": run_hf, "vllm": run_vllm}, ROUNDS)
    benchmark.pedantic(run_vllm, rounds=1, iterations=1)
    med = {k: statistics.median(v) for k, v in times.items()}
    report = {
        **info,
        "batch": f"{BATCH} prompts x {PROMPT} tokens, {NEW} new tokens, seeded, vocab {engine.vocab_size}",
        "torch_threads": THREADS,
        **{f"{k}_s": round(v, 4) for k, v in med.items()},
        "vllm_speedup_vs_cpu_engine": round(med["cpu_engine"] / med["vllm"], 3),
        "all_s": rounded(times),
    }
    benchmark.extra_info.update(report)
    benchmark.extra_info["ratios"] = {
        "vllm_speedup_vs_cpu_engine": min(times["cpu_engine"]) / min(times["vllm"])
    }
    _save("vllm_vs_cpu_engine", report)
    print(json.dumps(report, indent=2))
