"""Helpers: an in-process service (broker + worker threads on free ports) with an echo/sum handler."""

import contextlib
import os
import socket
import threading
import time

import torch

from gkd.services.transport.broker import Broker
from gkd.services.transport.client import Client
from gkd.services.transport.worker import Worker

OPS = ("sum",)
FAST = {"heartbeat_interval_s": 0.05, "heartbeat_timeout_s": 0.4}


def make_handler(name: str, delay_s: float = 0.0, release: threading.Event | None = None):
    """Echo/sum handler. Fields: ``sleep`` (seconds), ``fail`` (raise), ``tag`` (echoed back).
    If ``release`` is given, every request blocks until it is set (a hung worker), at most 20 s."""

    def handle(header, tensors):
        if release is not None:
            release.wait(20)
        time.sleep(header.get("sleep", 0.0) + delay_s)
        if header.get("fail"):
            raise RuntimeError("asked to fail")
        total = sum(float(t.double().sum()) for t in tensors.values())
        out = {k: t.clone() for k, t in tensors.items()}
        return {"sum": total, "tag": header.get("tag"), "worker": name, "pid": os.getpid()}, out

    return handle


def wait_for(predicate, timeout_s: float = 10.0, what: str = "condition"):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.01)
    raise TimeoutError(f"timed out after {timeout_s}s waiting for {what}")


class Service:
    """A broker and named workers in threads; ``client()`` makes clients that are closed on exit."""

    def __init__(self, broker_kwargs=None):
        kwargs = {**FAST, **(broker_kwargs or {})}
        self.auth = kwargs.get("auth")
        self.broker = Broker(OPS, frontend_port=0, backend_port=0, **kwargs).start()
        self.workers: dict[str, Worker] = {}
        self.clients: list[Client] = []
        self.probe = self.client(timeout_s=5.0)

    def info(self) -> dict:
        """The broker's info, asked over the wire (the broker's state belongs to its thread)."""
        return self.probe.info()

    def add_worker(self, name: str, wait: bool = True, **kwargs) -> Worker:
        handler_kwargs = {k: kwargs.pop(k) for k in ("delay_s", "release") if k in kwargs}
        worker = Worker(
            self.broker.backend_address,
            make_handler(name, **handler_kwargs),
            ops=OPS,
            info={"name": name},
            **{**FAST, "auth": self.auth, **kwargs},
        ).start()
        self.workers[name] = worker
        if wait:
            wait_for(
                lambda: any(w["info"].get("name") == name for w in self.info()["workers"]),
                what=f"worker {name} to register",
            )
        return worker

    def client(self, **kwargs) -> Client:
        client = Client(self.broker.frontend_address, **{"timeout_s": 10.0, "auth": self.auth, **kwargs})
        self.clients.append(client)
        return client

    def close(self):
        for c in self.clients:
            c.close()
        for w in self.workers.values():
            with contextlib.suppress(TimeoutError):
                w.stop()
        self.broker.stop()


def free_port() -> int:
    """A port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


class ServiceThreads:
    """A started broker and a list of started worker threads (the teacher's or rollout's), with clients of
    ``client_cls`` made by ``client()`` (30 s timeout and ``client_defaults`` unless overridden); waits for
    every worker to register. ``close()`` closes the clients, then stops the workers and the broker."""

    def __init__(self, broker, workers, client_cls, **client_defaults):
        self.broker, self.workers, self.clients = broker, workers, []
        self._client_cls, self._client_defaults = client_cls, {"timeout_s": 30.0, **client_defaults}
        probe = self.client()
        wait_for(lambda: len(probe.info()["workers"]) == len(workers), what=f"{len(workers)} workers")

    def client(self, **kwargs):
        self.clients.append(
            self._client_cls(self.broker.frontend_address, **{**self._client_defaults, **kwargs})
        )
        return self.clients[-1]

    def close(self):
        for c in self.clients:
            c.close()
        for w in self.workers:
            w.stop()
        self.broker.stop()


def tensors_for(i: int):
    return {"x": torch.arange(i, i + 5, dtype=torch.int64), "y": torch.full((2, 3), float(i))}
