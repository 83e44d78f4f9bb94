"""The weight channel admits only its members: its store listens on the requested host only, join
records and generation keys are signed with the run's channel token, and buckets carry a MAC."""

from __future__ import annotations

import contextlib
import json
import logging
import socket
import subprocess
import threading
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist

from gkd.weights import native as _ext
from gkd.weights.channel import ChannelHost, ChannelMember
from gkd.weights.membership import (
    TOKEN_ENV,
    ChannelAuthError,
    channel_key,
    listen_address,
    read_token_file,
    token_env,
)
from gkd.weights.transfer import WeightReceiver, WeightSender, WeightSyncError, init_weight_group
from gkd.weights.wire import _CHECK_BYTES, trailer_bytes

TIMEOUT = timedelta(seconds=30)
KEY = channel_key("a" * 64)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _other_local_address() -> str | None:
    """An IPv4 address of this machine that is not loopback, or None."""
    found = set()
    try:
        out = subprocess.run(["ip", "-4", "-o", "addr"], capture_output=True, text=True, timeout=10).stdout
        found |= {line.split()[3].split("/")[0] for line in out.splitlines() if len(line.split()) > 3}
    except (OSError, subprocess.SubprocessError):
        pass
    with contextlib.suppress(OSError):
        found |= {info[4][0] for info in socket.getaddrinfo(socket.gethostname(), None, socket.AF_INET)}
    return next((a for a in sorted(found) if not a.startswith("127.")), None)


def _connects(host: str, port: int) -> bool:
    try:
        socket.create_connection((host, port), timeout=2).close()
        return True
    except OSError:
        return False


def test_store_on_loopback_refuses_connections_on_another_local_address():
    other = _other_local_address()
    if other is None:
        pytest.skip("this machine has no IPv4 address besides loopback to connect to")
    port = _free_port()
    host = ChannelHost("127.0.0.1", port, 1, backend="gloo", timeout=TIMEOUT, key=KEY)
    try:
        assert _connects("127.0.0.1", port)
        assert not _connects(other, port), f"the store answers on {other}:{port}, not only on loopback"
        host.store.set("probe", "1")  # and it serves (the descriptor reached the server)
        assert host.store.get("probe") == b"1"
    finally:
        host.close()


def _join(member: ChannelMember):
    def run():
        group, version = member.join()
        return group, version

    return run


def test_a_member_without_the_token_cannot_join(caplog):
    port = _free_port()
    host = ChannelHost("127.0.0.1", port, 1, backend="gloo", timeout=TIMEOUT, key=KEY)
    quick = timedelta(seconds=4)
    good = ChannelMember("127.0.0.1", port, "good", backend="gloo", timeout=TIMEOUT, key=KEY)
    wrong = ChannelMember(
        "127.0.0.1",
        port,
        "wrong",
        backend="gloo",
        timeout=TIMEOUT,
        idle_timeout=quick,
        key=channel_key("b" * 64),
    )
    with ThreadPoolExecutor(3) as pool, caplog.at_level(logging.WARNING, logger="gkd.weights"):
        wrong_join = pool.submit(_join(wrong))  # asks first: its record is read first, and skipped
        formed = pool.submit(host.form)
        threading.Event().wait(0.5)
        good_join = pool.submit(_join(good))
        group, _ = good_join.result(timeout=60)
        formed.result(timeout=60)
        assert host.members == ["good"] and group.world_size == 2 and group.rank == 1
        with pytest.raises(WeightSyncError, match="generation 0 was not formed"):
            wrong_join.result(timeout=60)
    assert any("forged value of 'gkd_weights/want/0/1'" in r.getMessage() for r in caplog.records)
    # a worker with no token at all is told what it lacks, in one line
    tokenless = ChannelMember("127.0.0.1", port, "none", backend="gloo", timeout=TIMEOUT, key=None)
    with pytest.raises(ChannelAuthError, match="--channel-token-file"):
        tokenless.join()
    for m in (good, wrong, tokenless):
        m.close()
    host.close()


def test_a_forged_generation_key_is_ignored_and_logged_once(caplog):
    port = _free_port()
    host = ChannelHost("127.0.0.1", port, 1, backend="gloo", timeout=TIMEOUT, key=KEY)
    attacker = dist.PrefixStore(
        "gkd_weights/", dist.TCPStore("127.0.0.1", port, None, is_master=False, timeout=TIMEOUT)
    )
    # would make the member rank 2 of 3 in a group nobody else joins
    attacker.set("gen/0", json.dumps({"members": ["intruder", "member"], "version": None}))
    member = ChannelMember("127.0.0.1", port, "member", backend="gloo", timeout=TIMEOUT, key=KEY)
    with ThreadPoolExecutor(2) as pool, caplog.at_level(logging.WARNING, logger="gkd.weights"):
        joined = pool.submit(_join(member))
        threading.Event().wait(1.5)  # the member polls the forged record meanwhile
        assert not joined.done()
        host.form()
        group, _ = joined.result(timeout=60)
    assert (group.rank, group.world_size) == (1, 2) and host.members == ["member"]
    forged = [r for r in caplog.records if "forged value of 'gkd_weights/gen/0'" in r.getMessage()]
    assert len(forged) == 1
    member.close()
    host.close()


def _keyed_pair(key: bytes | None):
    port = _free_port()
    with ThreadPoolExecutor(2) as pool:
        ranks = [
            pool.submit(init_weight_group, "127.0.0.1", port, r, 2, backend="gloo", timeout=TIMEOUT)
            for r in (0, 1)
        ]
        groups = [f.result(timeout=60) for f in ranks]
    for g in groups:
        g.key = key
    return groups


def _forge(index: int, buf: torch.Tensor, key: bytes | None) -> None:
    """Change one byte of bucket 1 and rewrite its CRC to match, as someone forging a bucket would."""
    if index != 1:
        return
    nbytes = buf.numel() - trailer_bytes(key)
    buf[3].bitwise_xor_(0x40)
    words = buf[nbytes : nbytes + _CHECK_BYTES].clone().view(torch.int64)
    words[3] = _ext.checksum(buf, 0, nbytes)
    buf[nbytes : nbytes + _CHECK_BYTES].copy_(words.view(torch.uint8))


@pytest.mark.parametrize("key", [None, KEY], ids=["checksum-only", "mac"])
def test_a_forged_bucket_is_rejected_when_the_channel_has_a_key(key):
    weights = {f"w{i}": torch.arange(16, dtype=torch.float32) + i for i in range(3)}
    tx, rx = _keyed_pair(key)
    sender = WeightSender(tx, weights, bucket_bytes=64, alignment=16, checksum="crc32")
    assert len(sender.buckets) == 3
    sender.bucket_hook = lambda i, buf: _forge(i, buf, key)
    receiver = WeightReceiver(rx, {n: torch.zeros(16) for n in weights})
    with ThreadPoolExecutor(1) as pool:
        sent = pool.submit(lambda: (sender.handshake(), sender.sync(1)))
        receiver.handshake()
        if key is None:  # a matching CRC is all a checksum checks: the forgery goes through
            assert receiver.receive() == 1
            sent.result(timeout=60)
        else:
            with pytest.raises(WeightSyncError, match="bucket 1 fails its MAC"):
                receiver.receive()
            with pytest.raises(WeightSyncError, match="version 1 was rejected"):
                sent.result(timeout=60)
        sender.bucket_hook = None
        sent = pool.submit(sender.sync, 2)
        assert receiver.receive() == 2
        sent.result(timeout=60)
        staged = dict(receiver._staging[1].unpack())
        assert torch.equal(staged["w1"], weights["w1"])


def test_sender_and_receiver_must_agree_on_bucket_macs():
    tx, rx = _keyed_pair(KEY)
    rx.key = None
    sender = WeightSender(tx, {"w": torch.zeros(4)})
    receiver = WeightReceiver(rx, {"w": torch.zeros(4)})
    with ThreadPoolExecutor(1) as pool:
        sent = pool.submit(sender.handshake)
        with pytest.raises(Exception, match="disagree on bucket MACs"):
            receiver.handshake()
        with pytest.raises(WeightSyncError, match="disagree on bucket MACs"):
            sent.result(timeout=60)


def test_a_store_for_a_machine_address_binds_that_address_only():
    other = _other_local_address()
    if other is None:
        pytest.skip("this machine has no IPv4 address besides loopback")
    assert listen_address(other) == other and listen_address("127.0.0.1") == "127.0.0.1"


def test_channel_token_file_errors_are_one_line(tmp_path, capsys, monkeypatch):
    from gkd.rollout.service import main

    monkeypatch.delenv(TOKEN_ENV, raising=False)
    short = tmp_path / "short.token"
    short.write_text("abc\n")
    for path, needle in (
        (tmp_path / "missing.token", "cannot read it"),
        (short, "the token is 3 characters"),
    ):
        argv = ["rollout", "join", "--broker", "127.0.0.1:1", "--model", str(tmp_path)]
        assert main([*argv, "--channel-token-file", str(path)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and f"--channel-token-file {path}: " in err[0] and needle in err[0], err


def test_gkd_train_writes_the_token_for_hand_started_workers(tmp_path, monkeypatch):
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    env = token_env(tmp_path)
    path = tmp_path / "channel.token"
    assert read_token_file(path) == env[TOKEN_ENV] and len(env[TOKEN_ENV]) == 64
    assert path.stat().st_mode & 0o777 == 0o600
    assert token_env(tmp_path) != env  # a new run, a new token


def test_bucket_macs_follow_the_secret_not_the_token():
    """The run's token signs the store's records always; the weights' bytes carry a MAC only when a secret is
    configured (a pass over every byte per sync, and a device-to-host copy per bucket on GPUs)."""
    port = _free_port()
    plain = ChannelHost("127.0.0.1", port, 1, backend="gloo", timeout=TIMEOUT, key=KEY)
    try:
        assert plain.key == KEY and plain.bucket_key is None
    finally:
        plain.close()
    port = _free_port()
    macs = ChannelHost("127.0.0.1", port, 1, backend="gloo", timeout=TIMEOUT, key=KEY, bucket_macs=True)
    try:
        assert macs.bucket_key == KEY
    finally:
        macs.close()
