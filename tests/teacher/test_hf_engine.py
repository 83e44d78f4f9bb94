"""The transformers teacher engine against a direct forward pass on a tiny model built from a config."""

import pytest
import torch

from gkd.teacher.hf_engine import HFTeacherEngine, plan_batches
from tests.tiny_llama import tiny_llama


@pytest.fixture(scope="module")
def tiny_model():
    return tiny_llama(0, 300, 256)


def _sequences(seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for plen, rlen in [(5, 9), (1, 3), (17, 1), (8, 30), (3, 12)]:
        out.append(
            (
                torch.randint(0, 300, (plen,), generator=g).tolist(),
                torch.randint(0, 300, (rlen,), generator=g).tolist(),
            )
        )
    return out


@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("budget", [10_000, 40])
def test_scores_equal_direct_forward(tiny_model, temperature, budget):
    engine = HFTeacherEngine(tiny_model, max_batch_tokens=budget)
    seqs = _sequences()
    outs = engine.score(seqs, top_k=8, temperature=temperature)
    assert len(outs) == len(seqs)
    for (prompt, response), out in zip(seqs, outs, strict=True):
        full = torch.tensor([prompt + response])
        with torch.no_grad():
            logits = tiny_model(full).logits[0].float() / temperature
        logp = torch.log_softmax(logits, -1)[len(prompt) - 1 : len(prompt) + len(response) - 1]
        ref_lp, ref_ids = logp.topk(8, -1)
        assert out.topk_ids.dtype == torch.int32 and out.topk_ids.shape == (len(response), 8)
        torch.testing.assert_close(out.topk_logprobs, ref_lp, atol=1e-5, rtol=1e-5)
        assert torch.equal(out.topk_ids.long(), ref_ids)
        torch.testing.assert_close(
            out.token_logprobs, logp.gather(1, torch.tensor(response)[:, None])[:, 0], atol=1e-5, rtol=1e-5
        )


def test_fp16_logprobs_on_request(tiny_model):
    engine = HFTeacherEngine(tiny_model, logprob_dtype="float16")
    out = engine.score(_sequences()[:1], top_k=4)[0]
    assert out.topk_logprobs.dtype == torch.float16 and out.token_logprobs.dtype == torch.float32


def test_plan_batches_respects_budget():
    lengths = [5, 50, 7, 7, 100, 3]
    batches = plan_batches(lengths, 60)
    assert sorted(i for b in batches for i in b) == list(range(6))
    for b in batches:
        assert len(b) == 1 or max(lengths[i] for i in b) * len(b) <= 60


@pytest.mark.parametrize(
    "seqs,top_k,match",
    [
        (
            [([1, 2], [3]), ([1], [300])],
            4,
            r"sequence 1: response token id 300 is outside the vocabulary \[0, 300\)",
        ),
        ([([1, 2], [])], 4, "sequence 0: empty response"),
        ([([], [1])], 4, "sequence 0: empty prompt"),
        ([([1] * 200, [2] * 100)], 4, "sequence 0: 300 tokens exceed the teacher's limit of 256"),
        ([([1], [2])], 500, r"top_k=500 is outside \[1, 128\]"),
        ([([-1], [2])], 4, "sequence 0: prompt token id -1 is outside"),
    ],
)
def test_bad_requests_name_the_sequence(tiny_model, seqs, top_k, match):
    engine = HFTeacherEngine(tiny_model)
    with pytest.raises(ValueError, match=match):
        engine.score(seqs, top_k=top_k)
