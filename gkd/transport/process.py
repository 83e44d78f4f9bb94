"""Process plumbing shared by the services: signals, supervised worker processes, orphan detection.

A supervisor (``gkd teacher serve`` / ``gkd rollout serve``) starts its workers as child processes and
passes its pid in ``GKD_PARENT_PID``; a child whose parent is gone exits by itself, so a SIGKILLed
supervisor does not leave engines holding memory.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable

from gkd.transport.auth import Auth

log = logging.getLogger("gkd.service")

PARENT_ENV = "GKD_PARENT_PID"
STOP_GRACE_S = 10.0


def stop_on_signals() -> threading.Event:
    """An event set by SIGINT/SIGTERM (installed in the main thread)."""
    stop = threading.Event()

    def handle(signum, _frame):
        log.info("received %s, shutting down", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGINT, handle)
    signal.signal(signal.SIGTERM, handle)
    return stop


def orphaned() -> bool:
    parent = os.environ.get(PARENT_ENV)
    return parent is not None and os.getppid() != int(parent)


def supervise(children: list[subprocess.Popen], stop: threading.Event) -> int:
    """Wait for a stop signal (-> 0), or for every child to exit (-> 1); then stop the rest."""
    reported: set[int] = set()
    try:
        while not stop.wait(0.5):
            for child in children:
                if child.poll() is not None and child.pid not in reported:
                    reported.add(child.pid)
                    log.error("worker process %d exited with status %d", child.pid, child.returncode)
            if len(reported) == len(children):
                log.error("all worker processes have exited")
                return 1
            if orphaned():
                log.error("supervisor is gone; exiting")
                return 1
        return 0
    finally:
        stop_children(children)


def stop_children(children: list[subprocess.Popen]) -> None:
    for child in children:
        if child.poll() is None:
            child.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + STOP_GRACE_S
    for child in children:
        try:
            child.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            log.warning("worker process %d ignored SIGTERM for %.0fs; killing it", child.pid, STOP_GRACE_S)
            child.kill()
            child.wait()


def auth_from_file(auth_secret_file: str | None) -> Auth | None:
    return Auth.from_file(auth_secret_file) if auth_secret_file else None


def run_until_stopped(worker, stop: threading.Event) -> int:
    """Run a started-to-be transport worker until ``stop`` is set (-> 0) or the supervisor is gone (-> 1)."""
    worker.start()
    try:
        while not stop.wait(0.5):
            if orphaned():
                log.error("worker %d: supervisor is gone; exiting", os.getpid())
                return 1
        return 0
    finally:
        worker.stop()


def serve_broker(
    name: str,
    broker,
    workers: int,
    spawn: Callable[[str, int], subprocess.Popen],
    stop: threading.Event,
    *,
    what: str,
    detail: str,
    svc_log: logging.Logger,
) -> int:
    """Start ``broker``, spawn ``workers`` children with ``spawn(backend_address, i)`` and supervise them
    until ``stop``; the broker stops last. ``detail`` goes in the "broker up" line, e.g. ``auth on``."""
    broker.start()
    # Children reach the backend on loopback even when it is bound to 0.0.0.0.
    backend_local = "tcp://127.0.0.1:" + broker.backend_address.rsplit(":", 1)[1]
    svc_log.info(
        "%s broker up: clients %s, workers %s (%s); starting %d %s",
        name,
        broker.frontend_address,
        broker.backend_address,
        detail,
        workers,
        what,
    )
    children = [spawn(backend_local, i) for i in range(workers)]
    try:
        return supervise(children, stop)
    finally:
        broker.stop()
        svc_log.info("%s service stopped", name)


def configure_logging(level: str = "INFO") -> None:
    logging.basicConfig(
        level=level, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s[%(process)d] %(message)s"
    )
