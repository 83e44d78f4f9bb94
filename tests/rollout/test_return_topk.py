"""``SamplingConfig.return_topk``: the student's top-m ids per response position, from the logits the
engine sampled from, and their int32 ``[R, m]`` frame on the rollout wire."""

import pytest
import torch

from gkd.rollout.hf_engine import HFRolloutEngine
from gkd.rollout.types import Sample, SamplingConfig
from gkd.rollout.wire import OP_GENERATE, REPLY_LIMITS, pack_reply, pack_request, unpack_reply, unpack_request
from gkd.services.transport.codec import ProtocolError, decode, encode
from tests.rollout.conftest import response_logits
from tests.rollout.test_hf_engine import PROMPTS, _tiny


@pytest.fixture(scope="module")
def model():
    return _tiny()


@pytest.mark.parametrize("temperature", [0.0, 0.7])
def test_top_ids_are_the_top_m_of_the_sampling_logits(model, temperature):
    engine = HFRolloutEngine(model)
    s = SamplingConfig(max_new_tokens=6, temperature=temperature, top_k=20, seed=1, return_topk=5)
    for sample in engine.generate(PROMPTS, s):
        logits = response_logits(model, sample)
        assert sample.topk_ids.dtype == torch.int32 and sample.topk_ids.shape == (len(sample.response_ids), 5)
        want = logits.topk(5, dim=-1)
        got = logits.gather(1, sample.topk_ids.long())  # ties may order differently: compare values
        torch.testing.assert_close(got, want.values, atol=1e-4, rtol=0)
    assert engine.generate(PROMPTS[:1], SamplingConfig(max_new_tokens=3))[0].topk_ids is None  # off


def test_return_topk_round_trips_on_the_wire():
    header, tensors = pack_request([[1, 2]], SamplingConfig(max_new_tokens=2, return_topk=3))
    assert unpack_request(header, tensors)[1].return_topk == 3
    samples = [
        Sample(
            [1],
            [4, 5],
            torch.tensor([-0.1, -0.2]),
            "length",
            3,
            topk_ids=torch.tensor([[4, 7, 9], [1, 5, 2]]),
        ),
        Sample([2], [6], torch.tensor([-0.3]), "stop", 3, topk_ids=torch.tensor([[6, 0, 3]])),
    ]
    fields, reply = pack_reply(samples, 3)
    assert reply["topk_ids"].dtype == torch.int32 and reply["topk_ids"].shape == (3, 3)  # 12 bytes/token
    got = unpack_reply(decode(encode(OP_GENERATE, 1, fields, reply), ops=[OP_GENERATE]), [[1], [2]])
    for g, w in zip(got, samples, strict=True):
        assert torch.equal(g.topk_ids, w.topk_ids.int())
    reply["topk_ids"] = reply["topk_ids"][:2]
    with pytest.raises(ProtocolError, match="topk_ids"):
        unpack_reply(
            decode(encode(OP_GENERATE, 1, fields, reply), ops=[OP_GENERATE], limits=REPLY_LIMITS), [[1], [2]]
        )


def test_return_topk_bounds():
    with pytest.raises(ValueError, match="return_topk"):
        SamplingConfig(return_topk=-1)
