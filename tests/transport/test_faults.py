"""Faults: a worker process SIGKILLed mid-request, a silent worker whose late reply must not duplicate,
a hung worker (client retries elsewhere), and the last worker dying (clear no_workers error)."""

import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import wait
from pathlib import Path

import msgpack
import pytest
import zmq

from gkd.services.transport.broker import Broker
from gkd.services.transport.client import RemoteError
from gkd.services.transport.codec import reply_frames
from gkd.services.transport.protocol import READY, REPLY, REQUEST, RESET
from tests.transport.helpers import FAST, OPS, tensors_for, wait_for

ROOT = Path(__file__).resolve().parents[2]
WORKER_MAIN = """
import sys
from gkd.services.transport.worker import Worker
from tests.transport.helpers import FAST, OPS, make_handler
name = sys.argv[2]
Worker(sys.argv[1], make_handler(name), ops=OPS, info={"name": name}, **FAST).run()
"""


def _spawn(address: str, name: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", WORKER_MAIN, address, name], cwd=ROOT)


def _busy_worker(service) -> dict:
    return wait_for(
        lambda: next((w for w in service.info()["workers"] if w["busy"]), None), what="a busy worker"
    )


def test_sigkilled_worker_request_completes_elsewhere_none_lost_none_duplicated(make_service):
    svc = make_service(no_worker_grace_s=0.5)
    procs = [_spawn(svc.broker.backend_address, f"p{i}") for i in range(2)]
    try:
        wait_for(lambda: len(svc.info()["workers"]) == 2, timeout_s=60, what="2 worker processes")
        client = svc.client(timeout_s=30, retries=0)  # no client retry: the broker must re-queue
        held = client.submit("sum", {"tag": "held", "sleep": 1.0}, tensors_for(7))
        victim = _busy_worker(svc)["info"]["pid"]
        others = [client.submit("sum", {"tag": i}, tensors_for(i)) for i in range(8)]
        os.kill(victim, signal.SIGKILL)
        done, pending = wait([held, *others], timeout=30)
        assert not pending
        msg = held.result()
        assert msg.fields["tag"] == "held" and msg.fields["pid"] != victim
        assert [f.result().fields["tag"] for f in others] == list(range(8))
        stats = svc.info()["stats"]
        assert stats["workers_lost"] == 1 and stats["requeued"] == 1
        assert stats["requests"] == stats["replies"] == 9  # exactly one reply per request
        assert client.stats["late_replies"] == 0

        # Now the last worker dies holding a request: a clear error, well within the client timeout.
        last = client.submit("sum", {"tag": "last", "sleep": 5.0}, tensors_for(1))
        os.kill(_busy_worker(svc)["info"]["pid"], signal.SIGKILL)
        with pytest.raises(RemoteError, match="no workers connected") as err:
            last.result(timeout=20)
        assert err.value.code == "no_workers"
    finally:
        for p in procs:
            p.kill()
            p.wait(10)


class FakeWorker:
    """A raw backend DEALER that registers and then does only what the test says (no heartbeats)."""

    def __init__(self, address: str):
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(address)
        self.sock.send_multipart([READY, msgpack.packb({"name": "fake"})])

    def recv(self, kind: bytes, timeout_s: float = 10.0) -> list[bytes]:
        deadline = time.monotonic() + timeout_s
        while self.sock.poll(max(0, deadline - time.monotonic()) * 1000):
            frames = self.sock.recv_multipart()
            if frames[0] == kind:
                return frames
        raise TimeoutError(f"fake worker got no {kind!r} within {timeout_s}s")

    def close(self):
        self.sock.close(0)
        self.ctx.term()


def test_late_reply_of_a_silent_worker_is_dropped_not_duplicated(service):
    fake = FakeWorker(service.broker.backend_address)
    try:
        wait_for(lambda: service.info()["workers"], what="fake worker")
        client = service.client()
        fut = client.submit("sum", {"tag": 1}, tensors_for(1))
        _, jid, header, *_ = fake.recv(REQUEST)
        rid = msgpack.unpackb(header)["id"]
        # The fake goes silent; the broker drops it after the heartbeat timeout and re-queues the request.
        service.add_worker("real", wait=False)
        assert fut.result(timeout=10).fields["worker"] == "real"
        fake.sock.send_multipart([REPLY, jid, *reply_frames(rid, {"worker": "fake"})])
        fake.recv(RESET)  # the broker does not know it any more and tells it to re-announce
        stats = service.info()["stats"]
        assert stats["late_replies_dropped"] == 1 and stats["replies"] == 1 and stats["requeued"] == 1
        assert client.stats["late_replies"] == 0
    finally:
        fake.close()


def test_a_reply_counts_only_from_the_worker_the_job_was_given_to(service):
    """The silent worker's job went to another worker; its reply, arriving first, must not complete it."""
    fake = FakeWorker(service.broker.backend_address)
    try:
        wait_for(lambda: service.info()["workers"], what="fake worker")
        client = service.client()
        fut = client.submit("sum", {"tag": 1, "sleep": 0.5}, tensors_for(1))
        _, jid, header, *_ = fake.recv(REQUEST)
        rid = msgpack.unpackb(header)["id"]
        service.add_worker("real")  # takes the re-queued request once the fake is declared dead
        wait_for(lambda: service.info()["stats"]["requeued"] == 1, what="re-queue")
        fake.sock.send_multipart([REPLY, jid, *reply_frames(rid, {"worker": "fake"})])
        assert fut.result(timeout=10).fields["worker"] == "real"
        stats = service.info()["stats"]
        assert stats["late_replies_dropped"] == 1 and stats["replies"] == 1
        assert client.call("sum", {"tag": 2}, tensors_for(2)).fields["worker"] == "real"
    finally:
        fake.close()


def test_job_ids_do_not_repeat_across_broker_restarts(make_service):
    """A worker that outlived its broker must not be able to answer a new broker's job by id."""
    jids = []
    for _ in range(2):
        svc = make_service()
        fake = FakeWorker(svc.broker.backend_address)
        try:
            wait_for(lambda s=svc: s.info()["workers"], what="fake worker")
            svc.client().submit("sum", {"tag": 1}, tensors_for(1))
            jids.append(fake.recv(REQUEST)[1])
        finally:
            fake.close()
    assert jids[0] != jids[1]


def test_hung_worker_client_retries_elsewhere(service):
    release = threading.Event()
    service.add_worker("hung", release=release)  # registered first: gets the first request
    service.add_worker("good")
    client = service.client(timeout_s=0.5, retries=2)
    try:
        msg = client.call("sum", {"tag": 1}, tensors_for(1))
        assert msg.fields["worker"] == "good" and msg.fields["tag"] == 1
        assert client.stats["retries"] >= 1 and client.stats["reconnects"] >= 1
        # The replaced socket still works for new requests.
        assert client.call("sum", {"tag": 2}, tensors_for(2)).fields["tag"] == 2
    finally:
        release.set()
    # Released, the hung worker's stale reply goes nowhere (old socket closed) and it serves again.
    wait_for(lambda: not any(w["busy"] for w in service.info()["workers"]), what="hung worker to finish")
    tags = {client.call("sum", {"tag": i}, tensors_for(i)).fields["tag"] for i in range(3)}
    assert tags == {0, 1, 2}


def test_worker_reconnects_when_the_broker_goes_silent(make_service):
    """A worker whose broker vanishes replaces its socket and re-announces itself to the new broker."""
    svc = make_service()
    port = int(svc.broker.backend_address.rsplit(":", 1)[1])
    worker = svc.add_worker("w0")
    svc.broker.stop()
    wait_for(lambda: worker.reconnects >= 1, timeout_s=5, what="worker to replace its socket")
    svc.broker = Broker(OPS, frontend_port=0, backend_port=port, **FAST).start()
    svc.probe = svc.client(timeout_s=5.0)
    wait_for(lambda: svc.info()["workers"], timeout_s=10, what="worker to re-register")
    assert svc.client().call("sum", {"tag": 3}, tensors_for(3)).fields["worker"] == "w0"


def test_request_that_every_worker_drops_fails_after_max_attempts(make_service):
    svc = make_service(max_attempts=2)
    fut = svc.client().submit("sum", {"tag": 1}, tensors_for(1))  # queued until a worker shows up
    fakes = [FakeWorker(svc.broker.backend_address)]
    try:
        fakes[0].recv(REQUEST)
        time.sleep(FAST["heartbeat_timeout_s"] / 2)  # the second one joins later, so it is dropped later
        fakes.append(FakeWorker(svc.broker.backend_address))
        fakes[1].recv(REQUEST)  # the re-queued request, which it drops too
        with pytest.raises(RemoteError, match="given to 2 workers and each died") as err:
            fut.result(timeout=10)
        assert err.value.code == "worker_failed"
    finally:
        for fake in fakes:
            fake.close()
