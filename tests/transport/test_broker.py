"""Broker + worker + client in threads: routing, load balancing by readiness, errors, order of splits."""

import threading
import time
from concurrent.futures import ThreadPoolExecutor, wait

import pytest
import torch

from gkd.services.transport.client import Client, RemoteError, plan_chunks
from gkd.services.transport.codec import PROTOCOL_VERSION
from tests.transport.helpers import tensors_for


def test_request_roundtrip_and_info(service):
    service.add_worker("w0")
    client = service.client()
    msg = client.call("sum", {"tag": "a"}, tensors_for(3))
    expected = tensors_for(3)
    assert msg.fields["sum"] == pytest.approx(sum(float(t.double().sum()) for t in expected.values()))
    assert msg.fields["tag"] == "a" and msg.fields["worker"] == "w0"
    for k, t in expected.items():
        assert torch.equal(msg.tensors[k], t)
    info = client.info()
    assert info["protocol"] == PROTOCOL_VERSION and info["ops"] == ["sum"]
    (worker,) = info["workers"]
    assert worker["info"]["name"] == "w0" and worker["info"]["protocol"] == PROTOCOL_VERSION
    assert worker["served"] == 1 and not worker["busy"]
    assert client.call("ping", timeout_s=5).fields["protocol"] == PROTOCOL_VERSION


def test_three_clients_two_workers_every_reply_reaches_its_future(service):
    service.add_worker("w0")
    service.add_worker("w1")
    clients = [service.client() for _ in range(3)]

    def one(i):
        client = clients[i % 3]
        return i, client.submit("sum", {"tag": i, "sleep": 0.005}, tensors_for(i))

    with ThreadPoolExecutor(6) as pool:
        submitted = list(pool.map(one, range(60)))
    done, not_done = wait([f for _, f in submitted], timeout=30)
    assert not not_done
    workers = set()
    for i, fut in submitted:
        msg = fut.result()
        assert msg.fields["tag"] == i
        assert torch.equal(msg.tensors["x"], tensors_for(i)["x"])
        workers.add(msg.fields["worker"])
    assert workers == {"w0", "w1"}


def test_load_balancing_is_by_readiness_not_round_robin(service):
    service.add_worker("slow", delay_s=0.3)
    service.add_worker("fast")
    client = service.client()
    futures = [client.submit("sum", {"tag": i}, tensors_for(i)) for i in range(16)]
    served = [f.result(timeout=30).fields["worker"] for f in futures]
    # Round-robin would give each 8; by readiness the slow one takes ~1 while the fast one drains the queue.
    assert served.count("fast") >= 13, served


def test_handler_error_and_bad_request_keep_the_worker_serving(service):
    service.add_worker("w0")
    client = service.client()
    with pytest.raises(RemoteError, match="handler_error.*asked to fail") as err:
        client.call("sum", {"fail": True}, tensors_for(1))
    assert err.value.code == "handler_error"
    with pytest.raises(RemoteError, match="bad_request.*op 'nope' is not accepted"):
        client.call("nope", None, tensors_for(1))
    assert client.call("sum", {"tag": 2}, tensors_for(2)).fields["tag"] == 2


def test_queue_full_gives_busy(make_service):
    svc = make_service(max_queue=1)
    svc.add_worker("w0", delay_s=0.3)
    client = svc.client()
    futures = [client.submit("sum", {"tag": i}, tensors_for(i), retries=0) for i in range(4)]
    wait(futures, timeout=30)
    codes = [getattr(f.exception(), "code", None) for f in futures]
    assert "busy" in codes and None in codes, codes
    busy = next(f.exception() for f in futures if f.exception() is not None)
    assert "queue is full" in str(busy)


def test_busy_is_retried_with_backoff(make_service):
    svc = make_service(max_queue=1)
    svc.add_worker("w0", delay_s=0.05)
    client = svc.client(backoff_s=0.05, retries=20)
    futures = [client.submit("sum", {"tag": i}, tensors_for(i)) for i in range(5)]
    assert [f.result(timeout=30).fields["tag"] for f in futures] == list(range(5))
    assert client.stats["retries"] > 0


def test_no_workers_is_a_clear_error_within_the_timeout(make_service):
    svc = make_service(no_worker_grace_s=0.2)
    client = svc.client(timeout_s=60.0, retries=0)  # the broker's 0.2 s grace ends it, not this timeout
    with pytest.raises(RemoteError, match="no workers connected") as err:
        client.call("sum", None, tensors_for(1))
    assert err.value.code == "no_workers" and svc.info()["stats"]["errors_sent"] == 1


def test_queued_request_waits_for_a_late_worker_within_grace(make_service):
    svc = make_service(no_worker_grace_s=10.0)
    client = svc.client()
    fut = client.submit("sum", {"tag": 1}, tensors_for(1))
    time.sleep(0.2)
    assert not fut.done()
    svc.add_worker("late")
    assert fut.result(timeout=10).fields["worker"] == "late"


def test_split_batch_is_reassembled_in_order(service):
    service.add_worker("w0")
    service.add_worker("w1")
    client = service.client()
    values = torch.arange(100, dtype=torch.float32)
    sizes = [int(s) for s in torch.randint(1, 20, (100,))]
    chunks = plan_chunks(sizes, max_items=16, max_tokens=120)
    assert [i for c in chunks for i in c] == list(range(100))
    assert all(len(c) <= 16 and (sum(sizes[i] for i in c) <= 120 or len(c) == 1) for c in chunks)
    parts = [
        ({"sleep": 0.02 * (len(chunks) - k) / len(chunks)}, {"v": values[c.start : c.stop]})
        for k, c in enumerate(chunks)
    ]
    replies = client.submit_split("sum", parts).result(timeout=30)
    assert torch.equal(torch.cat([r.tensors["v"] for r in replies]), values)
    assert {r.fields["worker"] for r in replies} == {"w0", "w1"}


def test_split_failure_names_the_part(service):
    service.add_worker("w0")
    client = service.client()
    parts = [({}, tensors_for(0)), ({"fail": True}, tensors_for(1))]
    with pytest.raises(RemoteError, match="asked to fail") as err:
        client.submit_split("sum", parts).result(timeout=10)
    assert "micro-request 1 of 2" in "".join(err.value.__notes__)


def test_thread_safe_submit_and_clean_close(service):
    service.add_worker("w0")
    client = service.client()
    results, errors = [], []

    def spam(k):
        try:
            results.extend(
                client.submit("sum", {"tag": k * 100 + j}, tensors_for(j)).result(10).fields["tag"]
                for j in range(10)
            )
        except Exception as e:  # collected and asserted below
            errors.append(e)

    threads = [threading.Thread(target=spam, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors and sorted(results) == sorted(k * 100 + j for k in range(4) for j in range(10))
    client.close()
    with pytest.raises(RuntimeError, match="closed"):
        client.submit("sum", None, tensors_for(0))


def test_busy_worker_keeps_heartbeating_and_is_not_declared_dead(service):
    """A request 3x longer than the heartbeat timeout: the worker's loop beats while the handler runs."""
    service.add_worker("w0")
    client = service.client()
    timeout = service.broker.heartbeat_timeout_s
    assert client.call("sum", {"tag": 1, "sleep": 3 * timeout}, tensors_for(1)).fields["tag"] == 1
    stats = service.info()["stats"]
    assert stats["workers_lost"] == 0 and stats["requeued"] == 0


def test_client_times_out_cleanly_without_a_broker():
    with Client("127.0.0.1:1", timeout_s=0.2, retries=1) as client:  # nothing listens on port 1
        with pytest.raises(TimeoutError, match=r"no reply .* \(2 attempt"):
            client.call("sum", None, tensors_for(1))
        assert client.stats["reconnects"] == 2 and client.stats["retries"] == 1
