"""The static-cache decode steps (gkd/rollout/static_decode.py) on CPU, where they run eagerly: the same
tokens and log-probs as the growing-cache path, across batches that reuse one set of buffers, and after
weights are loaded in place. The CUDA graph capture and replay run on a GPU only (scripts/gpu_check.sh)."""

import pytest
import torch

from gkd.rollout import static_decode
from gkd.rollout.hf_engine import HFRolloutEngine
from gkd.rollout.static_decode import StaticStepsCache, bucket_capacity, static_cache_default
from gkd.rollout.types import SamplingConfig
from tests.rollout.test_llama_decode import PROMPTS, _assert_same, _qwen2, _qwen3, _stops_from
from tests.tiny_llama import tiny_llama

MODELS = [
    lambda: tiny_llama(0, 320, 256, heads=4, kv_heads=2),
    lambda: tiny_llama(1, 320, 256, heads=4, kv_heads=4, tie=True, attention_bias=True),
    lambda: _qwen2(2),
    lambda: _qwen3(3),
]


def _pair(model):
    static = HFRolloutEngine(model, prepack=False, static_cache=True)
    eager = HFRolloutEngine(model, prepack=False, static_cache=False)
    assert static.static_steps is not None and eager.static_steps is None
    return static, eager


@pytest.mark.parametrize("make", MODELS, ids=["llama_gqa", "llama_bias_mha", "qwen2", "qwen3"])
def test_static_steps_give_the_growing_cache_path_s_tokens_and_log_probs(make):
    static, eager = _pair(make())
    greedy = SamplingConfig(max_new_tokens=12, temperature=0.0)
    _assert_same(static.generate(PROMPTS, greedy), eager.generate(PROMPTS, greedy))
    s = SamplingConfig(max_new_tokens=10, temperature=1.0, seed=4)
    _assert_same(static.generate(PROMPTS, s), eager.generate(PROMPTS, s))
    # rows stop at different steps: the eager path drops them, the static one keeps decoding them
    s = SamplingConfig(max_new_tokens=10, temperature=1.0, seed=4, stop_token_ids=_stops_from(eager, s))
    out = static.generate(PROMPTS, s)
    assert len({len(x.response_ids) for x in out}) > 2
    _assert_same(out, eager.generate(PROMPTS, s))
    assert len(static.static_steps) == 1  # one (batch, capacity) shape: its buffers were reused


def test_a_later_batch_of_the_same_shape_reuses_the_buffers_without_reading_the_last_one_s_positions():
    static, eager = _pair(tiny_llama(0, 320, 256, heads=4, kv_heads=2))
    s = SamplingConfig(max_new_tokens=20, temperature=1.0, seed=9)
    long = [[p % 300 + 3 for p in range(i, i + 30)] for i in range(4)]
    short = [[11, 12], [13], [14, 15, 16], [17]]  # same bucket (4 rows, 64 positions), shorter prompts
    static.generate(long, s)
    steps = static.static_steps.get(4, 2 + 20)
    assert steps.capacity == 64 and steps.keys[0][:, :, 40].abs().sum() > 0  # the long batch's keys stay
    _assert_same(static.generate(short, s), eager.generate(short, s))
    assert len(static.static_steps) == 1


def test_static_steps_read_weights_loaded_in_place():
    model = tiny_llama(0, 320, 256, heads=4, kv_heads=2)
    static = HFRolloutEngine(model, prepack=False, static_cache=True)
    s = SamplingConfig(max_new_tokens=8, temperature=1.0, seed=3)
    before = static.generate(PROMPTS, s)
    other = tiny_llama(5, 320, 256, heads=4, kv_heads=2)
    static.load_weights(other.named_parameters(), version=1)
    after = static.generate(PROMPTS, s)
    _assert_same(after, HFRolloutEngine(other, prepack=False, static_cache=False).generate(PROMPTS, s))
    assert [x.response_ids for x in after] != [x.response_ids for x in before]


def test_bfloat16_static_steps_stay_close():
    model = tiny_llama(0, 320, 256, heads=4, kv_heads=2).to(torch.bfloat16)
    static, eager = _pair(model)
    s = SamplingConfig(max_new_tokens=4, temperature=0.0)
    for a, b in zip(static.generate(PROMPTS, s), eager.generate(PROMPTS, s), strict=True):
        agree = 0
        while agree < len(a.response_ids) and a.response_ids[agree] == b.response_ids[agree]:
            agree += 1
        assert agree >= 1  # greedy ties in bfloat16 may split later tokens, never the first
        torch.testing.assert_close(
            a.response_logprobs[:agree], b.response_logprobs[:agree], atol=5e-2, rtol=0
        )


def test_the_cache_keys_shapes_by_bucketed_capacity_and_keeps_the_most_recent(monkeypatch):
    monkeypatch.setattr(static_decode, "MAX_GRAPHS", 2)
    cache = StaticStepsCache(tiny_llama(0, 320, 256, heads=4, kv_heads=2))
    a = cache.get(3, 10)
    assert cache.get(3, 64) is a and a.capacity == bucket_capacity(10) == 64
    b = cache.get(3, 65)
    assert b is not a and b.capacity == 128
    cache.get(2, 10)  # a third shape pushes out the least recently used one (a)
    assert len(cache) == 2 and cache.get(3, 10) is not a and cache.get(2, 10) is not None


def test_the_default_follows_the_device_and_the_switch(monkeypatch):
    monkeypatch.delenv(static_decode.STATIC_CACHE_ENV, raising=False)
    assert static_cache_default(torch.device("cuda", 0))
    assert not static_cache_default(torch.device("cpu"))
    monkeypatch.setenv(static_decode.STATIC_CACHE_ENV, "0")
    assert not static_cache_default(torch.device("cuda", 0))
    assert HFRolloutEngine(tiny_llama(0, 320, 256)).static_steps is None  # CPU: off unless asked


def test_static_cache_needs_the_fused_steps():
    with pytest.raises(ValueError, match="static_cache=True needs the fused decode steps"):
        HFRolloutEngine(tiny_llama(0, 320, 256), fused=False, static_cache=True)


def test_a_prompt_pass_that_does_not_fit_the_buffers_is_refused():
    from transformers import DynamicCache

    cache = StaticStepsCache(tiny_llama(0, 320, 256, heads=4, kv_heads=2))
    steps = cache.get(2, 10)
    dc = DynamicCache()
    k = torch.zeros(3, 2, 5, 16)
    for i in range(2):
        dc.update(k, k, i)
    with pytest.raises(ValueError, match="2 rows x 64 positions got a prompt pass of"):
        steps.start(dc, torch.ones(3, 5, dtype=torch.long))


class _FakeStream:
    def wait_stream(self, other):
        pass


def test_a_failed_capture_leaves_one_warning_and_the_steps_run_eagerly(monkeypatch, caplog):
    """The capture path on CPU with CUDA's stream calls stubbed: the two warm-up steps run for real and
    are undone, the capture itself fails as CUDA refuses an operation; the answers are the eager ones."""
    import contextlib

    def refuse(*args, **kwargs):
        raise RuntimeError("operation not permitted when stream is capturing\nmore")

    monkeypatch.setattr(torch.cuda, "device", lambda d: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "Stream", _FakeStream)
    monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "current_stream", lambda: _FakeStream())
    monkeypatch.setattr(torch.cuda, "CUDAGraph", lambda: object())
    monkeypatch.setattr(torch.cuda, "graph", refuse)
    model = tiny_llama(0, 320, 256, heads=4, kv_heads=2)
    static = HFRolloutEngine(model, prepack=False, static_cache=True)
    static.static_steps.graphs = True  # as on a GPU
    eager = HFRolloutEngine(model, prepack=False, static_cache=False)
    s = SamplingConfig(max_new_tokens=8, temperature=1.0, seed=5)
    with caplog.at_level("WARNING", logger="gkd.rollout"):
        _assert_same(static.generate(PROMPTS, s), eager.generate(PROMPTS, s))
    (steps,) = static.static_steps._steps.values()
    assert steps.graph is None and not steps.graphs
    assert steps.capture_error == "operation not permitted when stream is capturing"
    assert [r.message.count("CUDA graph capture failed") for r in caplog.records] == [1]
