"""vLLM engines with several requests in flight against one request at a time (the vLLM CI stage).

Run (in the vLLM environment, ``scripts/ci_vllm.sh`` does): ``python -m pytest
bench/bench_vllm_inflight.py --benchmark-only -s`` with ``VLLM_ENABLE_V1_MULTIPROCESSING=0``.

The same engine serves 4 requests (a) one after another -- what a worker did when it held one request at
a time -- and (b) from 4 threads at once, as a worker's 4 slots do: the request pump
(:class:`gkd.services.vllm.RequestPump`) hands them to vLLM together, which batches them. Rounds are
interleaved so machine noise hits them alike. Ratios (higher is better): ``rollout_concurrent_over_serial``
(generated tokens/s) and ``teacher_concurrent_over_serial`` (scored tokens/s), medians over the rounds;
``rollout_unseeded_over_seeded``: the concurrent rollout without seeds over the same with a seed per
sequence (what ``rollout.seeded: true`` costs).

Model: a small Llama built from a config (vocab 2048, hidden 256, 4 layers, head_dim 32), float32, eager,
on vLLM's CPU backend; a rollout request is 2 prompts x 48 new tokens (unseeded, as vLLM runs by default),
a teacher request 4 sequences of 64 + 64 tokens at K = 16. Full-mode results go to
bench/results/vllm_inflight.json.
"""

from __future__ import annotations

import dataclasses
import os
import statistics
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from bench._common import QUICK, interleaved_times, record, rounded

pytest.importorskip("vllm")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

REQUESTS = 4
ROUNDS = int(os.environ.get("GKD_BENCH_ROUNDS", "2" if QUICK else "3"))
VOCAB, MAX_LEN = 2048, 512
NEW_TOKENS = 24 if QUICK else 48
PROMPT, RESPONSE, K = 64, 64, 16


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from transformers import LlamaForCausalLM

    from tests.tiny_llama import tiny_config

    torch.manual_seed(0)
    # no eos id: every answer runs to max_new_tokens, so each round generates the same number of tokens
    cfg = tiny_config(
        VOCAB, MAX_LEN, hidden=256, intermediate=512, layers=4, heads=8, kv_heads=4, eos_token_id=None
    )
    path = tmp_path_factory.mktemp("vllm-bench")
    LlamaForCausalLM(cfg).save_pretrained(path)
    return str(path)


def _requests(n_items: int, length: int, seed: int) -> list[list[list[int]]]:
    g = torch.Generator().manual_seed(seed)
    return [
        [torch.randint(0, VOCAB, (length,), generator=g).tolist() for _ in range(n_items)] for _ in range(4)
    ]


def _serial_and_concurrent(fn, requests, seeded_fn=None) -> dict[str, list[float]]:
    """Rounds of ``serial`` (one request after another), ``concurrent`` (all at once) and, with
    ``seeded_fn``, ``concurrent_seeded`` (the same with a seed per sequence)."""
    pool = ThreadPoolExecutor(REQUESTS)

    def run_all(f):
        return [done.result(timeout=600) for done in [pool.submit(f, r) for r in requests]]

    variants = {"serial": lambda: [fn(r) for r in requests], "concurrent": lambda: run_all(fn)}
    if seeded_fn is not None:
        variants["concurrent_seeded"] = lambda: run_all(seeded_fn)
    try:
        return interleaved_times(variants, ROUNDS)
    finally:
        pool.shutdown()


def _report(benchmark, name: str, times: dict[str, list[float]], tokens: int) -> None:
    med = {k: statistics.median(v) for k, v in times.items()}
    report = {
        "requests": REQUESTS,
        "tokens_per_round": tokens,
        "tokens_per_s": {k: round(tokens / v, 1) for k, v in med.items()},
        "all_s": rounded(times),
    }
    benchmark.extra_info.update(report)
    ratios = {f"{name}_concurrent_over_serial": med["serial"] / med["concurrent"]}
    if "concurrent_seeded" in med:  # what rollout.seeded costs: unseeded tokens/s over seeded
        ratios[f"{name}_unseeded_over_seeded"] = med["concurrent_seeded"] / med["concurrent"]
    benchmark.extra_info["ratios"] = ratios
    shown = {k: round(v, 2) for k, v in ratios.items()}
    print(f"\n{name}: {report['tokens_per_s']} tokens/s, ratios {shown}")
    if not QUICK:
        record("vllm_inflight", name, {**report, "ratios": benchmark.extra_info["ratios"]})


def test_rollout_tokens_per_s(benchmark, model_dir):
    from gkd.rollout.types import SamplingConfig
    from gkd.rollout.vllm_engine import VLLMRolloutEngine

    engine = VLLMRolloutEngine(model_dir, enforce_eager=True, max_model_len=MAX_LEN)
    sampling = SamplingConfig(max_new_tokens=NEW_TOKENS, temperature=1.0, stop_token_ids=())
    requests = _requests(2, 32, seed=1)
    try:
        seeded = dataclasses.replace(sampling, seed=0)
        times = _serial_and_concurrent(
            lambda prompts: engine.generate(prompts, sampling),
            requests,
            seeded_fn=lambda prompts: engine.generate(prompts, seeded),
        )
        benchmark.pedantic(engine.generate, args=(requests[0], sampling), rounds=1, iterations=1)
    finally:
        engine.close()
    assert engine.stop_ids == ()
    tokens = sum(len(r) for r in requests) * NEW_TOKENS  # no stop ids: every answer runs to the limit
    _report(benchmark, "rollout", times, tokens)


def test_teacher_tokens_per_s(benchmark, model_dir):
    from gkd.teacher.vllm_engine import VLLMTeacherEngine

    engine = VLLMTeacherEngine(model_dir, max_top_k=K, enforce_eager=True, max_len=MAX_LEN - 1)
    requests = [[(s[:PROMPT], s[PROMPT:]) for s in r] for r in _requests(4, PROMPT + RESPONSE, seed=2)]
    try:
        times = _serial_and_concurrent(lambda seqs: engine.score(seqs, K), requests)
        benchmark.pedantic(engine.score, args=(requests[0], K), rounds=1, iterations=1)
    finally:
        engine.close()
    _report(benchmark, "teacher", times, sum(len(r) for r in requests) * RESPONSE)
