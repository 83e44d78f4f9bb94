"""The trainer and its rollout workers agree on the weight channel's terms before any group forms: a
worker on another backend fails at once, and so does the trainer, each with one line naming both values
and the setting to change; a worker without a backend of its own takes the trainer's."""

from __future__ import annotations

import socket
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta

import pytest

from gkd.weights.channel import ChannelHost, ChannelMember, ChannelMismatch
from gkd.weights.membership import channel_key

KEY = channel_key("b" * 64)
SLOW = timedelta(seconds=60)  # what the sides would wait without the check


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _timed(fn):
    start = time.monotonic()
    try:
        fn()
    except Exception as exc:  # noqa: BLE001 - the test reads it
        return exc, time.monotonic() - start
    return None, time.monotonic() - start


def test_a_worker_on_nccl_and_a_gloo_trainer_both_fail_fast_naming_both_backends():
    port = _free_port()
    host = ChannelHost("127.0.0.1", port, 1, backend="gloo", timeout=SLOW, key=KEY)
    # the member's backend is only compared, never started: nccl is simulated on a CPU machine
    member = ChannelMember(
        "127.0.0.1", port, "worker-a", backend="nccl", timeout=SLOW, idle_timeout=SLOW, key=KEY
    )
    try:
        with ThreadPoolExecutor(2) as pool:
            trainer_side = pool.submit(_timed, host.form)
            worker_side = pool.submit(_timed, member.join)
            (t_exc, t_s), (w_exc, w_s) = trainer_side.result(90), worker_side.result(90)
    finally:
        member.close()
        host.close()
    for exc, seconds in ((t_exc, t_s), (w_exc, w_s)):
        assert isinstance(exc, ChannelMismatch), exc
        line = str(exc)
        assert "\n" not in line
        assert "backend mismatch: the trainer uses gloo, rollout worker worker-a nccl" in line
        assert "rollout.weight_backend" in line and "--weight-backend" in line
        assert seconds < 10, f"failed after {seconds:.1f}s, not at once"


def test_a_worker_without_a_backend_takes_the_trainers():
    port = _free_port()
    host = ChannelHost("127.0.0.1", port, 1, backend="gloo", timeout=SLOW, key=KEY)
    member = ChannelMember("127.0.0.1", port, "worker-b", timeout=SLOW, idle_timeout=SLOW, key=KEY)
    try:
        with ThreadPoolExecutor(2) as pool:
            formed = pool.submit(host.form)
            joined = pool.submit(member.join)
            group, _ = joined.result(90)
            formed.result(90)
        assert member.backend == "gloo" and group.device.type == "cpu" and group.world_size == 2
    finally:
        member.close()
        host.close()


def test_a_worker_of_another_protocol_is_refused(monkeypatch):
    import gkd.weights.channel as channel

    PROTOCOL = channel.PROTOCOL_VERSION
    port = _free_port()
    host = ChannelHost("127.0.0.1", port, 1, backend="gloo", timeout=SLOW, key=KEY)
    monkeypatch.setattr(channel, "PROTOCOL_VERSION", channel.PROTOCOL_VERSION + 1)  # the worker's side
    member = ChannelMember("127.0.0.1", port, "worker-c", timeout=SLOW, idle_timeout=SLOW, key=KEY)
    try:
        with pytest.raises(
            ChannelMismatch,
            match=f"protocol mismatch: the trainer uses {PROTOCOL}, rollout worker worker-c {PROTOCOL + 1}",
        ):
            member.join()
    finally:
        member.close()
        host.close()


def test_rollout_weight_backend_decides_and_is_checked():
    from gkd.config import ConfigError, load_config
    from gkd.launch.placement import weight_backend

    base = ["model.student_path=S", "data.train_files=[p]", "teacher.model_path=T"]
    gpu = load_config(["configs/gpu_example.yaml"], base)
    assert weight_backend(gpu) == "nccl"  # auto: both on GPUs
    forced = load_config(["configs/gpu_example.yaml"], [*base, "rollout.weight_backend=gloo"])
    assert weight_backend(forced) == "gloo"
    with pytest.raises(
        ConfigError, match="rollout.weight_backend='nccl': nccl needs the trainer and the rollout"
    ):
        load_config(["configs/cpu_tiny.yaml"], [*base, "rollout.weight_backend=nccl"])
    with pytest.raises(ConfigError, match="rollout.weight_backend"):
        load_config(["configs/cpu_tiny.yaml"], [*base, "rollout.weight_backend=mpi"])


def test_once_running_the_trainer_leaves_a_mismatched_worker_out_instead_of_failing():
    port = _free_port()
    host = ChannelHost("127.0.0.1", port, 1, backend="gloo", timeout=SLOW, key=KEY)
    good = ChannelMember("127.0.0.1", port, "good", timeout=SLOW, idle_timeout=SLOW, key=KEY)
    late = ChannelMember("127.0.0.1", port, "late", backend="nccl", timeout=SLOW, idle_timeout=SLOW, key=KEY)
    try:
        with ThreadPoolExecutor(2) as pool:
            formed, joined = pool.submit(host.form), pool.submit(good.join)
            joined.result(90)
            formed.result(90)
        with pytest.raises(ChannelMismatch, match="backend mismatch"):
            late.join()  # asks for generation 1
        assert host.pending() and host._join_record(1, 1) is None  # skipped, the run goes on
    finally:
        for m in (good, late):
            m.close()
        host.close()
