"""CPU/transformers rollout engine on a tiny model built from a config."""

import pytest
import torch

from gkd.rollout.hf_engine import HFRolloutEngine, filter_logits
from gkd.rollout.types import SamplingConfig
from tests.rollout.conftest import response_logits
from tests.tiny_llama import tiny_llama


def _tiny(seed=0):
    return tiny_llama(seed, 320, 256)


@pytest.fixture(scope="module")
def model():
    return _tiny()


PROMPTS = [[5, 9, 17], [3], [40, 41, 42, 43, 44, 45, 46], [7, 7]]


def test_greedy_matches_transformers_generate_and_batching(model):
    engine = HFRolloutEngine(model)
    s = SamplingConfig(max_new_tokens=12, temperature=0)
    batched = engine.generate(PROMPTS, s)
    for p, sample in zip(PROMPTS, batched, strict=True):
        ref = model.generate(torch.tensor([p]), max_new_tokens=12, do_sample=False, pad_token_id=0)[
            0, len(p) :
        ]
        assert sample.response_ids == ref.tolist()
        assert sample.finish_reason == "length" and len(sample.response_ids) == 12
        alone = engine.generate([p], s)[0]  # left padding does not change a row
        assert alone.response_ids == sample.response_ids


@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_logprobs_equal_forward_pass(model, temperature):
    engine = HFRolloutEngine(model)
    s = SamplingConfig(max_new_tokens=10, temperature=temperature, top_k=50, top_p=0.9, seed=3)
    for sample in engine.generate(PROMPTS, s):
        logits = response_logits(model, sample) / temperature
        ref = torch.log_softmax(logits, -1).gather(1, torch.tensor(sample.response_ids)[:, None])[:, 0]
        torch.testing.assert_close(sample.response_logprobs, ref, atol=2e-5, rtol=1e-5)


def test_seeded_sampling_is_reproducible_and_independent_of_batching(model):
    engine = HFRolloutEngine(model)
    s = SamplingConfig(max_new_tokens=8, temperature=1.0, seed=11)
    a = [x.response_ids for x in engine.generate(PROMPTS, s)]
    b = [x.response_ids for x in engine.generate(PROMPTS, s)]
    assert a == b
    split = [x.response_ids for x in engine.generate(PROMPTS[:2], s)]
    split += [x.response_ids for x in engine.generate(PROMPTS[2:], s, seed_offset=2)]
    assert split == a
    other = [x.response_ids for x in engine.generate(PROMPTS, SamplingConfig(max_new_tokens=8, seed=12))]
    assert other != a


def test_stop_tokens_end_a_row_and_are_kept(model):
    engine = HFRolloutEngine(model)
    greedy = engine.generate(PROMPTS, SamplingConfig(max_new_tokens=12, temperature=0))
    stop_tok = greedy[0].response_ids[3]
    out = engine.generate(
        PROMPTS, SamplingConfig(max_new_tokens=12, temperature=0, stop_token_ids=(stop_tok,))
    )
    first = greedy[0].response_ids.index(stop_tok)
    assert out[0].response_ids == greedy[0].response_ids[: first + 1] and out[0].finish_reason == "stop"
    for g, o in zip(greedy[1:], out[1:], strict=True):  # other rows are unaffected by a row leaving
        cut = g.response_ids.index(stop_tok) + 1 if stop_tok in g.response_ids else len(g.response_ids)
        assert o.response_ids == g.response_ids[:cut]


def test_top_k_and_top_p_filters():
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0, -1.0]])
    assert torch.isinf(filter_logits(logits, 2, 1.0)[0, 2:]).all()
    probs = logits.softmax(-1)[0]
    kept = filter_logits(logits, 0, float(probs[0] + probs[1]) - 1e-4)
    assert torch.isfinite(kept[0, :2]).all() and torch.isinf(kept[0, 2:]).all()
    assert torch.isfinite(filter_logits(logits, 0, 1e-9)[0, 0])  # the top token always survives


def test_load_weights_is_strict_and_sets_the_version(model):
    engine = HFRolloutEngine(_tiny(seed=1))
    state = {k: v.detach().clone() for k, v in model.named_parameters()}
    assert engine.load_weights(state.items(), version=5) == len(state)
    assert engine.policy_version == 5
    s = SamplingConfig(max_new_tokens=6, temperature=0)
    assert [x.response_ids for x in engine.generate(PROMPTS, s)] == [
        x.response_ids for x in HFRolloutEngine(model).generate(PROMPTS, s)
    ]
    assert all(x.policy_version == 5 for x in engine.generate(PROMPTS, s))
    bad = dict(state)
    name = next(iter(bad))
    bad.pop(name)
    bad["extra.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match=rf"missing \['{name}'\]; unexpected \['extra.weight'\]"):
        engine.load_weights(bad.items())
    wrong = dict(state)
    wrong[name] = torch.zeros(3)
    with pytest.raises(ValueError, match="shape mismatches"):
        engine.load_weights(wrong.items())
    assert engine.policy_version == 5


def test_bad_prompts_and_sampling_are_rejected(model):
    engine = HFRolloutEngine(model)
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        engine.generate([[1], []], SamplingConfig())
    with pytest.raises(ValueError, match=r"prompt 0: token id 999 is outside the vocabulary \[0, 320\)"):
        engine.generate([[999]], SamplingConfig())
    with pytest.raises(ValueError, match="top_p=0"):
        SamplingConfig(top_p=0)
