"""Start-up timing and the trainer's wait for services that are still starting.

``gkd train`` starts the teacher service, the rollout service and the trainer at once; it passes the
trainer the wall-clock time it started (``GKD_LAUNCH_T0``) and how long the trainer may wait for the
services' workers to register (``GKD_SERVICE_WAIT_S``). The trainer records where its start-up went with
a :class:`StartupClock` (one log line, and ``timing/startup_s`` + ``startup/<phase>_s`` in the first
step's metrics) and waits for the workers with :func:`wait_for_workers`.

Imports nothing heavy: the launcher imports it before it starts anything.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable

LAUNCH_T0_ENV = "GKD_LAUNCH_T0"  # time.time() when `gkd train` started (its process start)
SERVICE_WAIT_ENV = "GKD_SERVICE_WAIT_S"  # set: the services were started with the trainer; wait this long

__all__ = [
    "LAUNCH_T0_ENV",
    "SERVICE_WAIT_ENV",
    "StartupClock",
    "process_start_time",
    "service_info",
    "service_wait_s",
    "wait_for_workers",
]


def process_start_time(pid: int | str = "self") -> float:
    """Wall-clock time (``time.time()`` scale) at which a process started, from ``/proc`` (10 ms
    resolution); the current time where ``/proc`` is missing."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            ticks = int(f.read().rsplit(") ", 1)[1].split()[19])  # field 22: start time, clock ticks
        with open("/proc/stat") as f:
            boot = next(int(line.split()[1]) for line in f if line.startswith("btime "))
        return boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return time.time()


class StartupClock:
    """Named phases of a process's start-up, each the time since the previous mark. The first phase,
    ``launch``, runs from ``gkd train``'s start (``GKD_LAUNCH_T0``; absent: this process's start) to this
    process's start; ``imports`` from there to the clock's creation."""

    def __init__(self, now: Callable[[], float] = time.time):
        self._now = now
        own = process_start_time()
        self.t0 = float(os.environ.get(LAUNCH_T0_ENV) or own)
        self.phases: dict[str, float] = {}
        if own > self.t0:
            self.phases["launch"] = own - self.t0
        self._last = max(own, self.t0)
        self.mark("imports")

    def mark(self, phase: str) -> float:
        """End ``phase`` now (a phase marked twice adds up); returns its seconds."""
        t = self._now()
        seconds = max(t - self._last, 0.0)
        self.phases[phase] = self.phases.get(phase, 0.0) + seconds
        self._last = t
        return seconds

    @property
    def total(self) -> float:
        """Seconds from ``t0`` to the last mark."""
        return self._last - self.t0

    def metrics(self) -> dict[str, float]:
        """``timing/startup_s`` and ``startup/<phase>_s``."""
        return {"timing/startup_s": self.total, **{f"startup/{k}_s": v for k, v in self.phases.items()}}

    def summary(self) -> str:
        parts = ", ".join(f"{k} {v:.2f}" for k, v in self.phases.items())
        return f"start-up {self.total:.2f} s since gkd train started ({parts})"


def service_wait_s() -> float:
    """How long the trainer waits for the services' workers: ``GKD_SERVICE_WAIT_S`` (the launcher started
    the services with it), else 0 (services started separately must be up already)."""
    try:
        return max(float(os.environ.get(SERVICE_WAIT_ENV) or 0), 0.0)
    except ValueError:
        return 0.0


def worker_processes(reply: dict) -> int:
    """Worker processes in a broker's info reply: a worker with several requests in flight is listed once
    per slot (``gkd.services.transport.worker``), so entries are counted by their ``host`` and ``pid``."""
    infos = [w.get("info", {}) for w in reply.get("workers", [])]
    slotted = {(i.get("host"), i.get("pid")) for i in infos if "slot" in i}
    return len(slotted) + sum("slot" not in i for i in infos)


def wait_for_workers(info: Callable[[], dict], want: int, timeout_s: float, *, poll_s: float = 0.1) -> dict:
    """Poll ``info()`` (a broker's info reply) until it lists ``want`` workers or ``timeout_s`` passes;
    returns the last reply. An unreachable broker (still starting) counts as no workers until the end,
    when its error propagates."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            reply = info()
        except (TimeoutError, OSError, RuntimeError):
            if time.monotonic() >= deadline:
                raise
            reply = None
        if reply is not None and (worker_processes(reply) >= want or time.monotonic() >= deadline):
            return reply
        time.sleep(poll_s)


def service_info(client, workers: int, launched: bool, timeout_s: float) -> dict:
    """A service's info reply for the trainer's start-up check: right away (``timeout_s``) for a service
    started separately; for one ``gkd train`` started with the trainer (``launched`` and
    ``GKD_SERVICE_WAIT_S`` set), once ``workers`` workers have registered (or that wait is over)."""
    wait_s = service_wait_s() if launched else 0.0
    if wait_s <= 0:
        return client.info(timeout_s=timeout_s)
    return wait_for_workers(lambda: client.info(timeout_s=min(2.0, timeout_s)), workers, wait_s)
