"""Fuzz: >= 10,000 malformed messages against a running broker + worker; afterwards a valid request is still
answered correctly, and every malformed message was rejected (counted) rather than crashing anything."""

import random

import msgpack
import pytest
import torch
import zmq

from gkd.services.transport.codec import PROTOCOL_VERSION, Limits, ProtocolError, decode_header, encode
from gkd.services.transport.protocol import BYE, HEARTBEAT, READY, REPLY
from tests.transport.helpers import OPS, tensors_for, wait_for

N_FRONTEND = 10_000
N_BACKEND = 1_000
LIMITS = Limits(max_message_bytes=4096)


def _header(**over):
    h = {
        "v": PROTOCOL_VERSION,
        "op": "sum",
        "id": 1,
        "tensors": [{"name": "x", "dtype": "int32", "shape": [4]}],
    }
    h.update(over)
    return msgpack.packb(h, use_bin_type=True)


def _malformed(rng: random.Random) -> list[bytes]:
    """One message that must be rejected; the kinds cover the issue's list and then some."""
    good = [
        bytes(f)
        for f in encode("sum", rng.randrange(1 << 30), {"tag": 1}, {"x": torch.arange(4, dtype=torch.int32)})
    ]
    kind = rng.randrange(12)
    if kind == 0:  # random frames
        return [rng.randbytes(rng.randrange(0, 64)) for _ in range(rng.randrange(1, 5))]
    if kind == 1:  # wrong version
        return [_header(v=rng.choice([0, 2, 99, -1, "1", None, 1.0])), good[1]]
    if kind == 2:  # huge declared shapes
        shape = [rng.choice([2**31, 2**40, 2**63, 2**64 - 1]) for _ in range(rng.randrange(1, 4))]
        return [_header(tensors=[{"name": "x", "dtype": "int32", "shape": shape}]), good[1]]
    if kind == 3:  # wrong dtypes
        dtype = rng.choice(["object", "bool", "complex64", "float8", "<i4", "", 7, None])
        return [_header(tensors=[{"name": "x", "dtype": dtype, "shape": [4]}]), good[1]]
    if kind == 4:  # truncated tensor
        return [good[0], good[1][: rng.randrange(0, 16)]]
    if kind == 5:  # missing / extra frames
        return [good[0]] if rng.random() < 0.5 else [*good, rng.randbytes(8)]
    if kind == 6:  # op not allowed
        return [_header(op=rng.choice(["reply", "error", "SUM", "", "exec", 3])), good[1]]
    if kind == 7:  # header not a map / not msgpack
        return [rng.choice([msgpack.packb([1, 2, 3]), msgpack.packb("x"), b"\xc1", b""]), good[1]]
    if kind == 8:  # bad descriptors
        desc = rng.choice(
            [
                [{"name": "x"}],
                [1],
                {"x": 1},
                [{"name": "", "dtype": "int32", "shape": [4]}],
                [{"name": "x", "dtype": "int32", "shape": [-4]}],
                [{"name": "x", "dtype": "int32", "shape": "4"}],
            ]
        )
        return [_header(tensors=desc), good[1]]
    if kind == 9:  # bad ids
        return [_header(id=rng.choice([[1], {"a": 1}, 1.5, "x" * 300, b"raw"])), good[1]]
    if kind == 10:  # over the broker's limits
        return [_header(tensors=[{"name": "x", "dtype": "uint8", "shape": [5000]}]), bytes(5000)]
    # byte flips in the header that keep the frame structure
    h = bytearray(good[0])
    for _ in range(rng.randrange(1, 4)):
        h[rng.randrange(len(h))] = rng.randrange(256)
    msg = [bytes(h), good[1]]
    return msg if msg[0] != good[0] else [b"\xc1", good[1]]


@pytest.mark.slow
def test_fuzz_frontend_and_backend_then_still_serving(make_service):
    svc = make_service(limits=LIMITS)
    svc.add_worker("w0")
    rng = random.Random(1234)
    ctx = zmq.Context()
    front = ctx.socket(zmq.DEALER)
    back = ctx.socket(zmq.DEALER)
    try:
        for s, addr in ((front, svc.broker.frontend_address), (back, svc.broker.backend_address)):
            s.setsockopt(zmq.LINGER, 0)
            s.setsockopt(zmq.SNDTIMEO, 10_000)  # backpressure waits, but never forever
            s.connect(addr)
        before = svc.info()["stats"]
        still_valid = 0  # a byte flip inside e.g. the id can leave a valid message: the codec must agree
        for _ in range(N_FRONTEND):
            msg = _malformed(rng)
            try:
                decode_header(msg, ops=OPS, limits=LIMITS)
                still_valid += 1
            except ProtocolError:
                pass
            front.send_multipart(msg)  # no wait per message; replies pile up (and are dropped) unread
        for _ in range(N_BACKEND):  # garbage from a would-be worker: unknown kinds, bad REPLYs, bad READYs
            kind = rng.choice([b"", b"NOPE", REPLY, READY, HEARTBEAT + b"x", BYE + b"!"])
            junk = [rng.randbytes(rng.randrange(0, 12)) for _ in range(rng.randrange(3))]
            back.send_multipart([kind, *junk])
        back.close(0)

        def all_seen():
            s = svc.info()["stats"]
            seen = s["bad_requests"] - before["bad_requests"] + s["requests"] - before["requests"]
            return seen >= N_FRONTEND

        wait_for(all_seen, timeout_s=60, what="the broker to process every fuzz message")
        stats = svc.info()["stats"]
        assert still_valid < N_FRONTEND // 100
        assert stats["requests"] - before["requests"] == still_valid
        assert stats["bad_requests"] - before["bad_requests"] == N_FRONTEND - still_valid
        # The service still answers a valid request correctly, on the same worker.
        msg = svc.client().call("sum", {"tag": "after"}, tensors_for(5))
        expected = sum(float(t.double().sum()) for t in tensors_for(5).values())
        assert msg.fields["tag"] == "after" and msg.fields["sum"] == pytest.approx(expected)
        assert torch.equal(msg.tensors["x"], tensors_for(5)["x"])
        # A garbage READY that happened to be a msgpack map registers a would-be worker; it never beats,
        # so the broker drops it again.
        wait_for(lambda: [w["info"].get("name") for w in svc.info()["workers"]] == ["w0"], what="only w0")
        assert svc.info()["stats"]["bad_backend_messages"] > N_BACKEND // 2
        # Error replies name the problem (read a few that reached the fuzzing socket).
        replies = [front.recv_multipart() for _ in range(3) if front.poll(2000)]
        assert replies and all(msgpack.unpackb(r[0])["code"] == "bad_request" for r in replies)
    finally:
        front.close(0)
        back.close(0)
        ctx.term()
