"""Load-balancing broker: ROUTER frontend for clients, ROUTER backend for workers.

Routing (see ``protocol.py`` for the envelopes):
- Workers announce ``READY`` with their info and are given a request only when idle (least recently
  used first), so a slow worker never accumulates a queue: load balancing by readiness, not round-robin.
- Client requests are validated (``codec.decode_header`` with the service's op allow-list and ``Limits``)
  before they are queued; a malformed one gets a ``bad_request`` error naming what was wrong. The queue
  is bounded (``max_queue``); when full, a request gets a ``busy`` error at once.
- ``info``/``ping`` are answered by the broker: protocol version, ops, live workers and their info,
  queue length and counters (``auth_failures`` among them).
- Heartbeats both ways every ``heartbeat_interval_s``. A worker not heard from for
  ``heartbeat_timeout_s`` (dead, or so wedged that its heartbeat thread stopped) is dropped and its
  in-flight request is re-queued at the front. A request dispatched ``max_attempts`` times without a
  reply fails with ``worker_failed`` (a request that kills every worker must not kill them all).
- Exactly one reply per request, and only from the worker the job was given to: a late reply from a
  worker the job had been taken from (it came back, the request was re-queued, or the broker restarted:
  job ids carry a random per-broker epoch) is dropped and counted.
- Per-job deadline ``job_timeout_s``: a worker that heartbeats but does not answer in time loses the job
  (it gets a CANCEL and stays busy until it answers; the request goes to another worker).
- ``cancel`` from a client withdraws one of its requests (after the client's own timeout), so a request
  nobody waits for does not keep a worker busy.
- The queue is bounded in requests (``max_queue``) and in bytes (``max_queue_bytes``, queued and running).
  Before that, each socket bounds what a peer can make it hold: messages up to the service's limits
  (``limits`` on the frontend, ``reply_limits`` on the backend; ``MAXMSGSIZE``), at most ``receive_hwm``
  unread per peer (``RCVHWM``); each loop turn reads at most 256 messages or 64 MiB per socket, so a flood
  (junk failing authentication is dropped and counted: ``auth_failures``) cannot hold up heartbeats.
- A frontend or backend bound beyond loopback without ``auth`` logs a warning: anyone who can reach the
  backend port can register as a worker, read the prompts and return forged results.
- No workers: requests wait up to ``no_worker_grace_s`` (since start, or since the last worker left) for
  one to join; after that queued and new requests fail with ``no_workers``. While a worker is known to be
  (re)starting (``note_restart``: its supervisor spawned it) they wait up to ``worker_restart_grace_s``
  instead: a single worker that reloads a large engine for minutes does not end the run.
"""

from __future__ import annotations

import collections
import logging
import os
import struct
import threading
import time
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

import msgpack
import zmq

from gkd.services.transport import auth as _auth
from gkd.services.transport.auth import Auth, AuthError
from gkd.services.transport.codec import (
    DEFAULT_LIMITS,
    PROTOCOL_VERSION,
    REPLY_OPS,
    Limits,
    ProtocolError,
    decode_header,
    error_frames,
    peek_id,
    reply_frames,
)
from gkd.services.transport.protocol import (
    BYE,
    CANCEL,
    CANCEL_OP,
    DEFAULT_BACKEND_PORT,
    DEFAULT_FRONTEND_PORT,
    HEARTBEAT,
    INFO_OPS,
    LOOPBACK_HOSTS,
    READY,
    REPLY,
    REQUEST,
    RESET,
    Serving,
    bind,
)

log = logging.getLogger("gkd.broker")

_MAX_INFO_BYTES = 1 << 16
_DRAIN = 256  # messages read per socket per loop turn, so neither side starves the other
_DRAIN_BYTES = 64 << 20  # and at most this many bytes (each is MAC'd): heartbeats keep their pace in a flood


@dataclass
class _Job:
    jid: int
    client: bytes
    rid: Any
    frames: list  # codec frames of the request (auth trailer removed)
    attempts: int = 0
    worker: bytes | None = None
    nbytes: int = 0
    dispatched_at: float = 0.0


@dataclass
class _Worker:
    ident: bytes
    info: dict
    last_seen: float
    job: int | None = None
    served: int = 0


@dataclass
class _Stats:
    requests: int = 0
    replies: int = 0
    errors_sent: int = 0
    bad_requests: int = 0
    bad_backend_messages: int = 0
    busy_rejections: int = 0
    auth_failures: int = 0  # messages dropped unanswered: they failed authentication
    reads_deferred: int = 0  # loop turns that left messages queued in a socket (read budget spent)
    requeued: int = 0
    late_replies_dropped: int = 0
    workers_lost: int = 0
    jobs_timed_out: int = 0
    cancelled: int = 0


class Broker(Serving):
    """The broker. ``run(stop)`` serves in the calling thread; ``start()``/``stop()`` in a background one.

    ``ops`` is the allow-list of ops forwarded to workers (e.g. ``("score",)``); ``frontend_port``/
    ``backend_port`` 0 pick free ports (read ``frontend_address``/``backend_address`` after ``start``).
    """

    thread_name = "gkd-broker"

    def __init__(
        self,
        ops: Collection[str],
        *,
        host: str = "127.0.0.1",
        frontend_port: int = DEFAULT_FRONTEND_PORT,
        backend_port: int = DEFAULT_BACKEND_PORT,
        backend_host: str | None = None,
        limits: Limits = DEFAULT_LIMITS,
        reply_limits: Limits = DEFAULT_LIMITS,
        auth: Auth | None = None,
        max_queue: int = 1024,
        max_queue_bytes: int = 1 << 30,
        job_timeout_s: float | None = 3600.0,
        heartbeat_interval_s: float = 1.0,
        heartbeat_timeout_s: float = 5.0,
        no_worker_grace_s: float = 30.0,
        worker_restart_grace_s: float = 600.0,
        max_attempts: int = 3,
        receive_hwm: int = 64,
        context: zmq.Context | None = None,
    ):
        clash = set(ops) & (set(INFO_OPS) | set(REPLY_OPS) | {CANCEL_OP})
        if clash:
            raise ValueError(f"ops {sorted(clash)} are reserved by the broker")
        self.ops = frozenset(ops)
        self.host, self.backend_host = host, backend_host or host
        self.frontend_port, self.backend_port = frontend_port, backend_port
        self.limits, self.reply_limits, self.auth = limits, reply_limits, auth
        self.max_queue, self.max_attempts = max_queue, max_attempts
        self.max_queue_bytes, self.job_timeout_s = max_queue_bytes, job_timeout_s
        self.heartbeat_interval_s, self.heartbeat_timeout_s = heartbeat_interval_s, heartbeat_timeout_s
        self.no_worker_grace_s, self.worker_restart_grace_s = no_worker_grace_s, worker_restart_grace_s
        self.receive_hwm = receive_hwm
        # until when requests wait for a worker known to be (re)starting (see note_restart); set from the
        # supervisor's thread, read in the broker's (a float assignment is atomic)
        self._restart_until = 0.0
        self._ctx = context
        self.frontend_address: str | None = None
        self.backend_address: str | None = None
        self.stats = _Stats()
        self._workers: dict[bytes, _Worker] = {}
        self._idle: collections.deque[bytes] = collections.deque()
        self._queue: collections.deque[int] = collections.deque()
        self._jobs: dict[int, _Job] = {}
        self._epoch = int.from_bytes(os.urandom(4), "big") << 32  # job ids never repeat across restarts
        self._next_jid = 1
        self._queued_bytes = 0
        self._no_worker_since = time.monotonic()

    # start() (serve in a daemon thread; returns once both sockets are bound), stop(), with: Serving
    def run(self, stop: threading.Event | None = None, ready: threading.Event | None = None) -> None:
        """Serve until ``stop`` is set (checked at least every 100 ms)."""
        stop = stop or threading.Event()
        ctx = self._ctx or zmq.Context()
        front, back = ctx.socket(zmq.ROUTER), ctx.socket(zmq.ROUTER)
        try:
            for s, limits in ((front, self.limits), (back, self.reply_limits)):
                s.setsockopt(zmq.LINGER, 0)
                # libzmq drops the connection of a peer that sends a bigger frame, before we read it.
                s.setsockopt(zmq.MAXMSGSIZE, limits.max_message_bytes + 4096)
                # at most this many unread messages per peer; past it libzmq stops reading that peer's
                # connection (its sends block), so memory is bounded before anything is authenticated
                s.setsockopt(zmq.RCVHWM, self.receive_hwm)
            self.frontend_address = bind(front, self.host, self.frontend_port)
            self.backend_address = bind(back, self.backend_host, self.backend_port)
            self._warn_if_exposed()
            self._front, self._back = front, back
            self._no_worker_since = time.monotonic()
            if ready is not None:
                ready.set()
            self._loop(stop)
        finally:
            front.close(0)
            back.close(0)
            if self._ctx is None:
                ctx.term()

    def note_restart(self) -> None:
        """A worker of this service is (re)starting (its supervisor just spawned it): without workers,
        requests wait for it up to ``worker_restart_grace_s`` rather than ``no_worker_grace_s`` (loading a
        large engine takes minutes). Ends when a worker registers. Callable from any thread."""
        self._restart_until = time.monotonic() + self.worker_restart_grace_s

    def _out_of_grace(self, now: float) -> bool:
        """No worker, and none is worth waiting for any longer."""
        return now - self._no_worker_since > self.no_worker_grace_s and now > self._restart_until

    def _warn_if_exposed(self) -> None:
        exposed = [
            f"{what} {addr}"
            for what, host, addr in (
                ("clients", self.host, self.frontend_address),
                ("workers", self.backend_host, self.backend_address),
            )
            if host not in LOOPBACK_HOSTS
        ]
        if exposed and self.auth is None:
            log.warning(
                "broker listens beyond loopback (%s) without authentication: anyone who can reach these "
                "ports can send requests, or join as a worker, read prompts and return forged results; "
                "pass --auth-secret-file FILE (the same file on every side) or bind 127.0.0.1",
                ", ".join(exposed),
            )

    def _loop(self, stop: threading.Event) -> None:
        poller = zmq.Poller()
        poller.register(self._front, zmq.POLLIN)
        poller.register(self._back, zmq.POLLIN)
        next_beat = time.monotonic() + self.heartbeat_interval_s
        while not stop.is_set():
            wait_ms = max(0.0, min(next_beat - time.monotonic(), 0.1)) * 1000
            events = dict(poller.poll(wait_ms))
            if self._back in events:  # workers first: a reply frees a worker for the next request
                self._drain(self._back, self._on_backend)
            if self._front in events:
                self._drain(self._front, self._on_frontend)
            now = time.monotonic()
            if now >= next_beat:
                self._heartbeat(now)
                next_beat = now + self.heartbeat_interval_s
            self._expire_without_workers(now)
            self._dispatch()

    def _drain(self, sock: zmq.Socket, handle) -> None:
        budget = _DRAIN_BYTES
        for _ in range(_DRAIN):
            try:
                msg = sock.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            if len(msg) >= 2:  # a ROUTER always prepends the identity; anything less is not a message
                handle(msg[0].bytes, msg[1:])
            budget -= sum(len(f) for f in msg)
            if budget <= 0:
                break
        self.stats.reads_deferred += 1

    # ------------------------------------------------------------------------------------ frontend

    def _send_client(self, client: bytes, frames: list) -> None:
        # A ROUTER silently drops a message for a peer that is gone (or whose queue is full): the client's
        # timeout and retry cover that, and the broker never blocks on one slow client.
        frames = _auth.sign(self.auth, frames, _auth.BROKER_TO_CLIENT)
        self._front.send_multipart([client, *frames], copy=False)

    def _error(self, client: bytes, rid: Any, code: str, message: str) -> None:
        self.stats.errors_sent += 1
        self._send_client(client, error_frames(rid, code, message))

    def _on_frontend(self, client: bytes, frames: list) -> None:
        try:
            frames = _auth.verify(self.auth, frames, _auth.CLIENT_TO_BROKER)
        except AuthError:
            self.stats.auth_failures += 1  # dropped without a reply: nothing to say to a stranger
            return
        try:
            header, _, _ = decode_header(frames, ops=self.ops | {*INFO_OPS, CANCEL_OP}, limits=self.limits)
        except ProtocolError as e:
            self.stats.bad_requests += 1
            self._error(client, peek_id(frames, self.limits), "bad_request", str(e))
            return
        op, rid = header["op"], header["id"]
        if op in INFO_OPS:
            self._send_client(client, reply_frames(rid, self.info()))
            return
        if op == CANCEL_OP:
            self._cancel(client, header.get("target"))
            return
        self.stats.requests += 1
        nbytes = sum(memoryview(getattr(f, "buffer", f)).nbytes for f in frames)
        if len(self._queue) >= self.max_queue or self._queued_bytes + nbytes > self.max_queue_bytes:
            self.stats.busy_rejections += 1
            self._error(
                client,
                rid,
                "busy",
                f"broker queue is full ({len(self._queue)} requests, {self._queued_bytes} bytes; limits "
                f"{self.max_queue} requests, {self.max_queue_bytes} bytes); retry later",
            )
            return
        if not self._workers and self._out_of_grace(time.monotonic()):
            self._error(client, rid, "no_workers", self._no_workers_message())
            return
        jid, self._next_jid = self._epoch | (self._next_jid & 0xFFFFFFFF), self._next_jid + 1
        self._jobs[jid] = _Job(jid, client, rid, frames, nbytes=nbytes)
        self._queued_bytes += nbytes
        self._queue.append(jid)

    def _forget(self, jid: int) -> _Job | None:
        """Drop a job from the books (answered, failed or withdrawn); unqueue it if it waits."""
        job = self._jobs.pop(jid, None)
        if job is not None:
            self._queued_bytes -= job.nbytes
            if job.worker is None and jid in self._queue:
                self._queue.remove(jid)
        return job

    def _cancel(self, client: bytes, target: Any) -> None:
        """Withdraw ``client``'s request ``target`` (its wire id): no reply is owed for either."""
        for job in list(self._jobs.values()):
            if job.client == client and job.rid == target and target is not None:
                self._forget(job.jid)
                self.stats.cancelled += 1
                if job.worker is not None:
                    self._send_worker(job.worker, [CANCEL, struct.pack(">Q", job.jid)])
                return

    def _no_workers_message(self) -> str:
        return (
            f"no workers connected to the broker backend {self.backend_address} for "
            f"{time.monotonic() - self._no_worker_since:.1f}s (start some, or check they can reach it)"
        )

    def info(self) -> dict[str, Any]:
        """What ``info``/``ping`` return. Reads state owned by the broker's thread: from any other thread
        ask over the wire (``Client.info()``) instead."""
        now = time.monotonic()
        workers = [
            {
                "id": w.ident.hex(),
                "info": w.info,
                "busy": w.job is not None,
                "served": w.served,
                "last_seen_s": round(now - w.last_seen, 3),
            }
            for w in self._workers.values()
        ]
        stats = dict(vars(self.stats))
        return {
            "protocol": PROTOCOL_VERSION,
            "ops": sorted(self.ops),
            "workers": workers,
            "queue": len(self._queue),
            "in_flight": sum(w.job is not None for w in self._workers.values()),
            "auth": self.auth is not None,
            "restarting_s": round(max(0.0, self._restart_until - now), 1),  # a worker awaited this long
            "stats": stats,
        }

    # ------------------------------------------------------------------------------------ backend

    def _send_worker(self, ident: bytes, frames: list) -> None:
        # Unroutable (worker gone) is dropped silently; the missing heartbeats then re-queue its request.
        frames = _auth.sign(self.auth, frames, _auth.BROKER_TO_WORKER)
        self._back.send_multipart([ident, *frames], copy=False)

    def _on_backend(self, ident: bytes, frames: list) -> None:
        try:
            frames = _auth.verify(self.auth, frames, _auth.WORKER_TO_BROKER)
        except AuthError:
            self.stats.auth_failures += 1
            return
        kind = _b(frames[0])
        worker = self._workers.get(ident)
        if worker is not None:
            worker.last_seen = time.monotonic()
        if kind == READY and len(frames) == 2:
            self._on_ready(ident, worker, frames[1])
        elif kind == HEARTBEAT and len(frames) == 1:
            if worker is None:
                self._send_worker(ident, [RESET])
        elif kind == REPLY and len(frames) >= 3 and len(_b(frames[1])) == 8:
            (jid,) = struct.unpack(">Q", _b(frames[1]))
            job = self._jobs.get(jid)
            if job is not None and job.worker == ident and worker is not None:
                self._complete(jid, list(frames[2:]))
            else:  # not this worker's job (any more): a stale reply never completes someone else's request
                self.stats.late_replies_dropped += 1
            if worker is None:
                self._send_worker(ident, [RESET])
            elif worker.job == jid:  # answered (or finally gave up on a job taken from it): idle again
                worker.job = None
                worker.served += 1
                self._idle.append(ident)
        elif kind == BYE and len(frames) == 1:
            if worker is not None:
                self._remove(worker)
        else:
            self.stats.bad_backend_messages += 1

    def _on_ready(self, ident: bytes, worker: _Worker | None, info_frame: Any) -> None:
        try:
            raw = _b(info_frame)
            info = msgpack.unpackb(raw, raw=False) if len(raw) <= _MAX_INFO_BYTES else None
        except (ValueError, TypeError, msgpack.UnpackException):
            info = None
        if not isinstance(info, dict):
            self.stats.bad_backend_messages += 1
            return
        if worker is not None:
            self._remove(worker, lost=False)  # re-announced (e.g. restarted): forget its old state
        self._workers[ident] = _Worker(ident, info, time.monotonic())
        self._idle.append(ident)
        self._restart_until = 0.0  # whoever was awaited is here (or another worker is)

    def _remove(self, worker: _Worker, lost: bool = False) -> None:
        del self._workers[worker.ident]
        if lost:
            self.stats.workers_lost += 1
        job = self._jobs.get(worker.job) if worker.job is not None else None
        if job is not None and job.worker == worker.ident:  # not one already taken from it
            self._requeue(job.jid)
        if not self._workers:
            self._no_worker_since = time.monotonic()

    def _requeue(self, jid: int) -> None:
        job = self._jobs.get(jid)
        if job is None:
            return
        job.worker = None
        if job.attempts >= self.max_attempts:
            self._forget(jid)
            self._error(
                job.client,
                job.rid,
                "worker_failed",
                f"request was given to {job.attempts} workers and each died, went silent or ran past the "
                f"job deadline ({self.job_timeout_s}s) before replying",
            )
            return
        self.stats.requeued += 1
        self._queue.appendleft(jid)

    def _complete(self, jid: int, frames: list) -> None:
        job = self._forget(jid)
        if job is None:
            return
        try:
            header, _, _ = decode_header(frames, ops=REPLY_OPS, limits=self.reply_limits)
            if header["id"] != job.rid:
                raise ProtocolError(f"reply id {header['id']!r} does not match request id {job.rid!r}")
        except ProtocolError as e:
            self.stats.bad_backend_messages += 1
            self._error(job.client, job.rid, "worker_failed", f"worker sent a malformed reply: {e}")
            return
        self.stats.replies += 1
        self._send_client(job.client, frames)

    def _heartbeat(self, now: float) -> None:
        for worker in list(self._workers.values()):
            if now - worker.last_seen > self.heartbeat_timeout_s:
                self._remove(worker, lost=True)
            else:
                self._send_worker(worker.ident, [HEARTBEAT])
        if self.job_timeout_s is None:
            return
        for job in list(self._jobs.values()):
            if job.worker is not None and now - job.dispatched_at > self.job_timeout_s:
                # alive (it heartbeats) but not answering: take the job back; the worker stays busy (its
                # worker.job still names this job) until it answers or dies, and its answer is dropped
                self.stats.jobs_timed_out += 1
                self._send_worker(job.worker, [CANCEL, struct.pack(">Q", job.jid)])
                self._requeue(job.jid)

    def _expire_without_workers(self, now: float) -> None:
        if self._workers or not self._queue or not self._out_of_grace(now):
            return
        message = self._no_workers_message()
        while self._queue:
            job = self._forget(self._queue[0])
            if job is None:
                self._queue.popleft()  # stale entry
            else:
                self._error(job.client, job.rid, "no_workers", message)

    def _dispatch(self) -> None:
        while self._queue and self._idle:
            ident = self._idle.popleft()
            worker = self._workers.get(ident)
            if worker is None or worker.job is not None:
                continue  # stale idle entry (worker gone or re-announced)
            job = self._jobs.get(self._queue.popleft())
            if job is None:
                self._idle.appendleft(ident)
                continue
            job.worker, job.attempts, worker.job = ident, job.attempts + 1, job.jid
            job.dispatched_at = time.monotonic()
            self._send_worker(ident, [REQUEST, struct.pack(">Q", job.jid), *job.frames])


def _b(frame: Any) -> bytes:
    return frame.bytes if hasattr(frame, "bytes") else bytes(frame)
