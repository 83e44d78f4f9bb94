"""A service with one worker whose restart takes longer than the broker's ``no_worker_grace_s``: the
request the dead worker held waits for the restarted one (``worker_restart_grace_s``) instead of failing
with ``no_workers``. Times scaled down: grace 1 s, reload 3 s, restart grace 30 s. The supervision is the
one ``gkd teacher|rollout serve`` runs (``serve_broker``); the workers are light processes (a stand-in
engine whose reload is a sleep)."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from gkd.services.transport.broker import Broker
from gkd.services.transport.client import Client
from gkd.services.transport.process import serve_broker
from gkd.services.transport.worker import Worker
from tests.transport.helpers import FAST, OPS, wait_for

ROOT = Path(__file__).resolve().parents[2]
RELOAD_S = 3.0


def _spawn(backend: str, mode: str) -> subprocess.Popen:
    argv = [sys.executable, "-m", "tests.transport.test_restart_grace", backend, mode]
    return subprocess.Popen(argv, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"})


def _serve(broker: Broker, stop: threading.Event, spawned: list[str]) -> int:
    def spawn(backend: str, i: int) -> subprocess.Popen:
        mode = "die" if not spawned else "slow"  # the first one dies on its first request
        spawned.append(mode)
        return _spawn(backend, mode)

    log = logging.getLogger("test")
    return serve_broker("test", broker, 1, spawn, stop, what="worker", detail="", svc_log=log)


def test_a_request_waits_for_a_slow_restart_instead_of_failing_without_workers():
    broker = Broker(
        OPS, frontend_port=0, backend_port=0, no_worker_grace_s=1.0, worker_restart_grace_s=30.0, **FAST
    )
    stop, spawned = threading.Event(), []
    with ThreadPoolExecutor(1) as pool:
        served = pool.submit(_serve, broker, stop, spawned)
        try:
            wait_for(lambda: broker.frontend_address, 30, "the broker up")
            client = Client(broker.frontend_address, timeout_s=60.0, retries=0)
            try:
                wait_for(lambda: len(client.info()["workers"]) == 1, 60, "the first worker")
                # the worker dies holding it; its restart loads for RELOAD_S, longer than the grace
                reply = client.call("sum", {"tag": 7})
                assert reply.fields["tag"] == 7 and reply.fields["mode"] == "slow"
                info = client.info()
                assert spawned == ["die", "slow"]
                assert info["stats"]["workers_lost"] == 1 and info["stats"]["errors_sent"] == 0
                assert info["restarting_s"] == 0  # the awaited worker is here
            finally:
                client.close()
        finally:
            stop.set()
            assert served.result(timeout=60) == 0


def _child(backend: str, mode: str) -> None:
    if mode == "slow":
        time.sleep(RELOAD_S)  # the reload of a large engine, scaled down

    def handle(header, tensors):
        if mode == "die":
            os._exit(3)
        return {"tag": header.get("tag"), "mode": mode}, None

    Worker(backend, handle, ops=OPS, **FAST).run()


if __name__ == "__main__":
    _child(sys.argv[1], sys.argv[2])
