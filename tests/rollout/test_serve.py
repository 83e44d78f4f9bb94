"""``python -m gkd.rollout.service rollout serve`` in a subprocess: 2 worker processes in a weight channel
whose rank 0 is this test, a version pushed and demanded with ``min_version``, a worker SIGKILLed while it
holds a request (every prompt still answered exactly once), then SIGTERM shuts down the children."""

import os
import signal
import subprocess
import sys
from concurrent.futures import wait
from datetime import timedelta
from pathlib import Path

import torch

from gkd.data.vocab import stop_token_ids
from gkd.rollout.client import RolloutClient
from gkd.rollout.hf_engine import HFRolloutEngine
from gkd.rollout.types import SamplingConfig
from gkd.weights.channel import ChannelHost
from gkd.weights.transfer import WeightSender
from tests.rollout.conftest import assert_samples_equal, random_prompts
from tests.transport.helpers import free_port, pid_alive, wait_for

ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def test_serve_with_weight_channel_survives_a_sigkilled_worker_and_stops_cleanly(student_dir):
    from transformers import LlamaForCausalLM

    port, backend_port, weight_port = free_port(), free_port(), free_port()
    argv = [sys.executable, "-m", "gkd.rollout.service", "rollout", "serve", "--model", student_dir]
    argv += ["--workers", "2", "--port", str(port), "--backend-port", str(backend_port)]
    argv += [
        "--weight-channel",
        f"127.0.0.1:{weight_port}",
        "--weight-backend",
        "gloo",
        "--weight-timeout",
        "60",
    ]
    serve = subprocess.Popen(
        argv, cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    client = RolloutClient(f"127.0.0.1:{port}", timeout_s=30, retries=0, min_version_wait_s=20)
    try:
        trainer = LlamaForCausalLM.from_pretrained(student_dir).eval()
        with torch.no_grad():
            for p in trainer.parameters():
                p.mul_(1.1)
        # blocks until both workers (loading their engines in the children) have joined the channel
        host = ChannelHost("127.0.0.1", weight_port, 2, backend="gloo", timeout=timedelta(seconds=90))
        host.start(lambda group: WeightSender(group, trainer))
        host.sync(1)
        workers = wait_for(
            lambda: len(client.info()["workers"]) == 2 and client.info()["workers"], 30, "2 workers"
        )
        pids = [w["info"]["pid"] for w in workers]
        assert all(w["info"]["weight_channel"].startswith(f"127.0.0.1:{weight_port} rank ") for w in workers)

        # the served engines stop where from_pretrained says (the generation config's eos ids too)
        reference = HFRolloutEngine(trainer, stop_ids=stop_token_ids(student_dir, None))
        reference.policy_version = 1
        s = SamplingConfig(max_new_tokens=100, temperature=1.0, seed=17)  # long enough to be killed mid-way
        requests = [random_prompts(3, seed=50 + i) for i in range(6)]
        futures = [client.submit(requests[0], s, min_version=1)]
        victim = wait_for(
            lambda: next((w for w in client.info()["workers"] if w["busy"]), None), 20, "a busy worker"
        )
        futures += [client.submit(r, s, min_version=1) for r in requests[1:]]
        os.kill(victim["info"]["pid"], signal.SIGKILL)
        _, pending = wait(futures, timeout=60)
        assert not pending
        for req, fut in zip(requests, futures, strict=True):
            assert_samples_equal(fut.result(), reference.generate(req, s), atol=1e-4)
        stats = client.info()["stats"]
        assert stats["workers_lost"] == 1 and stats["requeued"] == 1
        assert stats["requests"] == stats["replies"] == 6  # exactly one reply per request
        assert client.stats["late_replies"] == 0

        serve.send_signal(signal.SIGTERM)
        assert serve.wait(30) == 0, serve.stderr.read()[-3000:]
        survivor = next(p for p in pids if p != victim["info"]["pid"])
        wait_for(lambda: not pid_alive(survivor), 10, "the surviving worker to exit")
    finally:
        client.close()
        if serve.poll() is None:
            serve.kill()
            serve.wait(10)
        # the sender's weight group is left as it is: one of its ranks is dead
