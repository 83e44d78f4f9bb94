"""``ServiceClient``: what the teacher and rollout clients share on top of the transport ``Client``: one
socket, broker info and counters, and a batch sent as micro-requests whose replies are decoded into one
ordered list behind a single future."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from typing import Any, Generic, TypeVar

from gkd.services.transport.auth import Auth
from gkd.services.transport.client import Client
from gkd.services.transport.codec import Limits, Message

T = TypeVar("T")


def item_length(ids: Any) -> int:
    """Token count of one id sequence: elements of a tensor/array (any shape), else ``len``."""
    shape = getattr(ids, "shape", None)
    return math.prod(shape) if shape is not None else len(ids)


class ServiceClient(Generic[T]):
    """Thread-safe client of a gkd service (one ZeroMQ socket, futures); subclasses pack and unpack, and
    set ``reply_limits`` (their wire's bounds on a reply). Subclasses forward their transport arguments
    positionally: each documents them in its own signature, with its own defaults."""

    reply_limits: Limits

    def __init__(
        self,
        address: str,
        timeout_s: float,
        retries: int,
        auth: Auth | None,
        liveness_timeout_s: float | None,
    ):
        self._client = Client(
            address,
            timeout_s=timeout_s,
            retries=retries,
            auth=auth,
            limits=self.reply_limits,
            liveness_timeout_s=liveness_timeout_s,
        )

    @property
    def stats(self) -> dict[str, int]:
        """The transport client's counters (sent, retries, reconnects, late_replies, bad_replies)."""
        return self._client.stats

    def info(self, timeout_s: float = 5.0) -> dict[str, Any]:
        """The broker's info: ``protocol``, ``workers`` (each with its worker's ``info``), ``queue``,
        ``stats``."""
        return self._client.info(timeout_s=timeout_s)

    def _submit_parts(
        self, op: str, parts: Sequence[Any], unpack: Callable[[int, Message], list[T]]
    ) -> Future[list[T]]:
        """Send ``parts`` (micro-requests) as one split request; the future holds
        ``unpack(0, reply0) + unpack(1, reply1) + ...`` or the first error (never swallowed)."""
        result: Future[list[T]] = Future()
        if not parts:
            result.set_result([])
            return result

        def done(fut: Future[list[Message]]) -> None:
            try:
                out = [item for i, msg in enumerate(fut.result()) for item in unpack(i, msg)]
            except BaseException as e:  # handed to the caller through the future
                result.set_exception(e)
                return
            result.set_result(out)

        self._client.submit_split(op, list(parts)).add_done_callback(done)
        return result

    def close(self) -> None:
        self._client.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
