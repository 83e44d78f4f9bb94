"""The CPU engine's decoding loop: the inverse-CDF sampler, rows finishing at different steps (and leaving
the batch), top ids of rows that left, the oneDNN-packed linears, cancellation and non-finite logits."""

import contextlib

import pytest
import torch

import gkd.rollout.hf_engine as hf_engine
from gkd.rollout.hf_engine import HFRolloutEngine, PackedLinears, inverse_cdf, sample_rows
from gkd.rollout.types import SamplingConfig
from tests.rollout.test_hf_engine import PROMPTS, _tiny


@pytest.fixture(scope="module")
def model():
    return _tiny()


def _flat_inverse_cdf(weights, uniforms):
    cdf = weights.double().cumsum(-1)
    return torch.searchsorted(cdf, uniforms[:, None] * cdf[:, -1:], right=True)[:, 0]


def test_inverse_cdf_matches_a_flat_float64_cumsum_and_skips_zero_weights():
    g = torch.Generator().manual_seed(0)
    v = 1000  # not a multiple of the block: the last block is padded
    weights = torch.rand(64, v, generator=g) ** 4
    weights[weights < 0.05] = 0.0  # zero runs, whole zero blocks included
    weights[:, :300] = 0.0
    weights[:, -1] = 0.0
    uniforms = torch.rand(64, generator=g, dtype=torch.float64)
    uniforms[0], uniforms[1] = 0.0, 1.0 - 2.0**-53  # the two ends
    tok, total = inverse_cdf(weights, uniforms)
    assert torch.equal(tok, _flat_inverse_cdf(weights, uniforms))
    assert (weights.gather(1, tok[:, None]) > 0).all()
    torch.testing.assert_close(total, weights.double().sum(-1))
    assert tok[0] == int((weights[0] > 0).nonzero()[0]) and tok[1] == int((weights[1] > 0).nonzero()[-1])


def test_inverse_cdf_frequencies_follow_the_weights():
    probs = torch.tensor([0.5, 0.0, 0.25, 0.125, 0.0, 0.125] + [0.0] * 300)
    n = 40000
    u = torch.rand(n, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    tok, _ = inverse_cdf(probs.expand(n, -1), u)
    freq = torch.bincount(tok, minlength=probs.numel()).double() / n
    torch.testing.assert_close(freq, probs.double(), atol=0.01, rtol=0)


@pytest.mark.parametrize("top_k, top_p", [(0, 1.0), (5, 1.0), (0, 0.7), (8, 0.5)])
def test_sample_rows_logprobs_and_filters(top_k, top_p):
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(16, 333, generator=g) * 3
    s = SamplingConfig(temperature=0.8, top_k=top_k, top_p=top_p)
    u = torch.rand(16, generator=g, dtype=torch.float64)
    tok, lp, lse = sample_rows(logits, s, u)
    ref = torch.log_softmax(logits / 0.8, -1)
    assert lp.dtype == torch.float32 and torch.isfinite(lse).all()
    torch.testing.assert_close(lp, ref.gather(1, tok[:, None])[:, 0], atol=1e-5, rtol=0)
    kept = torch.isfinite(hf_engine.filter_logits(logits / 0.8, top_k, top_p))
    assert kept.gather(1, tok[:, None]).all()


def _greedy_cut(greedy, stops):
    """The greedy continuations cut after their first stop token (and whether one was hit)."""
    out = []
    for g in greedy:
        hits = [j for j, t in enumerate(g.response_ids) if t in stops]
        out.append((g.response_ids[: hits[0] + 1], True) if hits else (g.response_ids, False))
    return out


def test_rows_finishing_at_different_steps_leave_the_batch(model):
    engine = HFRolloutEngine(model)
    prompts = PROMPTS + [[11, 12], [13], [200, 201, 202]]
    greedy = engine.generate(prompts, SamplingConfig(max_new_tokens=12, temperature=0, return_topk=4))
    # one stop token from each of the first rows, at different depths: rows end at different steps, the
    # batch is compacted once half of it has finished, and the rest go on
    stops = tuple({g.response_ids[j] for g, j in zip(greedy[:4], (1, 3, 6, 11), strict=True)})
    s = SamplingConfig(max_new_tokens=12, temperature=0, stop_token_ids=stops, return_topk=4)
    out = engine.generate(prompts, s)
    want = _greedy_cut(greedy, stops)
    lengths = {len(o.response_ids) for o in out}
    assert len(lengths) > 2  # really at different steps
    for o, g, (ids, hit) in zip(out, greedy, want, strict=True):
        assert o.response_ids == ids
        assert o.finish_reason == ("stop" if hit else "length")
        r = len(ids)
        assert o.response_logprobs.shape == (r,) and o.topk_ids.shape == (r, 4)
        torch.testing.assert_close(o.response_logprobs, g.response_logprobs[:r], atol=1e-5, rtol=0)
        # top ids of the logits each row sampled from, also after other rows left the batch
        full = torch.tensor([o.prompt_ids + o.response_ids])
        with torch.no_grad():
            logits = model(full).logits[0, len(o.prompt_ids) - 1 : -1]
        torch.testing.assert_close(
            logits.gather(1, o.topk_ids.long()), logits.topk(4, -1).values, atol=1e-4, rtol=0
        )


def test_seeded_rows_do_not_depend_on_which_rows_left_the_batch(model):
    engine = HFRolloutEngine(model)
    s0 = SamplingConfig(max_new_tokens=10, temperature=1.0, seed=5)
    first = engine.generate(PROMPTS, s0)
    stops = (first[0].response_ids[1], first[2].response_ids[4])
    s = SamplingConfig(max_new_tokens=10, temperature=1.0, seed=5, stop_token_ids=stops)
    together = engine.generate(PROMPTS, s)
    alone = [engine.generate([p], s, seed_offset=i)[0] for i, p in enumerate(PROMPTS)]
    for t, a, f in zip(together, alone, first, strict=True):
        assert t.response_ids == a.response_ids
        assert t.finish_reason == a.finish_reason
        hits = [j for j, tok in enumerate(f.response_ids) if tok in stops]
        assert t.response_ids == (f.response_ids[: hits[0] + 1] if hits else f.response_ids)
    assert {len(t.response_ids) for t in together} != {10}


@pytest.mark.skipif(not PackedLinears.available(), reason="oneDNN linear ops unavailable in this torch")
def test_packed_linears_match_the_model_and_follow_weight_updates(model, monkeypatch):
    monkeypatch.setattr(hf_engine, "PACK_MIN_NUMEL", 0)  # the tiny model's layers are all small
    engine = HFRolloutEngine(_tiny(seed=1), prepack=True, fused=False)  # the transformers path
    plain = HFRolloutEngine(model, prepack=False, fused=False)
    assert len(engine.linears.modules) == 2 * 7 + 1
    engine.load_weights(plain.parameters_spec().items(), version=1)
    s = SamplingConfig(max_new_tokens=8, temperature=1.0, seed=3)
    for a, b in zip(engine.generate(PROMPTS, s), plain.generate(PROMPTS, s), strict=True):
        assert a.response_ids == b.response_ids
        torch.testing.assert_close(a.response_logprobs, b.response_logprobs, atol=2e-5, rtol=0)
    assert len(engine.linears._packed) == 15  # packed on first use (4 rows: inside PACKED_ROWS)
    assert all("forward" not in m.__dict__ for m in engine.linears.modules)  # restored after generate
    other = _tiny(seed=2)  # new weights: every packed copy is remade from them
    engine.load_weights(other.named_parameters(), version=2)
    want = HFRolloutEngine(other, prepack=False, fused=False).generate(PROMPTS, s)
    for a, b in zip(engine.generate(PROMPTS, s), want, strict=True):
        assert a.response_ids == b.response_ids
        torch.testing.assert_close(a.response_logprobs, b.response_logprobs, atol=2e-5, rtol=0)
    with torch.no_grad():  # an in-place update outside load_weights: the version counters move
        for m in engine.linears.modules:
            m.weight.mul_(1.5)
    want = HFRolloutEngine(engine.model, prepack=False, fused=False).generate(PROMPTS, s)
    for a, b in zip(engine.generate(PROMPTS, s), want, strict=True):
        torch.testing.assert_close(a.response_logprobs, b.response_logprobs, atol=2e-5, rtol=0)


def test_cancellation_is_checked_every_step(model, monkeypatch):
    calls = []

    class Withdrawn(Exception):
        pass

    def check():
        calls.append(1)
        if len(calls) == 3:
            raise Withdrawn

    monkeypatch.setattr(hf_engine, "check_cancelled", check)
    with pytest.raises(Withdrawn):
        HFRolloutEngine(model).generate(PROMPTS, SamplingConfig(max_new_tokens=12, seed=1))
    assert len(calls) == 3


def test_non_finite_logits_are_an_error():
    broken = _tiny(seed=3)
    with torch.no_grad():
        broken.lm_head.weight[0, 0] = float("nan")
    with pytest.raises(RuntimeError, match="non-finite logits"):
        HFRolloutEngine(broken).generate(PROMPTS, SamplingConfig(max_new_tokens=3, seed=1))


def test_decode_steps_hand_grouped_kv_heads_to_sdpa(model, monkeypatch):
    assert model.config._attn_implementation == "sdpa" and model.config.num_key_value_heads == 1
    seen = []
    inner = hf_engine.sdpa_gqa_decode

    def spy(module, query, key, *args, **kwargs):
        seen.append((query.shape[1], key.shape[1], query.shape[2]))
        return inner(module, query, key, *args, **kwargs)

    monkeypatch.setattr(hf_engine, "sdpa_gqa_decode", spy)
    s = SamplingConfig(max_new_tokens=5, temperature=0)
    got = HFRolloutEngine(model, fused=False).generate(PROMPTS, s)  # the transformers path
    assert model.config._attn_implementation == "sdpa"  # restored
    layers = model.config.num_hidden_layers
    assert len(seen) == 5 * layers and {q for q, _, _ in seen} == {2} and {k for _, k, _ in seen} == {1}
    assert sum(n == 1 for _, _, n in seen) == 4 * layers  # every decode step (the prompt pass delegates)
    monkeypatch.setattr(hf_engine, "gqa_decode_attention", lambda m: contextlib.nullcontext())
    want = HFRolloutEngine(model, fused=False).generate(
        PROMPTS, s
    )  # transformers' own sdpa (KV heads repeated)
    for a, b in zip(got, want, strict=True):
        assert a.response_ids == b.response_ids
        torch.testing.assert_close(a.response_logprobs, b.response_logprobs, atol=1e-6, rtol=0)


def test_reserved_cache_layers_match_dynamic_layers():
    from transformers.cache_utils import DynamicLayer

    g = torch.Generator().manual_seed(4)
    ref, got = DynamicLayer(), hf_engine.reserved_layer_class()(capacity=5)
    steps = [4, 1, "select", 1, 1, 3]  # a prompt, decode steps, a batch reselection, an overflow past 5
    for step in steps:
        if step == "select":
            keep = torch.tensor([0, 2])
            ref.batch_select_indices(keep)
            got.batch_select_indices(keep)
            continue
        rows = ref.keys.shape[0] if ref.is_initialized and ref.keys.numel() else 3
        k, v = torch.randn(rows, 2, step, 8, generator=g), torch.randn(rows, 2, step, 6, generator=g)
        want_k, want_v = ref.update(k, v)
        got_k, got_v = got.update(k.clone(), v.clone())
        assert torch.equal(got_k, want_k) and torch.equal(got_v, want_v)
        assert got.get_seq_length() == ref.get_seq_length()
    assert got._buffers[0].shape[-2] == 10  # moved to larger buffers past its capacity
