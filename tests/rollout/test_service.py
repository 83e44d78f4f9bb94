"""The rollout service in one process (broker + worker threads): replies equal the in-process engine with
the same seeds whatever the split, bad input gets an error naming the prompt while the service keeps
serving, and a ``min_version`` the worker does not reach ends in a clear error after its wait."""

import threading
from concurrent.futures import ThreadPoolExecutor, wait

import pytest
import torch

from gkd.rollout.client import RolloutClient
from gkd.rollout.hf_engine import HFRolloutEngine
from gkd.rollout.service import RolloutSpec, WeightChannel, make_broker, make_worker
from gkd.rollout.types import SamplingConfig
from gkd.rollout.wire import OP_GENERATE, pack_request
from gkd.services.transport import Client, RemoteError
from tests.rollout.conftest import MAX_LEN, VOCAB, assert_samples_equal, random_prompts
from tests.transport.helpers import FAST, ServiceThreads


class Service(ServiceThreads):
    """Broker + worker threads (one engine each, optionally in a weight channel) on free ports."""

    def __init__(self, model_dir, workers=2, channels=None, heartbeat=FAST, **worker_kwargs):
        self.spec = RolloutSpec(model=model_dir)
        broker = make_broker(host="127.0.0.1", port=0, backend_port=0, **heartbeat).start()
        threads = [
            make_worker(self.spec, broker.backend_address, channel=ch, **heartbeat, **worker_kwargs).start()
            for ch in channels or [None] * workers
        ]
        super().__init__(broker, threads, RolloutClient)


@pytest.fixture(scope="module")
def engine(student_dir):
    return HFRolloutEngine.from_pretrained(student_dir)


@pytest.fixture(scope="module")
def service(student_dir):
    svc = Service(student_dir)
    yield svc
    svc.close()


SAMPLINGS = [
    SamplingConfig(max_new_tokens=8, temperature=0),
    SamplingConfig(max_new_tokens=10, temperature=0.8, top_k=40, seed=5),
    SamplingConfig(max_new_tokens=6, temperature=1.0, top_p=0.9, seed=9, stop_token_ids=(3, 7)),
]


def test_concurrent_requests_from_3_clients_match_the_engine(service, engine):
    n = 24
    requests = [random_prompts(1 + i % 3, seed=100 + i) for i in range(n)]
    clients = [service.client() for _ in range(3)]
    futures = [None] * n
    start = threading.Barrier(3)

    def submit_from(c):
        start.wait(10)
        for i in range(c, n, 3):
            futures[i] = clients[c].submit(requests[i], SAMPLINGS[i % 3])

    with ThreadPoolExecutor(3) as pool:
        list(pool.map(submit_from, range(3)))
    _, pending = wait(futures, timeout=60)
    assert not pending
    for i, fut in enumerate(futures):
        assert_samples_equal(fut.result(), engine.generate(requests[i], SAMPLINGS[i % 3]))
    served = [w["served"] for w in clients[0].info()["workers"]]
    assert min(served) > 0  # both workers took part


def test_seeded_results_do_not_depend_on_the_split(service, engine):
    prompts = random_prompts(7, seed=3)
    s = SamplingConfig(max_new_tokens=8, temperature=1.0, seed=21)
    whole = engine.generate(prompts, s)
    split = service.client(max_prompts_per_request=2).generate(prompts, s)  # 4 micro-requests, 2 workers
    assert_samples_equal(split, whole)
    assert [x.response_ids for x in engine.generate(prompts, SamplingConfig(max_new_tokens=8, seed=22))] != [
        x.response_ids for x in whole
    ]  # the seed matters, so the equality above is not vacuous


@pytest.mark.parametrize(
    "bad, match",
    [
        ([], "prompt 5 is empty"),
        ([1, VOCAB], rf"prompt 5: token id {VOCAB} is outside the vocabulary \[0, {VOCAB}\)"),
        ([-2, 1], "prompt 5: token id -2 is outside"),
        (
            [1] * (MAX_LEN - 7),
            f"prompt 5: {MAX_LEN - 7} tokens \\+ max_new_tokens 8 exceed the engine's context",
        ),
    ],
)
def test_bad_input_names_the_prompt_and_the_service_keeps_serving(service, engine, bad, match):
    client = service.client(max_prompts_per_request=2)  # prompt 5 sits in the third micro-request
    prompts = random_prompts(6, seed=11)
    prompts[5] = bad
    s = SamplingConfig(max_new_tokens=8, temperature=0)
    with pytest.raises(RemoteError, match=match) as err:
        client.generate(prompts, s)
    assert err.value.code == "handler_error"
    good = random_prompts(3, seed=12)
    assert_samples_equal(client.generate(good, s), engine.generate(good, s))


def test_inconsistent_or_ill_typed_requests_are_refused(service):
    fields, tensors = pack_request(random_prompts(2), SamplingConfig(max_new_tokens=4))
    with Client(service.broker.frontend_address, timeout_s=10) as raw:
        with pytest.raises(RemoteError, match="prompt_lens add up to"):
            raw.call(OP_GENERATE, fields, {**tensors, "prompt_lens": tensors["prompt_lens"] + 1})
        with pytest.raises(RemoteError, match="prompt_ids must be a 1-D int32 tensor"):
            raw.call(OP_GENERATE, fields, {**tensors, "prompt_ids": tensors["prompt_ids"].long()})
        with pytest.raises(RemoteError, match="max_new_tokens=0 must be >= 1"):
            raw.call(OP_GENERATE, {**fields, "max_new_tokens": 0}, tensors)
        with pytest.raises(RemoteError, match="field seed must be an int"):
            raw.call(OP_GENERATE, {**fields, "seed": "7"}, tensors)


def test_min_version_that_never_arrives_times_out_with_a_clear_error(service, engine):
    client = service.client(min_version_wait_s=0.3)
    prompts = random_prompts(2, seed=4)
    s = SamplingConfig(max_new_tokens=4, temperature=0)
    with pytest.raises(  # the 0.3 s wait ended it, not the client's 30 s timeout
        RemoteError,
        match=r"policy version 1 did not arrive within 0.3s \(this worker holds "
        r"version 0; this worker has no weight channel",
    ):
        client.generate(prompts, s, min_version=1)
    got = client.generate(prompts, s, min_version=0)  # already there: no wait
    assert_samples_equal(got, engine.generate(prompts, s))
    assert all(x.policy_version == 0 for x in got)


def test_empty_batch_and_tensor_prompts(service, engine):
    client = service.client()
    assert client.submit([], SamplingConfig()).result(5) == []
    prompts = [torch.tensor([4, 5, 6]), torch.tensor([9], dtype=torch.int32)]
    s = SamplingConfig(max_new_tokens=5, temperature=0)
    assert_samples_equal(client.generate(prompts, s), engine.generate([[4, 5, 6], [9]], s))


def test_spec_and_channel_round_trip_through_join_options(student_dir):
    import argparse

    from gkd.rollout.service import _channel_argv, _spec, add_rollout_cli

    parser = argparse.ArgumentParser()
    parser.add_argument("--log-level", default="INFO")
    add_rollout_cli(parser.add_subparsers(dest="command", required=True))
    spec = RolloutSpec(model=student_dir, dtype="bfloat16", max_batch_size=7)
    channel = _channel_argv("10.0.0.1:29600", 3, 5, "gloo", 12.5)
    args = parser.parse_args(["rollout", "join", "--broker", "h:1", *spec.to_argv(), *channel])
    assert _spec(args) == spec
    assert (args.weight_channel, args.weight_rank, args.weight_world_size) == ("10.0.0.1:29600", 3, 5)
    assert (args.weight_backend, args.weight_timeout) == ("gloo", 12.5)
    with pytest.raises(ValueError, match=r"weight rank 0 must lie in \[1, 3\)"):
        WeightChannel("127.0.0.1", 1, 0, 3)
