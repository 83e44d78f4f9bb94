"""Envelope constants shared by broker, worker and client, plus small socket helpers.

Frontend (client DEALER <-> broker ROUTER): a client sends codec frames ``[header, tensor...]`` (+ auth
trailer); the broker answers with codec frames: the worker's ``reply``/``error`` message, or its own
(``info``/``ping`` replies, ``busy``/``no_workers``/``bad_request``/``worker_failed`` errors).

Backend (worker DEALER <-> broker ROUTER), first frame = kind:

    worker -> broker   READY  info(msgpack map: model, vocab_size, max_top_k, pid, host...)
                       HB
                       REPLY  job_id(8 bytes)  codec frames of the reply
                       BYE
    broker -> worker   REQ    job_id(8 bytes)  codec frames of the request
                       HB
                       CANCEL job_id(8 bytes)   (the job was taken back: its client gave up, or it ran
                                                 past the broker's job deadline; stop it if it can be)
                       RESET  (the broker does not know this worker: send READY again when idle)

``job_id`` is the broker's, unique per request (not the client's id, which may collide across clients):
its high 32 bits are a random epoch drawn when the broker starts, so ids never repeat across a broker
restart, and a reply counts only when it comes from the worker the job was given to.

Client -> broker ``cancel`` (field ``target``: the wire id of an earlier request on the same connection)
withdraws that request: unqueued if waiting, CANCEL to its worker if running. No reply is owed for it.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import zmq

READY = b"READY"
HEARTBEAT = b"HB"
REQUEST = b"REQ"
REPLY = b"REPLY"
BYE = b"BYE"
RESET = b"RESET"
CANCEL = b"CANCEL"

#: Ops the broker answers itself.
INFO_OPS = ("info", "ping")
#: The op a client sends to withdraw one of its requests (handled by the broker, never forwarded).
CANCEL_OP = "cancel"
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")

DEFAULT_FRONTEND_PORT = 15555
DEFAULT_BACKEND_PORT = 15556


def tcp_address(address: str) -> str:
    """``"host:port"`` or ``"tcp://host:port"`` -> ``"tcp://host:port"`` (other transports pass through)."""
    if "://" in address:
        return address
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"address {address!r} is not HOST:PORT or a ZeroMQ endpoint like tcp://HOST:PORT")
    return f"tcp://{host}:{port}"


def bind(sock: zmq.Socket, host: str, port: int) -> str:
    """Bind to ``host:port`` (port 0 = a free port) and return the endpoint actually bound."""
    if port == 0:
        sock.bind(f"tcp://{host}:*")
    else:
        sock.bind(f"tcp://{host}:{port}")
    return sock.getsockopt_string(zmq.LAST_ENDPOINT)


class ServiceThread:
    """Runs ``target(stop_event, ready_event)`` in a daemon thread; ``start`` waits until it is ready."""

    def __init__(self, target: Callable[[threading.Event, threading.Event], None], name: str):
        self.stop_event = threading.Event()
        self._ready = threading.Event()
        self._error: BaseException | None = None

        def main() -> None:
            try:
                target(self.stop_event, self._ready)
            except BaseException as e:  # surfaced by start()/stop(), never swallowed
                self._error = e
                self._ready.set()
                raise

        self._thread = threading.Thread(target=main, name=name, daemon=True)

    def start(self, timeout_s: float = 10.0) -> None:
        self._thread.start()
        if not self._ready.wait(timeout_s):
            raise TimeoutError(f"{self._thread.name} did not start within {timeout_s}s")
        if self._error is not None:
            raise RuntimeError(f"{self._thread.name} failed to start: {self._error}") from self._error

    def stop(self, timeout_s: float = 10.0) -> None:
        self.stop_event.set()
        self._thread.join(timeout_s)
        if self._thread.is_alive():
            raise TimeoutError(f"{self._thread.name} did not stop within {timeout_s}s")

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()


class Serving:
    """``start()``/``stop()`` and the context manager for a class whose ``run(stop, ready)`` serves until
    ``stop`` is set: ``start`` runs it in a daemon thread named ``thread_name`` and returns once ready."""

    thread_name = "gkd-service"
    _service: ServiceThread | None = None

    def start(self):
        self._service = ServiceThread(self.run, name=self.thread_name)
        self._service.start()
        return self

    def stop(self) -> None:
        if self._service is not None:
            self._service.stop()
            self._service = None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
