"""A rollout worker whose weight-channel thread died leaves the broker (requests go to the healthy one)
and its process exits to be restarted; a request already waiting on it hears why at once."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta

import pytest

from gkd.rollout.service import WeightChannel, make_worker
from gkd.rollout.types import SamplingConfig
from gkd.rollout.versioned import VersionedEngine
from gkd.services.transport.process import run_until_stopped
from gkd.weights.channel import ChannelHost
from gkd.weights.transfer import WeightSender
from tests.rollout.conftest import random_prompts
from tests.rollout.test_service import Service
from tests.transport.helpers import free_port, wait_for

TIMEOUT = timedelta(seconds=60)
HEARTBEAT = {"heartbeat_interval_s": 0.1, "heartbeat_timeout_s": 3.0}
GREEDY = SamplingConfig(max_new_tokens=4, temperature=0)


def _broken_load(named, version=None):
    raise RuntimeError("injected: the engine refused the weights")


def test_a_worker_whose_channel_thread_died_leaves_the_broker_and_exits_to_be_restarted(student_dir):
    from transformers import LlamaForCausalLM

    port = free_port()
    channels = [WeightChannel("127.0.0.1", port, r, 3, "gloo", TIMEOUT.total_seconds()) for r in (1, 2)]
    svc = Service(student_dir, channels=channels[1:], heartbeat=HEARTBEAT)
    trainer = LlamaForCausalLM.from_pretrained(student_dir).eval()
    (healthy,) = svc.workers
    # the other one runs as `gkd rollout join` runs it, until it must exit
    broken = make_worker(svc.spec, svc.broker.backend_address, channel=channels[0], **HEARTBEAT)
    stop = threading.Event()
    pool = ThreadPoolExecutor(1)
    exited = pool.submit(run_until_stopped, broken, stop)
    try:
        host = ChannelHost("127.0.0.1", port, 2, backend="gloo", timeout=TIMEOUT, heartbeat_timeout_s=3.0)
        host.start(lambda group: WeightSender(group, trainer, bucket_bytes=64 << 10))
        wait_for(lambda: all(w.versioned.state == "ready" for w in svc.workers), 30, "receivers ready")
        client = svc.client(min_version_wait_s=20)
        assert broken.failure() is None
        broken.versioned.engine.load_weights = _broken_load  # its channel thread dies applying version 1
        host.sync(1)
        wait_for(lambda: broken.versioned.state == "failed", 30, "the injected channel failure")
        assert "injected: the engine refused the weights" in broken.failure()
        listed = wait_for(
            lambda: len(w := client.info()["workers"]) == 1 and w, 30, "the broken worker off the list"
        )
        assert listed[0]["info"]["weight_channel"].endswith("rank 2")
        # every request goes to the healthy worker, none fails at once on the broken one
        for i in range(4):
            samples = client.generate(random_prompts(2, seed=i), GREEDY, min_version=1)
            assert [s.policy_version for s in samples] == [1, 1]
        assert client.info()["stats"]["errors_sent"] == 0
        # the process of the broken worker ends (status 1), so its supervisor starts a fresh one
        assert exited.result(timeout=30) == 1 and not stop.is_set()
        # the trainer's next sync goes on without it (its heartbeat stopped with its channel)
        host.sync(2)
        assert len(host.members) == 1 and host.members[0].endswith("slot2")
        assert [s.policy_version for s in client.generate(random_prompts(1), GREEDY, min_version=2)] == [2]
        host.close()  # the healthy worker's channel thread ends before the store goes
        wait_for(lambda: healthy.versioned.state == "closed", 30, "the channel closed")
    finally:
        stop.set()
        pool.shutdown(wait=True)
        svc.close()


class _Engine:
    policy_version = 0


def test_a_request_waiting_when_the_channel_fails_hears_why_at_once():
    engine = VersionedEngine(_Engine(), WeightChannel("127.0.0.1", 1, 1, 2))
    with ThreadPoolExecutor(1) as pool:
        waiting = pool.submit(engine.wait_for, 1, 60.0)
        threading.Event().wait(0.2)
        engine._notify(state="failed", error="RuntimeError: store is gone")
        with pytest.raises(TimeoutError, match="weight channel failed: RuntimeError: store is gone"):
            waiting.result(timeout=10)  # long before its 60 s
    assert not engine.available and "store is gone" in engine.failure()
