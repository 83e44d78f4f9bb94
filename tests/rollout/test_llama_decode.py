"""The fused Llama decode steps (gkd/rollout/llama_decode.py) against the transformers forward: the same
tokens and log-probs for Llama, Qwen2 and Qwen3 (query/key norms) models, padded batches, rows leaving the
batch (down to the unpacked few-row path), biases, weight updates, bfloat16, and the models it refuses."""

import logging

import pytest
import torch

from gkd.rollout.hf_engine import HFRolloutEngine
from gkd.rollout.llama_decode import (
    NO_BF16_PACKING_ENV,
    packing_available,
    packing_unsupported,
    unsupported_reason,
)
from gkd.rollout.types import SamplingConfig
from tests.tiny_llama import tiny_config, tiny_llama

PROMPTS = [[5, 9, 17, 30], [3], [40, 41, 42, 43, 44, 45, 46], [7, 7], [100, 101, 102], [8, 9, 10, 11, 12]]
needs_packing = pytest.mark.skipif(
    not packing_available(), reason="oneDNN linear ops unavailable in this torch"
)


def _qwen2(seed: int):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen2Config(
        vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True,
    )  # fmt: skip
    return Qwen2ForCausalLM(cfg).eval()


def _qwen3(seed: int):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen3Config(
        vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=256, tie_word_embeddings=True,
    )  # fmt: skip
    model = Qwen3ForCausalLM(cfg).eval()
    with torch.no_grad():  # non-trivial query/key norm weights
        for layer in model.model.layers:
            layer.self_attn.q_norm.weight.uniform_(0.5, 1.5)
            layer.self_attn.k_norm.weight.uniform_(0.5, 1.5)
    return model


def _assert_same(fused, plain, atol=2e-5):
    for a, b in zip(fused, plain, strict=True):
        assert a.response_ids == b.response_ids
        assert a.finish_reason == b.finish_reason
        torch.testing.assert_close(a.response_logprobs, b.response_logprobs, atol=atol, rtol=0)


def _stops_from(engine, s):
    """Two tokens the batch samples early, so that rows stop at different steps and leave the batch."""
    first = engine.generate(PROMPTS, s)
    return (first[0].response_ids[1], first[2].response_ids[3], first[4].response_ids[2])


@pytest.mark.parametrize("prepack", [pytest.param(True, marks=needs_packing), False])
@pytest.mark.parametrize(
    "make",
    [
        lambda: tiny_llama(0, 320, 256, heads=4, kv_heads=2),
        lambda: tiny_llama(1, 320, 256, heads=4, kv_heads=4, tie=True, attention_bias=True),
        lambda: _qwen2(2),
        lambda: _qwen3(3),
    ],
    ids=["llama_gqa", "llama_bias_mha", "qwen2", "qwen3"],
)
def test_fused_steps_match_the_transformers_forward(make, prepack):
    model = make()
    fused = HFRolloutEngine(model, prepack=prepack)
    plain = HFRolloutEngine(model, prepack=False, fused=False)
    assert fused.fused and (fused.fused_weights is not None) == prepack
    s = SamplingConfig(max_new_tokens=10, temperature=1.0, seed=4)
    _assert_same(fused.generate(PROMPTS, s), plain.generate(PROMPTS, s))
    s = SamplingConfig(max_new_tokens=10, temperature=1.0, seed=4, stop_token_ids=_stops_from(plain, s))
    out = fused.generate(PROMPTS, s)
    assert len({len(x.response_ids) for x in out}) > 2  # rows left the batch at different steps
    _assert_same(out, plain.generate(PROMPTS, s))
    greedy = SamplingConfig(max_new_tokens=6, temperature=0.0)
    _assert_same(fused.generate([[5, 6, 7]] * 4, greedy), plain.generate([[5, 6, 7]] * 4, greedy))  # unpadded


@needs_packing
def test_fused_weights_follow_loads_and_in_place_updates():
    engine = HFRolloutEngine(tiny_llama(0, 320, 256, heads=4, kv_heads=2))
    s = SamplingConfig(max_new_tokens=8, temperature=1.0, seed=3)
    engine.generate(PROMPTS, s)  # builds the packed copies
    other = tiny_llama(5, 320, 256, heads=4, kv_heads=2)
    engine.load_weights(other.named_parameters(), version=1)
    _assert_same(engine.generate(PROMPTS, s), HFRolloutEngine(other, fused=False).generate(PROMPTS, s))
    with torch.no_grad():  # outside load_weights: the version counters move
        engine.model.model.layers[1].mlp.up_proj.weight.mul_(3.0)
        engine.model.lm_head.weight.mul_(2.0)
    want = HFRolloutEngine(engine.model, prepack=False, fused=False).generate(PROMPTS, s)
    _assert_same(engine.generate(PROMPTS, s), want)


def _bfloat16_close(fused, plain):
    s = SamplingConfig(max_new_tokens=1, temperature=1.0, seed=1)
    _assert_same(fused.generate(PROMPTS, s), plain.generate(PROMPTS, s), atol=2e-2)
    s = SamplingConfig(max_new_tokens=2, temperature=0.0)
    for a, b in zip(fused.generate(PROMPTS, s), plain.generate(PROMPTS, s), strict=True):
        if a.response_ids[0] == b.response_ids[0]:  # the decode step proper (greedy ties may differ)
            torch.testing.assert_close(a.response_logprobs, b.response_logprobs, atol=5e-2, rtol=0)


def test_bfloat16_fused_steps_stay_close_to_the_transformers_forward():
    """Packed where this CPU's oneDNN packs bfloat16, the unpacked fused steps elsewhere (AVX2-only)."""
    model = tiny_llama(0, 320, 256, heads=4, kv_heads=2).to(torch.bfloat16)
    fused, plain = HFRolloutEngine(model), HFRolloutEngine(model, fused=False)
    assert fused.fused
    assert (fused.fused_weights is not None) == (packing_unsupported(torch.bfloat16) is None)
    _bfloat16_close(fused, plain)


def test_a_cpu_without_bfloat16_packing_runs_unpacked_with_one_log_line(monkeypatch, caplog):
    monkeypatch.setenv(NO_BF16_PACKING_ENV, "1")  # this CPU as an AVX2-only one
    model = tiny_llama(0, 320, 256, heads=4, kv_heads=2).to(torch.bfloat16)
    with caplog.at_level(logging.INFO, logger="gkd.rollout"):
        fused = HFRolloutEngine(model, prepack=True)  # asked for, refused: no crash
    assert fused.fused and fused.fused_weights is None
    lines = [r.getMessage() for r in caplog.records if "unpacked" in r.getMessage()]
    assert len(lines) == 1 and f"{NO_BF16_PACKING_ENV}=1" in lines[0]
    _bfloat16_close(fused, HFRolloutEngine(model, fused=False))
    f32 = HFRolloutEngine(tiny_llama(0, 320, 256, heads=4, kv_heads=2))  # float32 packs on any x86-64
    assert (f32.fused_weights is not None) == packing_available()


def test_bfloat16_packing_follows_the_cpu_flags(monkeypatch):
    monkeypatch.delenv(NO_BF16_PACKING_ENV, raising=False)
    if not packing_available():
        pytest.skip("oneDNN linear ops unavailable in this torch")
    avx2 = frozenset({"sse4_1", "avx", "avx2", "fma"})
    assert "AVX-512" in packing_unsupported(torch.bfloat16, avx2)
    assert packing_unsupported(torch.float32, avx2) is None
    assert packing_unsupported(torch.bfloat16, avx2 | {"avx512bw", "avx512vl", "avx512dq"}) is None
    assert packing_unsupported(torch.bfloat16, avx2 | {"avx_ne_convert"}) is None
    assert packing_unsupported(torch.bfloat16, avx2 | {"avx512bw", "avx512vl"}) is not None
    assert packing_unsupported(torch.float16, avx2) is not None


def test_other_models_run_through_transformers():
    from transformers import LlamaForCausalLM

    gelu = LlamaForCausalLM(tiny_config(320, 256, hidden_act="gelu")).eval()
    assert "hidden_act" in unsupported_reason(gelu)
    engine = HFRolloutEngine(gelu)
    assert not engine.fused
    assert len(engine.generate(PROMPTS, SamplingConfig(max_new_tokens=3, seed=1))) == len(PROMPTS)
    with pytest.raises(ValueError, match="fused=True.*hidden_act"):
        HFRolloutEngine(gelu, fused=True)
    assert unsupported_reason(tiny_llama(0, 320, 256)) is None
    from transformers import Qwen3Config, Qwen3ForCausalLM

    cfg = Qwen3Config(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, use_sliding_window=True, sliding_window=8,
                      max_window_layers=0)  # fmt: skip
    assert "sliding" in unsupported_reason(Qwen3ForCausalLM(cfg))
