"""Strangers flooding an authenticated broker: junk with fresh timestamps on both sockets, while members
keep being served. Bounded in count and time, loopback only; assertions on counters, never on timing."""

from __future__ import annotations

import os
import struct
import threading
import time

import torch
import zmq

from gkd.rollout.service import ROLLOUT
from gkd.rollout.wire import REPLY_LIMITS as ROLLOUT_REPLY_LIMITS
from gkd.services.host import make_broker
from gkd.services.transport.auth import MAGIC, Auth
from gkd.services.transport.codec import encode
from gkd.teacher.service import TEACHER
from gkd.teacher.wire import REPLY_LIMITS as TEACHER_REPLY_LIMITS
from tests.transport.helpers import Service, tensors_for, wait_for

SECRET = b"flood-test-secret-0123456789"
PEERS, MESSAGES, PAYLOAD = 4, 150, 32 << 10


def _junk(i: int) -> list[bytes]:
    """A well-formed request with a trailer whose timestamp is fresh and whose MAC is made up."""
    stamp = struct.pack(">Q", time.time_ns()) + os.urandom(16)
    frames = [
        bytes(f) for f in encode("sum", i, {"tag": -1}, {"x": torch.zeros(PAYLOAD // 4, dtype=torch.int32)})
    ]
    return [*frames, MAGIC + stamp + os.urandom(32)]


def _flood(address: str, kind: int, sent: list[int], stop: threading.Event) -> None:
    ctx = zmq.Context.instance()
    sock = ctx.socket(kind)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SNDTIMEO, 2000)  # a broker that stopped reading us must not hang the test
    sock.connect(address)
    try:
        for i in range(MESSAGES):
            if stop.is_set():
                break
            try:
                sock.send_multipart(_junk(i))
            except zmq.Again:
                continue
            sent[0] += 1
    finally:
        sock.close(linger=10_000)  # what was queued still leaves (counted as sent)


def test_a_flood_of_fresh_stamped_junk_does_not_stop_members_and_stays_bounded():
    auth = Auth(SECRET)
    max_queue = 8
    svc = Service({"auth": auth, "max_queue": max_queue, "heartbeat_timeout_s": 2.0})
    stop = threading.Event()
    try:
        svc.add_worker("w0")
        member = svc.client(timeout_s=30.0)
        front, back = svc.broker.frontend_address, svc.broker.backend_address
        counts = [[0] for _ in range(PEERS)]
        # two strangers on the clients' socket, two on the workers'
        peers = [
            threading.Thread(target=_flood, args=(addr, zmq.DEALER, counts[i], stop), daemon=True)
            for i, addr in enumerate((front, front, back, back))
        ]
        for p in peers:
            p.start()
        queues = []
        for i in range(20):  # members keep being served meanwhile
            reply = member.call("sum", {"tag": i}, tensors_for(i + 1))
            assert reply.fields["tag"] == i and reply.fields["worker"] == "w0"
            queues.append(member.info()["queue"])
        for p in peers:
            p.join(60)
        assert not any(p.is_alive() for p in peers)
        junk = sum(c[0] for c in counts)
        assert junk > PEERS * MESSAGES // 2  # the strangers did get their junk out
        info = wait_for(
            lambda: (i := member.info())["stats"]["auth_failures"] >= junk and i,
            60,
            f"{junk} junk messages counted",
        )
        assert info["stats"]["auth_failures"] == junk  # each dropped, none got further
        assert info["stats"]["requests"] == 20 and info["stats"]["bad_backend_messages"] == 0
        assert [w["info"]["name"] for w in info["workers"]] == ["w0"]  # no stranger became a worker
        assert max(queues) <= max_queue and info["queue"] == 0
        assert member.call("sum", {"tag": 99}, tensors_for(2)).fields["tag"] == 99
    finally:
        stop.set()
        svc.close()


def test_each_service_bounds_what_its_broker_backend_accepts_by_its_reply_limits():
    for kind, limits in ((ROLLOUT, ROLLOUT_REPLY_LIMITS), (TEACHER, TEACHER_REPLY_LIMITS)):
        broker = make_broker(kind, host="127.0.0.1", port=0, backend_port=0)
        assert broker.reply_limits == limits and broker.limits == kind.limits
    assert ROLLOUT_REPLY_LIMITS.max_message_bytes < 1 << 30  # not the 1 GiB default
