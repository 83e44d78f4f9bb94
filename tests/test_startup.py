"""Start-up timing (phases from ``gkd train``'s start) and the trainer's wait for services that are still
starting: it polls until their workers register, and does not wait for services started separately."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from gkd.services.startup import (
    LAUNCH_T0_ENV,
    SERVICE_WAIT_ENV,
    StartupClock,
    process_start_time,
    service_info,
    wait_for_workers,
)


def test_process_start_time_is_the_process_start():
    """The same instant psutil computes (from the same kernel fields, its own arithmetic), for this
    process and for a child started within the test (whose start lies after ``before``, less the up to
    1 s that the kernel's whole-second boot time drops)."""
    import psutil

    assert process_start_time() == pytest.approx(psutil.Process().create_time(), abs=0.02)
    before = time.time()
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        started = process_start_time(child.pid)
        assert started == pytest.approx(psutil.Process(child.pid).create_time(), abs=0.02)
        assert started >= before - 1.05
    finally:
        child.kill()
        child.wait(10)


def test_startup_clock_phases_add_up_from_the_launch(monkeypatch):
    now = [0.0]
    launch_t0 = process_start_time() - 2.0  # `gkd train` started two seconds before this process
    monkeypatch.setenv(LAUNCH_T0_ENV, repr(launch_t0))
    now[0] = process_start_time() + 1.0  # one second of imports
    clock = StartupClock(now=lambda: now[0])
    now[0] += 0.5
    clock.mark("student")
    now[0] += 0.25
    clock.mark("services")
    now[0] += 0.25
    clock.mark("student")  # a phase marked twice adds up
    assert clock.phases == pytest.approx({"launch": 2.0, "imports": 1.0, "student": 0.75, "services": 0.25})
    assert clock.total == pytest.approx(4.0) == pytest.approx(sum(clock.phases.values()))
    m = clock.metrics()
    assert m["timing/startup_s"] == pytest.approx(4.0) and m["startup/student_s"] == pytest.approx(0.75)
    assert clock.summary().startswith("start-up 4.00 s since gkd train started (launch 2.00, imports 1.00")


def test_startup_clock_without_a_launcher_starts_at_the_process_start(monkeypatch):
    monkeypatch.delenv(LAUNCH_T0_ENV, raising=False)
    clock = StartupClock()
    assert "launch" not in clock.phases and clock.t0 == pytest.approx(process_start_time(), abs=0.05)


class _Broker:
    """A broker's info answers: unreachable ``down`` times, then the given worker counts, in turn."""

    def __init__(self, down: int, counts: list[int]):
        self.down, self.counts, self.calls = down, counts, 0

    def info(self, timeout_s: float = 5.0) -> dict:
        self.calls += 1
        if self.calls <= self.down:
            raise TimeoutError("no reply (broker still starting)")
        n = self.counts[min(self.calls - self.down - 1, len(self.counts) - 1)]
        return {"workers": [{"info": {}}] * n}


def test_wait_for_workers_polls_until_enough_have_registered():
    broker = _Broker(down=2, counts=[0, 1, 2])
    reply = wait_for_workers(broker.info, 2, timeout_s=30, poll_s=0.01)
    assert len(reply["workers"]) == 2 and broker.calls == 5


def test_wait_for_workers_gives_up_with_the_last_reply_or_error():
    assert wait_for_workers(_Broker(0, [1]).info, 2, timeout_s=0.2, poll_s=0.01)["workers"] == [{"info": {}}]
    with pytest.raises(TimeoutError, match="still starting"):
        wait_for_workers(_Broker(10**6, [0]).info, 1, timeout_s=0.2, poll_s=0.01)


def test_service_info_waits_only_for_services_launched_with_the_trainer(monkeypatch):
    monkeypatch.setenv(SERVICE_WAIT_ENV, "30")
    launched = _Broker(down=1, counts=[0, 1])
    assert len(service_info(launched, 1, True, 10)["workers"]) == 1 and launched.calls == 3
    separate = _Broker(down=1, counts=[1])
    with pytest.raises(TimeoutError):  # started by hand: must answer now (the trainer names it)
        service_info(separate, 1, False, 10)
    monkeypatch.delenv(SERVICE_WAIT_ENV)
    direct = _Broker(down=0, counts=[0])  # torchrun by hand: no wait, the reply as it is
    assert service_info(direct, 1, True, 10)["workers"] == [] and direct.calls == 1
    assert os.environ.get(SERVICE_WAIT_ENV) is None
