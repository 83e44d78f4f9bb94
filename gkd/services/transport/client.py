"""Client: futures over one DEALER socket owned by a background I/O thread.

    with Client("127.0.0.1:15555", timeout_s=30, retries=2) as client:
        fut = client.submit("score", {"top_k": 64}, {"input_ids": ids, "lengths": lens})
        msg = fut.result()            # codec.Message: msg.fields, msg.tensors
        client.info()                 # the broker's info: workers, protocol, counters

- ``submit`` is thread-safe (any number of threads); it validates and encodes in the caller's thread
  (so a malformed request raises there), then hands the frames to the I/O thread. Tensors are sent
  zero-copy: do not modify them until the future is done.
- Every attempt gets a fresh wire id; a reply whose id is not awaited (the answer to an attempt that timed
  out) is dropped and counted in ``stats["late_replies"]``, so a future resolves exactly once.
- Per-attempt timeout ``timeout_s``; up to ``retries`` more attempts. On a timeout the socket is replaced
  at once (new connection, new identity) and the request resent on it; the old socket only drains the
  replies still owed to it and is closed when they arrive or time out -- a timed-out socket is never
  reused for new requests. ``busy`` errors are retried after ``backoff_s``; other error replies fail the
  future with ``RemoteError`` (``code``: ``bad_request``, ``handler_error``, ``no_workers``, ...).
- Liveness, not request duration, says whether the service is there: while requests are pending the
  client pings the broker (answered by the broker itself, even while every worker is busy) whenever it
  has heard nothing for a second; after ``liveness_timeout_s`` of silence every pending request fails at
  once with ``ServiceUnavailable`` (one line naming the address), whatever its own timeout. A long
  request on a live service only meets ``timeout_s``.
- An attempt that times out is withdrawn (``cancel`` to the broker), so it does not keep a worker busy.
- ``submit_split``/``plan_chunks``: split a large batch into micro-requests (spread over workers by the
  broker) and get the replies back in the original order.
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import queue
import socket as _socket
import threading
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import Future
from typing import Any

import zmq

from gkd.services.transport import auth as _auth
from gkd.services.transport.auth import Auth, AuthError
from gkd.services.transport.codec import (
    DEFAULT_LIMITS,
    ERROR,
    REPLY_OPS,
    Limits,
    Message,
    ProtocolError,
    decode,
    encode,
    peek_id,
    with_id,
)
from gkd.services.transport.protocol import CANCEL_OP, tcp_address

#: The broker op used as the liveness ping (answered by the broker, never by a worker).
_PING_OP = "ping"


class RemoteError(RuntimeError):
    """The service answered with an error; ``code`` is machine-readable, the text says what was wrong."""

    def __init__(self, code: str, message: str):
        super().__init__(f"[{code}] {message}")
        self.code, self.message = code, message


class ClientClosed(RuntimeError):
    """The client was closed before the request completed."""


class ServiceUnavailable(TimeoutError):
    """The broker stopped answering heartbeats: the service is down or unreachable."""


class _Request:
    def __init__(self, op: str, frames: list, timeout_s: float, retries: int, future: Future):
        self.op, self.frames, self.timeout_s, self.retries = op, frames, timeout_s, retries
        self.future = future
        self.attempts = 0
        # Covers the case where no attempt can even be queued (socket full, broker unreachable).
        self.give_up_at = time.monotonic() + timeout_s * (retries + 1)


class Client:
    """Thread-safe request/reply client of a broker frontend."""

    def __init__(
        self,
        address: str,
        *,
        timeout_s: float = 60.0,
        retries: int = 2,
        auth: Auth | None = None,
        limits: Limits = DEFAULT_LIMITS,
        backoff_s: float = 0.1,
        liveness_timeout_s: float | None = 15.0,
        context: zmq.Context | None = None,
    ):
        if liveness_timeout_s is not None and not liveness_timeout_s > 0:
            raise ValueError(f"liveness_timeout_s={liveness_timeout_s} must be > 0 seconds (or None: off)")
        self.address = tcp_address(address)
        self.timeout_s, self.retries, self.backoff_s = timeout_s, retries, backoff_s
        self.liveness_timeout_s = liveness_timeout_s
        self.auth, self.limits = auth, limits
        self._own_ctx = context is None
        self._ctx = context or zmq.Context()
        self.stats = {
            "sent": 0,
            "retries": 0,
            "reconnects": 0,
            "late_replies": 0,
            "bad_replies": 0,
            "cancelled": 0,
            "unavailable": 0,
        }
        self._inbox: queue.SimpleQueue[_Request | None] = queue.SimpleQueue()
        self._wake_r, self._wake_w = _socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._closed = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._io_loop, name="gkd-client-io", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------------------------ public API

    def submit(
        self,
        op: str,
        fields: Mapping[str, Any] | None = None,
        tensors: Mapping[str, Any] | None = None,
        *,
        timeout_s: float | None = None,
        retries: int | None = None,
    ) -> Future[Message]:
        """Send one request; the future resolves to the reply ``Message`` or raises ``RemoteError``,
        ``TimeoutError`` (after all attempts), ``ProtocolError`` (malformed reply) or ``ClientClosed``."""
        frames = encode(op, None, fields, tensors)  # caller mistakes raise here, in the caller's thread
        future: Future[Message] = Future()
        request = _Request(
            op,
            frames,
            self.timeout_s if timeout_s is None else timeout_s,
            self.retries if retries is None else retries,
            future,
        )
        with self._lock:  # close() takes it too: a request is either queued before close or refused
            if self._closed.is_set():
                raise ClientClosed("client is closed")
            self._inbox.put(request)
        self._wake()
        return future

    def call(self, op: str, fields=None, tensors=None, **kwargs: Any) -> Message:
        """``submit(...).result()``; the future itself enforces the timeout, so no extra wait here."""
        return self.submit(op, fields, tensors, **kwargs).result()

    def info(self, timeout_s: float = 5.0) -> dict[str, Any]:
        """The broker's ``info`` reply fields (protocol, workers and their info, queue, counters)."""
        return self.call("info", timeout_s=timeout_s, retries=0).fields

    def submit_split(
        self,
        op: str,
        parts: Sequence[tuple[Mapping[str, Any] | None, Mapping[str, Any] | None]],
        **kwargs: Any,
    ) -> Future[list[Message]]:
        """Submit micro-requests at once (the broker spreads them over idle workers); the returned future
        resolves to their replies *in the order of* ``parts``, or to the first failure (with its index)."""
        futures = [self.submit(op, fields, tensors, **kwargs) for fields, tensors in parts]
        combined: Future[list[Message]] = Future()
        remaining = [len(futures)]
        lock = threading.Lock()

        def on_done(_: Future) -> None:
            with lock:
                remaining[0] -= 1
                if remaining[0] or combined.done():
                    return
            for i, f in enumerate(futures):
                err = f.exception()
                if err is not None:
                    err.add_note(f"(micro-request {i} of {len(futures)})")
                    combined.set_exception(err)
                    return
            combined.set_result([f.result() for f in futures])

        if not futures:
            combined.set_result([])
        for f in futures:
            f.add_done_callback(on_done)
        return combined

    def close(self, timeout_s: float = 5.0) -> None:
        """Stop the I/O thread; unfinished futures fail with ``ClientClosed``."""
        with self._lock:
            if self._closed.is_set():
                return
            self._closed.set()
            self._inbox.put(None)
        if self._thread.is_alive():  # a finished I/O thread has closed its wake-up pair already
            with contextlib.suppress(OSError):
                self._wake()
        self._thread.join(timeout_s)
        if self._own_ctx and not self._thread.is_alive():
            self._ctx.term()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------------------------ I/O thread

    def _wake(self) -> None:
        with contextlib.suppress(BlockingIOError):  # pipe full of wake-ups already: the loop will run
            self._wake_w.send(b"\0")

    def _new_socket(self) -> zmq.Socket:
        sock = self._ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.MAXMSGSIZE, self.limits.max_message_bytes + 4096)
        sock.connect(self.address)
        return sock

    def _io_loop(self) -> None:
        io = _IOThread(self)
        try:
            while True:
                events = io.poll()
                if self._wake_r.fileno() in events:  # raw sockets are reported by fd
                    with contextlib.suppress(BlockingIOError):
                        while self._wake_r.recv(4096):
                            pass
                if not io.send_new():
                    return  # close() asked
                io.receive(events)
                now = time.monotonic()
                io.watch_liveness(now)
                io.expire(now)
                io.resend_due(now)
                io.close_drained()
        finally:
            io.fail_all()
            self._wake_r.close()
            self._wake_w.close()


class _IOThread:
    """The I/O thread's state and steps (only that thread touches it): the current socket and the old
    ones still owed replies, every attempt in flight with its deadline, resends waiting for their time,
    and the liveness clock."""

    def __init__(self, client: Client):
        self.client, self.stats = client, client.stats
        self.ids = itertools.count(1)
        self.tiebreak = itertools.count()
        self.poller = zmq.Poller()
        self.poller.register(client._wake_r, zmq.POLLIN)
        self.owed: dict[zmq.Socket, set[int]] = {}  # wire ids each socket still awaits
        self.current = self._open()
        self.attempts: dict[int, tuple[_Request, zmq.Socket, float]] = {}
        self.deadlines: list[tuple[float, int]] = []  # heap; stale entries skipped
        self.delayed: list[tuple[float, int, _Request]] = []  # heap of (when, tiebreak, request) resends
        self.control: set[int] = set()  # wire ids of pings and cancels: their answers resolve no future
        self.last_heard = self.last_ping = time.monotonic()
        self.ping_every = min(1.0, (client.liveness_timeout_s or 4.0) / 4)

    def _open(self) -> zmq.Socket:
        sock = self.client._new_socket()
        self.owed[sock] = set()
        self.poller.register(sock, zmq.POLLIN)
        return sock

    def poll(self) -> dict:
        now = time.monotonic()
        horizon = min([now + 0.1] + [d[0] for d in self.deadlines[:1]] + [d[0] for d in self.delayed[:1]])
        return dict(self.poller.poll(max(0.0, horizon - now) * 1000))

    def send_new(self) -> bool:
        """Send what ``submit`` queued; False once ``close()`` has asked the thread to stop."""
        while True:
            try:
                req = self.client._inbox.get_nowait()
            except queue.Empty:
                return True
            if req is None:
                return False
            if req.future.set_running_or_notify_cancel():
                self.send(req)

    def send(self, req: _Request) -> None:
        if req.future.done():  # cancelled or failed meanwhile
            return
        wid = next(self.ids)
        try:
            frames = _auth.sign(self.client.auth, with_id(req.frames, wid), _auth.CLIENT_TO_BROKER)
            self.current.send_multipart(frames, zmq.NOBLOCK, copy=False)
        except zmq.Again:  # send queue full: try again shortly rather than block the loop
            if time.monotonic() > req.give_up_at:
                req.future.set_exception(
                    TimeoutError(
                        f"could not even queue {req.op!r} for {self.client.address} within its time "
                        "budget (send queue full; is the broker reachable?)"
                    )
                )
            else:
                heapq.heappush(self.delayed, (time.monotonic() + 0.01, next(self.tiebreak), req))
            return
        req.attempts += 1
        self.stats["sent"] += 1
        deadline = time.monotonic() + req.timeout_s
        self.attempts[wid] = (req, self.current, deadline)
        self.owed[self.current].add(wid)
        heapq.heappush(self.deadlines, (deadline, wid))

    def send_control(self, sock: zmq.Socket, op: str, fields: dict | None = None) -> None:
        cid = next(self.ids)
        frames = _auth.sign(self.client.auth, encode(op, cid, fields), _auth.CLIENT_TO_BROKER)
        with contextlib.suppress(zmq.Again):  # nothing queued: the liveness clock still runs
            sock.send_multipart(frames, zmq.NOBLOCK, copy=False)
            if op == _PING_OP:  # a cancel gets no answer
                self.control.add(cid)

    def replace_current(self) -> None:
        self.current = self._open()
        self.stats["reconnects"] += 1

    def retry_or_fail(self, req: _Request, error: BaseException, delay: float = 0.0) -> None:
        if req.attempts <= req.retries and not self.client._closed.is_set():
            self.stats["retries"] += 1
            heapq.heappush(self.delayed, (time.monotonic() + delay, next(self.tiebreak), req))
        elif not req.future.done():
            req.future.set_exception(error)

    def settle(self, wid: int) -> _Request | None:
        entry = self.attempts.pop(wid, None)
        if entry is None:
            return None
        self.owed[entry[1]].discard(wid)
        return entry[0]

    def receive(self, events: dict) -> None:
        for sock in [s for s in self.owed if s in events]:
            for _ in range(256):
                try:
                    raw = sock.recv_multipart(zmq.NOBLOCK, copy=False)
                except zmq.Again:
                    break
                self.last_heard = time.monotonic()
                self.on_reply(raw)

    def on_reply(self, raw: list) -> None:
        client = self.client
        try:
            frames = _auth.verify(client.auth, raw, _auth.BROKER_TO_CLIENT)
        except AuthError:
            self.stats["bad_replies"] += 1
            return
        try:
            msg = decode(frames, ops=REPLY_OPS, limits=client.limits)
        except ProtocolError as e:
            rid = peek_id(frames, client.limits)
            req = self.settle(rid) if isinstance(rid, int) else None
            if req is None:
                self.stats["bad_replies"] += 1
            elif not req.future.done():
                req.future.set_exception(ProtocolError(f"malformed reply from {client.address}: {e}"))
            return
        if msg.id in self.control:  # a ping's answer (its arrival already counted as a sign of life)
            self.control.discard(msg.id)
            return
        req = self.settle(msg.id) if isinstance(msg.id, int) else None
        if req is None:
            self.stats["late_replies"] += 1  # the answer to an attempt we gave up on: never a duplicate
            return
        if req.future.done():
            return
        if msg.op == ERROR:
            code, text = str(msg.fields.get("code", "error")), str(msg.fields.get("message", ""))
            if code == "busy":
                self.retry_or_fail(req, RemoteError(code, text), delay=client.backoff_s * req.attempts)
            else:
                req.future.set_exception(RemoteError(code, text))
        else:
            req.future.set_result(msg)

    def watch_liveness(self, now: float) -> None:
        """Ping while replies are awaited; after ``liveness_timeout_s`` of silence fail them all."""
        timeout = self.client.liveness_timeout_s
        if not self.attempts:
            self.last_heard = now  # nothing awaited, nothing to watch
        elif timeout is not None:
            if now - self.last_heard > timeout:
                error = ServiceUnavailable(
                    f"the service at {self.client.address} has not answered for {now - self.last_heard:.0f}s "
                    f"(liveness_timeout_s={timeout:g}): it is down or unreachable"
                )
                for wid in list(self.attempts):
                    req = self.settle(wid)
                    if req is not None and not req.future.done():
                        self.stats["unavailable"] += 1
                        req.future.set_exception(error)
                self.replace_current()  # the next request starts on a fresh connection
                self.control.clear()
                self.last_heard = now
            elif now - self.last_heard >= self.ping_every and now - self.last_ping >= self.ping_every:
                self.send_control(self.current, _PING_OP)
                self.last_ping = now

    def expire(self, now: float) -> None:
        """Attempts past their deadline: withdrawn at the broker, retried on a fresh socket or failed."""
        while self.deadlines and self.deadlines[0][0] <= now:
            _, wid = heapq.heappop(self.deadlines)
            entry = self.attempts.get(wid)
            if entry is None:
                continue
            req, sock, _ = entry
            self.settle(wid)
            # withdraw it at the broker (same connection: the broker knows it by sender + id)
            self.send_control(sock, CANCEL_OP, {"target": wid})
            self.stats["cancelled"] += 1
            if sock is self.current:  # replace the socket that timed out; the old one only drains
                self.replace_current()
            self.retry_or_fail(
                req,
                TimeoutError(
                    f"no reply to {req.op!r} from {self.client.address} within {req.timeout_s}s "
                    f"({req.attempts} attempt(s)); is the service up? (`gkd teacher ping`)"
                ),
            )

    def resend_due(self, now: float) -> None:
        while self.delayed and self.delayed[0][0] <= now:
            self.send(heapq.heappop(self.delayed)[2])

    def close_drained(self) -> None:
        """Old sockets owed nothing more are closed."""
        for sock in [s for s, pending in self.owed.items() if not pending and s is not self.current]:
            self.poller.unregister(sock)
            sock.close(linger=200)  # lets a cancel just queued on it leave
            del self.owed[sock]

    def fail_all(self) -> None:
        """The thread is ending: every unfinished future fails with ClientClosed; sockets close."""
        for req, _, _ in list(self.attempts.values()):
            if not req.future.done():
                req.future.set_exception(ClientClosed("client closed before the reply arrived"))
        for _, _, req in self.delayed:
            if not req.future.done():
                req.future.set_exception(ClientClosed("client closed before the reply arrived"))
        while True:
            try:
                req = self.client._inbox.get_nowait()
            except queue.Empty:
                break
            if req is not None and req.future.set_running_or_notify_cancel():
                req.future.set_exception(ClientClosed("client closed before the request was sent"))
        for sock in self.owed:
            sock.close(0)


def plan_chunks(sizes: Sequence[int], *, max_items: int, max_tokens: int | None = None) -> list[range]:
    """Split items (with token counts ``sizes``) into consecutive ranges of at most ``max_items`` items and
    ``max_tokens`` tokens (an item bigger than ``max_tokens`` gets a range of its own). Order-preserving:
    concatenating the per-range results in order gives the per-item results in the original order."""
    if max_items < 1:
        raise ValueError("max_items must be >= 1")
    chunks: list[range] = []
    start, tokens = 0, 0
    for i, n in enumerate(sizes):
        full = i - start >= max_items or (max_tokens is not None and tokens + n > max_tokens and i > start)
        if full:
            chunks.append(range(start, i))
            start, tokens = i, 0
        tokens += n
    if start < len(sizes):
        chunks.append(range(start, len(sizes)))
    return chunks
