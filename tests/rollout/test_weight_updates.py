"""Weight updates while the rollout service generates: the test thread is trainer rank 0 of a gloo weight
channel (127.0.0.1, free port) and pushes versions 1..5 to two in-process workers while a client streams
requests. Every sample must be explained by exactly the version it reports: re-scored with that version's
weights, its log-probs equal a forward pass and its greedy tokens equal the argmax."""

import socket
import threading
import time
from datetime import timedelta

import torch

from gkd.rollout.service import WeightChannel
from gkd.rollout.types import SamplingConfig
from gkd.weights.channel import ChannelHost
from gkd.weights.transfer import WeightSender
from tests.rollout.conftest import random_prompts, response_logits
from tests.rollout.test_service import Service
from tests.transport.helpers import wait_for

TIMEOUT = timedelta(seconds=60)
# Generation shares the GIL with the weight threads here: a generous heartbeat timeout keeps a busy worker
# from being declared dead (which would be correct, just a slower test).
HEARTBEAT = {"heartbeat_interval_s": 0.1, "heartbeat_timeout_s": 3.0}
GREEDY = SamplingConfig(max_new_tokens=10, temperature=0)
SAMPLED = SamplingConfig(max_new_tokens=10, temperature=0.7, top_k=50, seed=3)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _perturb(model, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.1 * p.std())


def _rescore(model, sample, temperature: float):
    """Log-probs of the sample's tokens under softmax(logits / T) and the argmax at each position."""
    logits = response_logits(model, sample)
    logp = torch.log_softmax(logits / (temperature or 1.0), -1)
    tokens = torch.tensor(sample.response_ids)
    return logp.gather(1, tokens[:, None])[:, 0], logits.argmax(-1)


def test_versions_pushed_during_a_stream_of_requests_explain_every_sample(student_dir):
    from transformers import LlamaForCausalLM

    port = _free_port()
    channels = [  # one worker per staging choice (on CPU both stage in host memory; the path differs on GPU)
        WeightChannel("127.0.0.1", port, r, 3, "gloo", TIMEOUT.total_seconds(), staging=staging)
        for r, staging in ((1, "host"), (2, "device"))
    ]
    svc = Service(student_dir, channels=channels, heartbeat=HEARTBEAT)
    trainer = LlamaForCausalLM.from_pretrained(student_dir).eval()
    states = {0: {k: v.clone() for k, v in trainer.state_dict().items()}}
    stop, results, errors = threading.Event(), [], []
    try:
        host = ChannelHost("127.0.0.1", port, 2, backend="gloo", timeout=TIMEOUT)
        sender = host.start(lambda group: WeightSender(group, trainer, bucket_bytes=64 << 10))
        wait_for(lambda: all(w.versioned.state == "ready" for w in svc.workers), what="receivers ready")
        staged = [w.versioned.receiver for w in svc.workers]
        assert [r.staging_device.type for r in staged] == ["cpu", "cpu"] and not any(r.bounce for r in staged)
        client = svc.client(min_version_wait_s=20)
        # Waits for version 1 (not pushed yet), holding one worker while the other serves the stream.
        early = client.submit(random_prompts(2, seed=99), GREEDY, min_version=1)

        def stream():
            i = 0
            while not stop.is_set() and i < 200:
                s = (GREEDY, SAMPLED)[i % 2]
                try:
                    results.append((s, client.generate(random_prompts(3, seed=i), s)))
                except Exception as e:  # reported by the main thread
                    errors.append(e)
                    return
                i += 1

        streamer = threading.Thread(target=stream, daemon=True)
        streamer.start()
        time.sleep(0.3)
        assert not early.done()
        for version in range(1, 6):
            _perturb(trainer, seed=version)
            states[version] = {k: v.clone() for k, v in trainer.state_dict().items()}
            host.sync(version)
            time.sleep(0.15)  # let a few requests run on this version
        stop.set()
        streamer.join(60)
        assert not streamer.is_alive() and not errors, errors
        assert all(x.policy_version >= 1 for x in early.result(30))
        last = client.generate(random_prompts(4, seed=1000), SAMPLED, min_version=5)
        assert all(x.policy_version == 5 for x in last)
        results.append((SAMPLED, last))
        sender.close()
        wait_for(lambda: all(w.versioned.state == "closed" for w in svc.workers), what="channel closed")
    finally:
        stop.set()
        svc.close()

    seen = sorted({x.policy_version for _, batch in results for x in batch})
    assert len(results) >= 6 and len(seen) >= 3, seen  # the stream really spanned several versions
    models = {}
    for s, batch in results:
        versions = {x.policy_version for x in batch}
        assert len(versions) == 1  # one request, one version
        for sample in batch:
            v = sample.policy_version
            if v not in models:
                models[v] = LlamaForCausalLM.from_pretrained(student_dir).eval()
                models[v].load_state_dict(states[v])
            logp, argmax = _rescore(models[v], sample, s.temperature)
            torch.testing.assert_close(sample.response_logprobs, logp, atol=1e-4, rtol=1e-4)
            if s.temperature == 0:
                assert sample.response_ids == argmax.tolist()
    # and the re-scoring does tell versions apart: a neighbouring version does not explain the samples
    sample = next(x for _, b in results for x in b if x.policy_version == seen[-1])
    other = LlamaForCausalLM.from_pretrained(student_dir).eval()
    other.load_state_dict(states[seen[-1] - 1])
    assert not torch.allclose(_rescore(other, sample, 0.7)[0], sample.response_logprobs, atol=1e-3)


def test_workers_that_left_the_channel_hand_back_a_waiting_request_and_take_none_until_they_rejoin(
    student_dir,
):
    # The trainer abandons the group (as when a member died) while a request waits on a worker for
    # version 1: both workers leave the channel and, until the next sync re-forms it, are not listed at the
    # broker; the waiting request goes back to the broker's queue instead of failing, and is served on
    # version 1 once the re-formed channel delivered it.
    from transformers import LlamaForCausalLM

    port = _free_port()
    channels = [WeightChannel("127.0.0.1", port, r, 3, "gloo", TIMEOUT.total_seconds()) for r in (1, 2)]
    svc = Service(student_dir, channels=channels, heartbeat=HEARTBEAT)
    trainer = LlamaForCausalLM.from_pretrained(student_dir).eval()
    try:
        host = ChannelHost("127.0.0.1", port, 2, backend="gloo", timeout=TIMEOUT)
        host.start(lambda group: WeightSender(group, trainer, bucket_bytes=64 << 10))
        wait_for(lambda: all(w.versioned.state == "ready" for w in svc.workers), what="receivers ready")
        client = svc.client(min_version_wait_s=25)
        waiting = client.submit(random_prompts(2, seed=5), GREEDY, min_version=1)
        wait_for(lambda: client.info()["in_flight"] == 1, what="a worker holds the request")
        host.sender.abandon()
        wait_for(lambda: all(w.versioned.state == "rejoining" for w in svc.workers), what="both rejoining")
        wait_for(lambda: not client.info()["workers"], what="no worker listed while rejoining")
        assert client.info()["queue"] == 1 and not waiting.done()  # handed back, not failed
        _perturb(trainer, seed=1)
        host.sync(1)  # a worker asks to join: the channel re-forms with both, then sends version 1
        assert host.generation == 1 and len(host.members) == 2
        assert [x.policy_version for x in waiting.result(30)] == [1, 1]
        # both back at the broker (the one that did not serve the request may announce itself a moment later)
        wait_for(lambda: len(client.info()["workers"]) == 2, what="both workers listed again")
        host.close()
        wait_for(lambda: all(w.versioned.state == "closed" for w in svc.workers), what="channel closed")
    finally:
        svc.close()


def test_a_failed_channel_takes_the_worker_off_the_broker(student_dir):
    # nobody hosts the store: the rendezvous fails after its timeout; a worker whose channel is gone for
    # good is not listed (requests would wait on versions that never come) and says why it must restart
    channel = WeightChannel("127.0.0.1", _free_port(), 1, 2, "gloo", timeout_s=0.5)
    svc = Service(student_dir, workers=1, channels=[channel])
    try:
        wait_for(lambda: svc.workers[0].versioned.state == "failed", timeout_s=20, what="channel failure")
        assert "weight channel failed" in svc.workers[0].failure()
        client = svc.client()
        wait_for(lambda: not client.info()["workers"], what="the failed worker off the broker's list")
    finally:
        svc.close()


def test_channel_settings_reach_each_worker_from_the_config():
    """rollout.weight_* -> ``gkd rollout serve`` flags (the launcher) -> each spawned ``join`` -> the
    worker's WeightChannel."""
    import argparse

    from gkd.config import load_config
    from gkd.launch.run import rollout_command
    from gkd.rollout.service import _channel_argv, add_rollout_cli

    parser = argparse.ArgumentParser()
    parser.add_argument("--log-level", default="INFO")
    add_rollout_cli(parser.add_subparsers(dest="command"))
    keys = ["rollout.weight_staging=device", "rollout.weight_timeout_s=42", "rollout.weight_idle_timeout_s=7"]
    cfg = load_config([], ["model.student_path=S", "data.train_files=[x.parquet]", *keys])
    argv = rollout_command(cfg)
    serve = parser.parse_args(argv[argv.index("rollout") :])
    assert (serve.weight_staging, serve.weight_timeout, serve.weight_idle_timeout) == ("device", 42.0, 7.0)
    child = _channel_argv("h:1", 2, 3, "gloo", 42.0, idle_timeout_s=7.0, staging="device")
    join = parser.parse_args(["rollout", "join", "--broker", "h:2", "--model", "S", *child])
    assert (join.weight_staging, join.weight_timeout, join.weight_idle_timeout) == ("device", 42.0, 7.0)
    assert parser.parse_args(["rollout", "join", "--broker", "h:2", "--model", "S"]).weight_staging == "host"
