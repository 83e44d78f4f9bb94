"""Generation in ``HFRolloutEngine`` against its weight-streaming bound, and against ``model.generate``.

Run: ``.venv/bin/python -m pytest bench/bench_generation.py --benchmark-only -s`` (``GKD_BENCH_QUICK=1``:
small shapes). Results also go to bench/results/generation.json.

The engine runs this Llama through its fused decode steps (``gkd/rollout/llama_decode.py``); ``HFRolloutEngine
(model, fused=False)`` would measure the transformers path instead.

Model: the demo student's shape (SmolLM2-135M-Instruct keeping 16 of its 30 layers: vocab 49152, hidden
576, 9 heads / 3 KV heads, tied embeddings, ~85 M parameters, float32), random weights from the config (no
download); quick mode keeps 4 layers. ``GKD_BENCH_THREADS`` intra-op threads (default 1, what the demo's
rollout worker gets). Batch: 8 prompts of 34-40 tokens (the demo's chat-templated prompt lengths), 32 new
tokens each (quick: 16), temperature 1, seeded, no stop token (every row decodes every step).

The bound: every forward pass (the prompt pass and each decode step, ``max_new_tokens`` in all) reads every
parameter once, so the time to stream them is ``param_bytes x max_new_tokens / bandwidth``. The bandwidth is
a ``copy_`` of a 256 MiB tensor measured in the same run (best of 5) counted as bytes moved, i.e. read +
written (2 x 256 MiB per copy, STREAM's convention: a copy is a read stream plus a write stream, the weights
are one read stream). The prompt pass is compute-bound (~37 tokens x 8 rows through every matrix), and the
bound does not include it beyond one weight read, so no implementation reaches 1.0; ``extra_info`` also
holds the prompt pass's time alone and the decode steps' fraction (``decode_fraction_of_bound``).

Ratios (``extra_info["ratios"]``, higher is better):
- ``generation/fraction_of_bound``: bound time / the engine's median generate time.
- ``generation/vs_hf_generate``: ``model.generate`` (do_sample, the sampled tokens' log-probs from
  ``compute_transition_scores``, as the engine returns them) median time / the engine's; rounds interleaved.
"""

from __future__ import annotations

import json
import os
import statistics
import time

import pytest
import torch

from bench._common import QUICK, interleaved_times, record, rounded
from gkd.rollout.hf_engine import HFRolloutEngine
from gkd.rollout.types import SamplingConfig
from tests.tiny_llama import tiny_llama

THREADS = int(os.environ.get("GKD_BENCH_THREADS", "1"))
LAYERS = 4 if QUICK else 16
NEW = 16 if QUICK else 32
ROUNDS = 2 if QUICK else 3
BATCH = 8
COPY_BYTES = 256 << 20
# model.generate with the engine's settings; the scores give the sampled tokens' log-probs (as the engine)
HF_SAMPLING = dict(
    do_sample=True, temperature=1.0, top_k=0, top_p=1.0, output_scores=True, return_dict_in_generate=True
)


def demo_student_shape(layers: int):
    """SmolLM2-135M-Instruct's config (the demo's teacher) with ``layers`` decoder layers, random weights."""
    model = tiny_llama(
        0, 49152, 8192, hidden=576, intermediate=1536, layers=layers, heads=9, kv_heads=3, tie=True,
        head_dim=64, rope_theta=100000.0, rms_norm_eps=1e-5,
    )  # fmt: skip
    model.generation_config.eos_token_id = None  # model.generate decodes exactly NEW tokens per row too
    model.generation_config.pad_token_id = 0
    return model


def copy_bandwidth(nbytes: int = COPY_BYTES, rounds: int = 5) -> float:
    """Bytes moved per second (read + written) by the best of ``rounds`` copies of an ``nbytes`` tensor."""
    src = torch.ones(nbytes // 4)
    dst = torch.empty_like(src)
    dst.copy_(src)  # first touch of the destination's pages outside the timing
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - start)
    return 2 * nbytes / best


@pytest.fixture(scope="module")
def model():
    torch.set_num_threads(THREADS)
    return demo_student_shape(LAYERS)


def test_generation_vs_weight_streaming_bound(benchmark, model):
    engine = HFRolloutEngine(model, max_batch_size=BATCH)
    g = torch.Generator().manual_seed(1)
    lens = torch.randint(34, 41, (BATCH,), generator=g).tolist()
    prompts = [torch.randint(3, engine.vocab_size, (n,), generator=g).tolist() for n in lens]
    sampling = SamplingConfig(max_new_tokens=NEW, temperature=1.0, seed=7)
    width = max(lens)
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    attn = (torch.arange(width)[None, :] >= width - torch.tensor(lens)[:, None]).long()

    def run_engine():
        samples = engine.generate(prompts, sampling)
        assert all(len(s.response_ids) == NEW for s in samples)

    @torch.inference_mode()
    def run_hf_generate():
        out = model.generate(ids, attention_mask=attn, max_new_tokens=NEW, **HF_SAMPLING)
        logprobs = model.compute_transition_scores(out.sequences, out.scores, normalize_logits=True)
        assert logprobs.shape == (BATCH, NEW)

    @torch.inference_mode()
    def run_prompt_pass():  # the engine's first forward, alone: the compute-bound part the bound leaves out
        model(input_ids=ids, attention_mask=attn, logits_to_keep=1)

    variants = {"engine": run_engine, "hf_generate": run_hf_generate, "prompt_pass": run_prompt_pass}
    times = interleaved_times(variants, ROUNDS)
    bandwidth = copy_bandwidth()
    benchmark.pedantic(run_engine, rounds=1, iterations=1)

    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())  # tied weights once
    bound_s = param_bytes * NEW / bandwidth
    med = {k: statistics.median(v) for k, v in times.items()}
    ratios = {
        "generation/fraction_of_bound": bound_s / med["engine"],
        "generation/vs_hf_generate": med["hf_generate"] / med["engine"],
    }
    report = {
        "shape": f"{BATCH} prompts x {min(lens)}-{max(lens)} tokens, {NEW} new tokens, {LAYERS} layers, "
        f"vocab {engine.vocab_size}, float32",
        "quick": QUICK,
        "torch_threads": THREADS,
        "rounds": ROUNDS,
        "param_bytes": param_bytes,
        "copy_GBps_moved": round(bandwidth / 1e9, 2),
        "bound_s": round(bound_s, 4),
        # the decode steps alone: (NEW - 1) weight reads over the engine's time less its prompt pass
        "decode_fraction_of_bound": round(
            param_bytes * (NEW - 1) / bandwidth / (med["engine"] - med["prompt_pass"]), 4
        ),
        **{f"{k}_s": round(v, 4) for k, v in med.items()},
        "all_s": rounded(times),
        "ratios": {k: round(v, 4) for k, v in ratios.items()},
    }
    benchmark.extra_info.update(report)
    benchmark.extra_info["ratios"] = ratios
    record("generation", "quick" if QUICK else "full", report)
    print(json.dumps(report, indent=2))
