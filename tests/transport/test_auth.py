"""HMAC authentication: roundtrip, and every way of tampering is rejected with a reason."""

import struct
import time

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gkd.services.transport.auth import CLIENT_TO_BROKER, WORKER_TO_BROKER, Auth, AuthError
from gkd.services.transport.client import Client
from gkd.services.transport.codec import encode
from tests.transport.helpers import tensors_for, wait_for

SECRET = b"0123456789abcdef-test-secret"


def _frames():
    return [bytes(f) for f in encode("echo", 1, {"a": 1}, {"x": torch.arange(10, dtype=torch.int32)})]


def test_roundtrip_strips_trailer():
    auth = Auth(SECRET)
    frames = _frames()
    assert auth.verify(auth.sign(frames, CLIENT_TO_BROKER), CLIENT_TO_BROKER) == frames


@pytest.mark.parametrize(
    "tamper, needle",
    [
        (lambda a, f: Auth(b"another-secret-of-16+").sign(f, CLIENT_TO_BROKER), "bad MAC"),
        (lambda a, f: a.sign(f, WORKER_TO_BROKER), "bad MAC"),  # right key, other direction
        (lambda a, f: f, "no valid authentication trailer"),  # unsigned
        (lambda a, f: f[:1], "no authentication trailer"),
        # Same bytes, one moved across a frame boundary, original trailer: the length prefixes catch it.
        (lambda a, f: [f[0] + f[1][:1], f[1][1:], a.sign(f, CLIENT_TO_BROKER)[-1]], "bad MAC"),
    ],
)
def test_rejections(tamper, needle):
    auth = Auth(SECRET)
    with pytest.raises(AuthError, match=needle):
        auth.verify(tamper(auth, _frames()), CLIENT_TO_BROKER)


def test_replay_and_stale_timestamp_rejected():
    auth = Auth(SECRET, max_skew_s=1.0)
    signed = auth.sign(_frames(), CLIENT_TO_BROKER)
    auth.verify(signed, CLIENT_TO_BROKER)
    with pytest.raises(AuthError, match="replayed"):
        auth.verify(signed, CLIENT_TO_BROKER)
    # Forge an old (but correctly MACed) message: rejected by the clock window.
    body = _frames()
    stamp = struct.pack(">Q", time.time_ns() - 5_000_000_000) + b"\x01" * 16
    old = [*body, b"GKDA1" + stamp + auth._mac(CLIENT_TO_BROKER, stamp, body)]
    with pytest.raises(AuthError, match="timestamp"):
        auth.verify(old, CLIENT_TO_BROKER)


def test_short_secret_refused(tmp_path):
    (tmp_path / "s").write_text("short\n")
    with pytest.raises(ValueError, match="at least 16"):
        Auth.from_file(tmp_path / "s")
    (tmp_path / "s").write_text(SECRET.decode() + "\n")
    assert Auth.from_file(tmp_path / "s").verify(Auth(SECRET).sign([b"x"], b"l"), b"l") == [b"x"]


@settings(max_examples=100, deadline=None)
@given(st.data())
def test_property_any_mutation_of_a_signed_message_is_rejected(data):
    """With auth on, the codec's "decoded identically or rejected" holds for payload bytes too."""
    auth = Auth(SECRET)
    signed = [bytearray(f) for f in auth.sign(_frames(), CLIENT_TO_BROKER)]
    i = data.draw(st.integers(0, len(signed) - 1))
    j = data.draw(st.integers(0, len(signed[i]) - 1))
    signed[i][j] ^= data.draw(st.integers(1, 255))
    with pytest.raises(AuthError):
        auth.verify([bytes(f) for f in signed], CLIENT_TO_BROKER)


# ------------------------------------------------------------------------------------- on a service


def test_service_with_auth_drops_and_counts_strangers_and_serves_members(make_service):
    svc = make_service(auth=Auth(SECRET))
    svc.add_worker("w0")
    member = svc.client()
    assert member.call("sum", {"tag": 1}, tensors_for(1)).fields["tag"] == 1

    address = svc.broker.frontend_address
    strangers = [
        Client(address, timeout_s=0.3, retries=0),  # no auth at all
        Client(address, timeout_s=0.3, retries=0, auth=Auth(b"not-the-shared-secret!")),
    ]
    for stranger in strangers:
        with stranger, pytest.raises(TimeoutError):  # dropped without a reply
            stranger.call("sum", {"tag": 2}, tensors_for(2))
    # A worker with the wrong secret cannot join (its READY and heartbeats are dropped and counted).
    svc.add_worker("intruder", wait=False, auth=Auth(b"not-the-shared-secret!"))
    info = wait_for(lambda: (i := member.info())["stats"]["auth_failures"] >= 4 and i, what="auth failures")
    assert [w["info"]["name"] for w in info["workers"]] == ["w0"] and info["auth"] is True
    assert info["stats"]["requests"] == 1  # nothing from a stranger got as far as a request
    # Members are still served.
    assert member.call("sum", {"tag": 3}, tensors_for(3)).fields["tag"] == 3


def test_the_mac_is_checked_before_the_timestamp_is_trusted():
    """The timestamp is only read once the MAC vouches for it: a stranger's made-up stamp (stale or
    fresh) is a bad MAC, and only a genuine stale message is refused for its clock."""
    auth = Auth(SECRET, max_skew_s=1.0)
    body = _frames()
    for offset_ns in (-5_000_000_000, 0):
        stamp = struct.pack(">Q", time.time_ns() + offset_ns) + b"\x02" * 16
        with pytest.raises(AuthError, match="bad MAC"):
            auth.verify([*body, b"GKDA1" + stamp + b"\0" * 32], CLIENT_TO_BROKER)
    stamp = struct.pack(">Q", time.time_ns() - 5_000_000_000) + b"\x03" * 16
    with pytest.raises(AuthError, match=r"timestamp is \+5\.0s off"):
        auth.verify([*body, b"GKDA1" + stamp + auth._mac(CLIENT_TO_BROKER, stamp, body)], CLIENT_TO_BROKER)


def test_a_message_signed_before_a_restart_cannot_be_replayed_to_the_new_process():
    """The nonce memory starts empty with each process; a message stamped before the receiver started is
    refused all the same (within the clock window it would otherwise pass once more)."""
    client = Auth(SECRET)
    signed = client.sign(_frames(), CLIENT_TO_BROKER)
    before = Auth(SECRET)  # the broker before its restart: an instance made before the message
    before.created_ns -= 1_000_000_000
    before.verify(signed, CLIENT_TO_BROKER)
    time.sleep(0.01)
    restarted = Auth(SECRET)  # the broker after its restart: empty nonce memory
    with pytest.raises(AuthError, match="before this process started"):
        restarted.verify(signed, CLIENT_TO_BROKER)
    assert restarted.verify(client.sign(_frames(), CLIENT_TO_BROKER), CLIENT_TO_BROKER) == _frames()
