"""Failures surface in seconds: a dead service through the client's liveness pings (not request
duration), the broker's per-job deadline, cancellation of a request nobody waits for, the queue bounded
in bytes, and the warning for a broker bound beyond loopback without auth."""

import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gkd.services.transport.auth import Auth
from gkd.services.transport.broker import Broker
from gkd.services.transport.client import Client, RemoteError, ServiceUnavailable
from gkd.services.transport.worker import check_cancelled
from tests.transport.helpers import FAST, OPS, tensors_for, wait_for

ROOT = Path(__file__).resolve().parents[2]
# broker and one worker in one process (as `gkd teacher serve` runs them); prints the frontend address
SERVICE_MAIN = """
import threading
from gkd.services.transport.broker import Broker
from gkd.services.transport.worker import Worker
from tests.transport.helpers import FAST, OPS, make_handler
broker = Broker(OPS, frontend_port=0, backend_port=0, **FAST).start()
Worker(broker.backend_address, make_handler("w"), ops=OPS, **FAST).start()
print(broker.frontend_address, flush=True)
threading.Event().wait()
"""


@pytest.fixture
def service_process():
    proc = subprocess.Popen([sys.executable, "-c", SERVICE_MAIN], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        yield proc, proc.stdout.readline().strip()
    finally:
        proc.kill()
        proc.wait(10)


def test_a_dead_service_surfaces_within_60s_in_one_line(service_process):
    """Default settings: a request of a service that is SIGKILLed mid-request fails through the liveness
    pings (15 s), not after timeout_s x attempts (600 s x 3), with one line that names the address."""
    proc, address = service_process
    with Client(address, timeout_s=600, retries=2) as client:
        assert client.call("sum", {"tag": 0}, tensors_for(0)).fields["tag"] == 0
        fut = client.submit("sum", {"tag": 1, "sleep": 300}, tensors_for(1))
        time.sleep(0.5)
        os.kill(proc.pid, signal.SIGKILL)
        with pytest.raises(ServiceUnavailable) as err:
            fut.result(timeout=60)
        assert client.stats["unavailable"] == 1 and client.stats["retries"] == 0
    text = str(err.value)
    assert "\n" not in text and address in text and "down or unreachable" in text
    assert f"liveness_timeout_s={client.liveness_timeout_s:g}" in text


def test_a_long_request_on_a_live_service_is_not_a_dead_one(make_service):
    """Liveness is the broker answering pings, not the request's duration: a 2 s request outlives a
    0.5 s liveness timeout."""
    svc = make_service()
    svc.add_worker("slow")
    client = svc.client(timeout_s=30, liveness_timeout_s=0.5)
    assert client.call("sum", {"tag": 1, "sleep": 2.0}, tensors_for(1)).fields["tag"] == 1
    assert client.stats["unavailable"] == 0


def test_a_worker_that_heartbeats_but_never_answers_loses_the_job(make_service):
    svc = make_service(job_timeout_s=0.5)
    hung = svc.add_worker("hung", delay_s=30)  # registered first: gets the request; heartbeats on
    svc.add_worker("good")
    client = svc.client(timeout_s=20, retries=0)  # no client retry: the broker must move the job
    msg = client.call("sum", {"tag": 1}, tensors_for(1))  # the hung worker would hold it for 30 s
    assert msg.fields["worker"] == "good"
    assert svc.info()["stats"]["jobs_timed_out"] == 1
    assert hung.served == 0


def _cancellable_handler(header, tensors):
    """Works in small steps, checking for cancellation in between, for at most 20 s."""
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        check_cancelled()
        time.sleep(0.01)
    return {"finished": True}, {}


def test_a_timed_out_request_is_cancelled_on_its_worker(make_service):
    svc = make_service()
    from gkd.services.transport.worker import Worker

    worker = Worker(svc.broker.backend_address, _cancellable_handler, ops=OPS, **FAST).start()
    svc.workers["cancellable"] = worker
    wait_for(lambda: svc.info()["workers"], what="worker to register")
    client = svc.client(timeout_s=0.5, retries=0)
    with pytest.raises(TimeoutError):
        client.call("sum", {}, tensors_for(1))
    assert client.stats["cancelled"] == 1
    # the handler stopped at its next check: the worker is free long before its 20 s of work
    wait_for(lambda: not svc.info()["workers"][0]["busy"], timeout_s=5, what="worker to drop the job")
    assert svc.info()["stats"]["cancelled"] == 1


def test_the_queue_is_bounded_in_bytes(make_service):
    one = sum(t.numel() * t.element_size() for t in tensors_for(1).values())
    svc = make_service(max_queue_bytes=one + 200)  # room for one request (header included), not two
    client = svc.client(retries=0)
    first = client.submit("sum", {"tag": 1}, tensors_for(1))  # queued: no worker yet
    with pytest.raises(RemoteError, match="bytes") as err:
        client.call("sum", {"tag": 2}, tensors_for(2))
    assert err.value.code == "busy"
    svc.add_worker("w")
    assert first.result(timeout=10).fields["tag"] == 1
    assert client.call("sum", {"tag": 3}, tensors_for(3)).fields["tag"] == 3  # the bytes were released


@pytest.mark.parametrize("auth", [None, Auth(b"s" * 32)])
def test_binding_beyond_loopback_without_auth_warns(caplog, auth):
    caplog.set_level(logging.WARNING, logger="gkd.broker")
    broker = Broker(OPS, host="0.0.0.0", frontend_port=0, backend_port=0, auth=auth).start()
    broker.stop()
    warned = [r.getMessage() for r in caplog.records if "without authentication" in r.getMessage()]
    if auth is None:
        assert len(warned) == 1 and "--auth-secret-file" in warned[0] and "workers" in warned[0]
    else:
        assert warned == []
