"""The teacher's ``generate`` op: sampled answers come back with exactly the rows a ``score`` of the same
answers gives (one pass), seeded answers do not depend on batching, and the wire refuses replies that do
not fit the request."""

import pytest
import torch

from gkd.services.transport import Message, ProtocolError, RemoteError
from gkd.teacher.client import TeacherClient
from gkd.teacher.generate_wire import (
    generate_reply,
    pack_generate_request,
    unpack_generate_reply,
    unpack_generate_request,
)
from gkd.teacher.hf_engine import HFTeacherEngine
from gkd.teacher.service import EngineSpec, make_broker, make_worker
from gkd.teacher.types import GenerateSettings
from tests.teacher.conftest import VOCAB, assert_outputs_equal
from tests.transport.helpers import FAST, ServiceThreads


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    return HFTeacherEngine.from_pretrained(tiny_model_dir, max_top_k=16, max_batch_tokens=96)


def _prompts(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [
        torch.randint(1, VOCAB, (int(torch.randint(1, 12, (1,), generator=g)),), generator=g).tolist()
        for _ in range(n)
    ]


@pytest.mark.parametrize("gen_t,top_p,score_t", [(1.0, 1.0, 1.0), (0.0, 1.0, 1.0), (1.3, 0.9, 0.7)])
def test_generate_rows_equal_a_score_of_the_same_answers(engine, gen_t, top_p, score_t):
    prompts = _prompts(7, seed=3)
    settings = GenerateSettings(
        max_new_tokens=10, temperature=gen_t, top_p=top_p, seed=11, stop_token_ids=(5, 17)
    )
    answers = engine.generate(prompts, settings, top_k=8, temperature=score_t)
    assert len(answers) == 7
    for a in answers:
        assert 1 <= len(a.response_ids) <= 10
        stops = [i for i, t in enumerate(a.response_ids) if t in (5, 17)]
        assert stops in ([], [len(a.response_ids) - 1])  # the first stop token ends the answer
        assert a.finish_reason == ("stop" if stops else "length")
        if not stops:
            assert len(a.response_ids) == 10
    scored = engine.score([(p, a.response_ids) for p, a in zip(prompts, answers, strict=True)], 8, score_t)
    assert_outputs_equal([a.output for a in answers], scored, atol=1e-5)


def test_seeded_answers_do_not_depend_on_batching(engine, tiny_model_dir):
    prompts = _prompts(6, seed=5)
    settings = GenerateSettings(max_new_tokens=8, seed=42)
    together = engine.generate(prompts, settings, top_k=4)
    one_batch = HFTeacherEngine.from_pretrained(tiny_model_dir, max_top_k=16, max_batch_tokens=1 << 16)
    assert [a.response_ids for a in one_batch.generate(prompts, settings, top_k=4)] == [
        a.response_ids for a in together
    ]
    other_seed = engine.generate(prompts, GenerateSettings(max_new_tokens=8, seed=43), top_k=4)
    assert [a.response_ids for a in other_seed] != [a.response_ids for a in together]


def test_bad_prompts_are_named(engine):
    with pytest.raises(ValueError, match="prompt 3: token id 300 is outside"):
        engine.generate([[1], [2], [3], [300]], GenerateSettings(max_new_tokens=2), top_k=4)
    with pytest.raises(ValueError, match="prompt 0: empty"):
        engine.generate([[]], GenerateSettings(max_new_tokens=2), top_k=4)
    with pytest.raises(ValueError, match="top_k=99"):
        engine.generate([[1]], GenerateSettings(max_new_tokens=2), top_k=99)


def test_settings_are_checked():
    with pytest.raises(ValueError, match="max_new_tokens"):
        GenerateSettings(max_new_tokens=0)
    with pytest.raises(ValueError, match="top_p"):
        GenerateSettings(top_p=0.0)
    with pytest.raises(ValueError, match="temperature"):
        GenerateSettings(temperature=-1.0)


def test_request_round_trip_and_reply_checks(engine):
    prompts = _prompts(3, seed=9)
    settings = GenerateSettings(max_new_tokens=5, temperature=0.5, top_p=0.8, seed=7, stop_token_ids=(2,))
    fields, tensors = pack_generate_request(prompts, settings, 4, 1.0, offset=10)
    got_prompts, got = unpack_generate_request(fields, tensors)
    assert got_prompts == prompts
    assert got == GenerateSettings(max_new_tokens=5, temperature=0.5, top_p=0.8, seed=17, stop_token_ids=(2,))
    answers = engine.generate(prompts, settings, top_k=4)
    reply = generate_reply(answers, 4, torch.float32)
    back = unpack_generate_reply(Message({"support": "topk"}, reply), 3, 5)
    assert [a.response_ids for a in back] == [a.response_ids for a in answers]
    assert [a.finish_reason for a in back] == [a.finish_reason for a in answers]
    with pytest.raises(ProtocolError, match="do not fit 2 prompts"):
        unpack_generate_reply(Message({}, reply), 2, 5)
    with pytest.raises(ProtocolError, match="max_new_tokens=1"):
        unpack_generate_reply(Message({}, reply), 3, 1)
    bad = dict(reply, response_ids=reply["response_ids"][:-1])
    with pytest.raises(ProtocolError, match="response_ids"):
        unpack_generate_reply(Message({}, bad), 3, 5)
    with pytest.raises(ValueError, match="prompt_lens add up"):
        unpack_generate_request(fields, dict(tensors, input_ids=tensors["input_ids"][:-1]))


def test_generate_through_the_service(engine, tiny_model_dir):
    spec = EngineSpec(model=tiny_model_dir, top_k=16)
    broker = make_broker(host="127.0.0.1", port=0, backend_port=0, **FAST).start()
    svc = ServiceThreads(
        broker, [make_worker(spec, broker.backend_address, engine=engine, **FAST).start()], TeacherClient
    )
    try:
        client = svc.client(max_sequences_per_request=2)  # 5 prompts: 3 micro-requests, seeds by global index
        prompts = _prompts(5, seed=1)
        settings = GenerateSettings(max_new_tokens=6, seed=3, stop_token_ids=(9,))
        answers = client.generate(prompts, settings, top_k=8, temperature=0.8).result(timeout=60)
        local = engine.generate(prompts, settings, top_k=8, temperature=0.8)
        assert [a.response_ids for a in answers] == [a.response_ids for a in local]
        assert_outputs_equal([a.output for a in answers], [a.output for a in local])
        with pytest.raises(RemoteError, match="prompt 4: token id 300"):
            client.generate([[1]] * 4 + [[300]], settings, top_k=8).result(timeout=60)
    finally:
        svc.close()
