"""``Worker(max_in_flight=n)``: n requests handled at once by one worker (its slots), each slot listed at the
broker; a withdrawn request is cancelled in its slot while the others go on."""

import threading

import pytest

from gkd.services.transport.client import RemoteError
from gkd.services.transport.worker import Cancelled, Worker, cancel_event
from tests.transport.helpers import FAST, OPS, tensors_for, wait_for


def test_n_slots_hold_n_requests_at_once(service):
    together = threading.Barrier(3, timeout=20)  # breaks (an error reply) unless 3 handlers run at once
    seen = []

    def handle(header, tensors):
        together.wait()
        seen.append(threading.current_thread().name)
        return {"tag": header["tag"]}, None

    worker = Worker(
        service.broker.backend_address, handle, ops=OPS, info={"name": "w"}, max_in_flight=3, **FAST
    )
    service.workers["w"] = worker.start()
    wait_for(lambda: len(service.info()["workers"]) == 3, what="3 slots")
    slots = sorted(w["info"]["slot"] for w in service.info()["workers"])
    assert slots == [0, 1, 2] and {w["info"]["slots"] for w in service.info()["workers"]} == {3}
    client = service.client()
    futures = [client.submit("sum", {"tag": i}, tensors_for(1)) for i in range(3)]
    assert sorted(f.result(timeout=30).fields["tag"] for f in futures) == [0, 1, 2]
    assert len(seen) == 3 and worker.served == 3


def test_a_withdrawn_request_is_cancelled_in_its_slot_only(service):
    started = threading.Event()
    outcomes = []

    def handle(header, tensors):
        if header.get("hang"):
            started.set()
            if cancel_event().wait(20):
                outcomes.append("cancelled")
                raise Cancelled("withdrawn")
            outcomes.append("not cancelled")
        return {"tag": header.get("tag")}, None

    worker = Worker(
        service.broker.backend_address, handle, ops=OPS, info={"name": "w"}, max_in_flight=2, **FAST
    )
    service.workers["w"] = worker.start()
    wait_for(lambda: len(service.info()["workers"]) == 2, what="2 slots")
    impatient = service.client(timeout_s=1.0, retries=0, liveness_timeout_s=None)
    hung = impatient.submit("sum", {"hang": True}, tensors_for(1))
    assert started.wait(20)
    patient = service.client()
    assert patient.call("sum", {"tag": "other"}, tensors_for(1)).fields["tag"] == "other"
    with pytest.raises((TimeoutError, RemoteError)):
        hung.result(timeout=30)
    wait_for(lambda: outcomes == ["cancelled"], what="the cancel to reach the slot")
    assert patient.call("sum", {"tag": "after"}, tensors_for(1)).fields["tag"] == "after"


def test_the_trainer_counts_worker_processes_not_slots():
    from gkd.services.startup import worker_processes

    def entry(pid, slot=None):
        return {"info": {"host": "h", "pid": pid, **({} if slot is None else {"slot": slot, "slots": 4})}}

    reply = {"workers": [entry(1, s) for s in range(4)] + [entry(2, 0), entry(3), entry(3)]}
    assert worker_processes(reply) == 2 + 2  # pid 1 and 2 slotted; two plain entries
    assert worker_processes({"workers": []}) == 0
