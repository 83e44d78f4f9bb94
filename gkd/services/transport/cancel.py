"""Cooperative cancellation of the request a handler thread runs, without the transport's sockets.

The worker (``gkd.services.transport.worker``) sets the running job's event on this module's thread-local;
engine code calls :func:`check_cancelled` once per generated token. This module imports neither zmq nor
msgpack, so the engines (``gkd.rollout.hf_engine``, ``gkd.teacher.hf_generate``) import on a machine without
them.
"""

from __future__ import annotations

import threading

__all__ = ["Cancelled", "cancel_event", "check_cancelled"]


class Cancelled(RuntimeError):
    """The broker withdrew the request this handler is running (raised by ``check_cancelled``)."""


_current = threading.local()  # the handler thread's job cancel event (each handler has its own thread)


def cancel_event() -> threading.Event | None:
    """The running request's cancel event, in a handler thread (None elsewhere)."""
    return getattr(_current, "cancel", None)


def check_cancelled() -> None:
    """Raise ``Cancelled`` if the request this handler thread runs was withdrawn; a no-op elsewhere."""
    event = cancel_event()
    if event is not None and event.is_set():
        raise Cancelled("request withdrawn by the broker (its client gave up, or the job deadline passed)")
