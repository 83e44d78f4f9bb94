"""Worker base: serves requests from a broker's backend through a handler callable, one at a time per slot.

    def handle(header: dict, tensors: dict[str, Tensor]) -> tuple[dict | None, dict[str, Tensor] | None]:
        ...  # header = the request's full header (header["op"], header["id"], op-specific fields)
        return {"n": 3}, {"out": out}  # reply fields and tensors (contiguous CPU tensors / numpy arrays)

    Worker("tcp://broker:15556", handle, ops=("score",), info={"model": ..., "vocab_size": ...}).run()

The worker connects a DEALER to the backend (so workers on other machines can join), announces READY with
its ``info`` (plus pid, host, ops, protocol), and then loops: the socket is owned by the loop's thread;
the handler runs in a separate thread so heartbeats keep flowing while it works (a long request is not a
dead worker). A handler exception becomes a ``handler_error`` reply and a request that fails decoding a
``bad_request`` reply; either way the worker keeps serving. If the broker is not heard from for
``heartbeat_timeout_s``, the worker replaces its socket and announces itself again (the broker restarted
or the network dropped); an unfinished request is still answered on the new socket, and the broker
drops that reply if the request was given to someone else meanwhile.

A worker can step away from the broker without going away: while its ``available()`` returns False it
is not listed (BYE; it keeps heartbeating and comes back with READY), and a handler that cannot serve its
request here for now raises ``HandBack``: the worker says BYE, so the broker gives the request to another
worker (the rollout service: a worker that lost its weight channel and waits to rejoin it). A worker
whose ``failure()`` names a reason is broken for good (the rollout service: its weight-channel thread
died): it is not listed either, and its process exits so that its supervisor restarts it
(``gkd.services.transport.process.run_until_stopped``).

Several requests in flight (``max_in_flight`` n > 1, for engines that batch concurrent requests
themselves, e.g. vLLM's): the worker runs n slots, each a socket of its own that the broker lists as a
worker (its ``info`` adds ``slot`` and ``slots``), each holding at most one request; their handler threads
call the one handler (and engine) concurrently. The broker needs no change: it gives each idle slot a
request, least recently idle first.

Cancellation is cooperative: when the broker takes a running job back (its client gave up, or it ran
past the job deadline) it sends CANCEL; the job's event is set and a handler that calls
``check_cancelled()`` (e.g. once per generated token) stops with ``Cancelled``. Long waits inside a
handler can wait on ``cancel_event()`` instead of sleeping.
"""

from __future__ import annotations

import contextlib
import os
import socket as _socket
import struct
import threading
import time
from collections.abc import Callable, Collection, Mapping
from typing import Any

import msgpack
import torch
import zmq

from gkd.services.transport import auth as _auth
from gkd.services.transport.auth import Auth, AuthError
from gkd.services.transport.cancel import Cancelled, _current, cancel_event, check_cancelled  # noqa: F401 (re-exported)
from gkd.services.transport.codec import (
    DEFAULT_LIMITS,
    PROTOCOL_VERSION,
    Limits,
    ProtocolError,
    decode,
    error_frames,
    peek_id,
    reply_frames,
)
from gkd.services.transport.protocol import (
    BYE,
    CANCEL,
    HEARTBEAT,
    READY,
    REPLY,
    REQUEST,
    RESET,
    Serving,
    tcp_address,
)

Handler = Callable[
    [dict[str, Any], dict[str, torch.Tensor]],
    tuple[Mapping[str, Any] | None, Mapping[str, Any] | None],
]


class HandBack(RuntimeError):
    """Raised by a handler that cannot serve its request on this worker for now: the worker leaves the
    broker (which re-queues the request for another worker, counting the attempt) and announces itself
    again once its ``available()`` is true."""


class _Job:
    """One request being handled in its own thread; ``frames`` holds the reply once ``done`` is set."""

    def __init__(self, jid: bytes, rid: Any):
        self.jid, self.rid = jid, rid
        self.frames: list | None = None
        self.handed_back = False  # the handler raised HandBack: no reply, the broker re-queues the job
        self.done = threading.Event()
        self.cancel = threading.Event()


class Worker(Serving):
    """Serve ``handler`` behind a broker backend; ``run(stop)`` blocks, ``start()``/``stop()`` thread it.

    Use the broker's heartbeat settings: the worker declares the broker gone after ``heartbeat_timeout_s``
    without a message from it, so that must exceed the broker's ``heartbeat_interval_s`` several times.
    """

    thread_name = "gkd-worker"

    def __init__(
        self,
        address: str,
        handler: Handler,
        *,
        ops: Collection[str],
        info: Mapping[str, Any] | None = None,
        limits: Limits = DEFAULT_LIMITS,
        auth: Auth | None = None,
        heartbeat_interval_s: float = 1.0,
        heartbeat_timeout_s: float = 5.0,
        context: zmq.Context | None = None,
        available: Callable[[], bool] | None = None,
        failure: Callable[[], str | None] | None = None,
        max_in_flight: int = 1,
    ):
        self.address = tcp_address(address)
        self.available = available  # False: not listed at the broker (see the module docstring)
        self._failure = failure
        self.handler = handler
        self.ops = frozenset(ops)
        self.info = {
            **(info or {}),
            "pid": os.getpid(),
            "host": _socket.gethostname(),
            "ops": sorted(self.ops),
            "protocol": PROTOCOL_VERSION,
        }
        self.limits, self.auth = limits, auth
        self.heartbeat_interval_s, self.heartbeat_timeout_s = heartbeat_interval_s, heartbeat_timeout_s
        self._ctx = context
        # slots: each its own socket (its own entry at the broker) and its own request, one handler
        self.max_in_flight = max(1, int(max_in_flight))
        self._count = threading.Lock()
        self.served = 0
        self.auth_failures = 0
        self.reconnects = 0
        # start() (serve in a daemon thread), stop(), with: Serving

    def failure(self) -> str | None:
        """Why this worker can serve no longer (its process should exit and be restarted), or None.
        A failed worker is not listed at the broker."""
        return None if self._failure is None else self._failure()

    def _listable(self) -> bool:
        return (self.available is None or self.available()) and self.failure() is None

    # ------------------------------------------------------------------------------------------ loop

    def run(self, stop: threading.Event | None = None, ready: threading.Event | None = None) -> None:
        """Serve until ``stop`` is set (checked at least every 100 ms); says BYE on the way out. With
        ``max_in_flight`` n > 1, n slots serve side by side (module docstring); ``ready`` once all are."""
        stop = stop or threading.Event()
        n = self.max_in_flight
        if n == 1:
            return self._run_slot(stop, ready, self.info)
        readies = [threading.Event() for _ in range(n)]
        threads = [
            threading.Thread(
                target=self._run_slot,
                args=(stop, readies[i], {**self.info, "slot": i, "slots": n}),
                name=f"{self.thread_name}-slot{i}",
                daemon=True,
            )
            for i in range(1, n)
        ]
        for t in threads:
            t.start()
        if ready is not None:
            threading.Thread(
                target=lambda: all(r.wait() for r in readies) and ready.set(), daemon=True
            ).start()
        try:
            self._run_slot(stop, readies[0], {**self.info, "slot": 0, "slots": n})
        finally:
            stop.set()
            for t in threads:
                t.join()

    def _run_slot(self, stop: threading.Event, ready: threading.Event | None, info: dict) -> None:
        """One slot: its own socket, at most one request at a time."""
        hello = msgpack.packb(info, use_bin_type=True)
        ctx = self._ctx or zmq.Context()
        # The handler thread wakes the loop through this pair the moment a reply is ready.
        wake_r, wake_w = _socket.socketpair()
        wake_r.setblocking(False)
        sock = self._connect(ctx)
        job: _Job | None = None
        # announce: READY is owed once idle and available (first start, a RESET from the broker, a new
        # socket, back from a pause); listed: the broker has us as a worker
        announce, listed = True, False
        try:
            if self._listable():
                self._send(sock, [READY, hello])
                announce, listed = False, True
            if ready is not None:
                ready.set()
            last_heard = time.monotonic()
            next_beat = last_heard + self.heartbeat_interval_s
            poller = zmq.Poller()
            poller.register(sock, zmq.POLLIN)
            poller.register(wake_r, zmq.POLLIN)
            while not stop.is_set():
                wait_s = min(max(0.0, next_beat - time.monotonic()), 0.1)
                events = dict(poller.poll(wait_s * 1000))
                if sock in events:
                    while True:
                        try:
                            frames = sock.recv_multipart(zmq.NOBLOCK, copy=False)
                        except zmq.Again:
                            break
                        try:
                            frames = _auth.verify(self.auth, frames, _auth.BROKER_TO_WORKER)
                        except AuthError:
                            with self._count:
                                self.auth_failures += 1
                            continue
                        last_heard = time.monotonic()
                        kind = frames[0].bytes
                        if kind == REQUEST and len(frames) >= 3:
                            if job is not None:  # the broker never does this; answer rather than stall it
                                rid = peek_id(frames[2:], self.limits)
                                self._send(sock, [REPLY, frames[1].bytes, *error_frames(rid, "busy", "busy")])
                            else:
                                job = self._start_job(frames[1].bytes, frames[2:], wake_w)
                        elif kind == CANCEL and len(frames) == 2:
                            if job is not None and job.jid == frames[1].bytes:
                                job.cancel.set()
                        elif kind == RESET:
                            announce, listed = True, False
                if wake_r.fileno() in events:  # raw sockets are reported by fd
                    _drain_wakeups(wake_r)
                if job is not None and job.done.is_set():
                    if not job.handed_back:
                        self._send(sock, [REPLY, job.jid, *job.frames])
                        with self._count:
                            self.served += 1
                    elif listed:  # the broker re-queues the job when its worker leaves
                        self._send(sock, [BYE])
                        announce, listed = True, False
                    job = None
                now = time.monotonic()
                if now - last_heard > self.heartbeat_timeout_s:
                    poller.unregister(sock)
                    sock.close(0)  # a silent broker: replace the socket, never keep a possibly-broken one
                    sock = self._connect(ctx)
                    poller.register(sock, zmq.POLLIN)
                    with self._count:
                        self.reconnects += 1
                    announce, listed, last_heard = True, False, now
                available = self._listable()
                if listed and not available and job is None:
                    self._send(sock, [BYE])
                    announce, listed = True, False
                if announce and available and job is None:
                    self._send(sock, [READY, hello])
                    announce, listed = False, True
                if now >= next_beat:
                    self._send(sock, [HEARTBEAT])
                    next_beat = now + self.heartbeat_interval_s
            self._send(sock, [BYE])
        finally:
            sock.close(linger=100)  # give BYE a moment to leave
            wake_r.close()
            wake_w.close()
            if self._ctx is None:
                ctx.term()

    def _connect(self, ctx: zmq.Context) -> zmq.Socket:
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.MAXMSGSIZE, self.limits.max_message_bytes + 4096)
        sock.connect(self.address)
        return sock

    def _send(self, sock: zmq.Socket, frames: list) -> None:
        sock.send_multipart(_auth.sign(self.auth, frames, _auth.WORKER_TO_BROKER), copy=False)

    def _start_job(self, jid: bytes, frames: list, wake: _socket.socket) -> _Job:
        """Decode in the loop thread; run the handler in its own (daemon) thread."""
        if len(jid) != 8:
            jid = struct.pack(">Q", 0)
        try:
            msg = decode(frames, ops=self.ops, limits=self.limits)
        except ProtocolError as e:
            job = _Job(jid, peek_id(frames, self.limits))
            job.frames = error_frames(job.rid, "bad_request", str(e))
            job.done.set()
            return job
        job = _Job(jid, msg.id)

        def run_handler() -> None:
            _current.cancel = job.cancel
            try:
                fields, tensors = self.handler(msg.header, msg.tensors)
                job.frames = reply_frames(job.rid, fields, tensors)
            except HandBack:
                job.handed_back = True
            except Exception as e:  # any handler failure is the requester's answer, not the worker's death
                job.frames = error_frames(job.rid, "handler_error", f"{type(e).__name__}: {e}")
            job.done.set()
            with contextlib.suppress(OSError):  # the loop already shut down; nobody waits for this reply
                wake.send(b"\0")

        threading.Thread(target=run_handler, name="gkd-handler", daemon=True).start()
        return job


def _drain_wakeups(sock: _socket.socket) -> None:
    with contextlib.suppress(BlockingIOError, InterruptedError):
        while sock.recv(4096):
            pass
