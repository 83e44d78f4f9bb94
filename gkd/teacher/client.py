"""``TeacherClient``: score sequences on a running teacher service.

    with TeacherClient("127.0.0.1:15555", timeout_s=60, retries=2) as teacher:
        fut = teacher.submit([(prompt_ids, response_ids), ...], top_k=64, temperature=1.0)
        outputs = fut.result()        # list[TeacherOutput], in the order of the sequences
        teacher.info()                # broker info: workers (model, vocab_size, max_top_k...), counters

A large batch is split into micro-requests of at most ``max_sequences_per_request`` sequences and
``max_tokens_per_request`` tokens; the broker spreads them over idle workers and the results come back in
the original order. Errors: ``RemoteError`` (e.g. ``[handler_error] ValueError: sequence 17: response
token id 70000 is outside the vocabulary [0, 32000)``), ``TimeoutError`` after all retries.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from concurrent.futures import Future
from typing import Any

from gkd.teacher.types import TeacherOutput
from gkd.teacher.wire import LIMITS, OP_SCORE, pack_request, unpack_reply
from gkd.transport import Auth, Client, Message, plan_chunks


class TeacherClient:
    """Thread-safe client of a teacher service (one ZeroMQ socket, futures)."""

    def __init__(
        self,
        address: str,
        *,
        timeout_s: float = 120.0,
        retries: int = 2,
        auth: Auth | None = None,
        max_sequences_per_request: int = 16,
        max_tokens_per_request: int = 16384,
    ):
        self.max_sequences_per_request = max_sequences_per_request
        self.max_tokens_per_request = max_tokens_per_request
        self._client = Client(address, timeout_s=timeout_s, retries=retries, auth=auth, limits=LIMITS)

    @property
    def stats(self) -> dict[str, int]:
        """The transport client's counters (sent, retries, reconnects, late_replies, bad_replies)."""
        return self._client.stats

    def info(self, timeout_s: float = 5.0) -> dict[str, Any]:
        """The broker's info: ``protocol``, ``workers`` (each with the worker's ``info``: model, vocab_size,
        max_top_k, tokenizer, ...), ``queue``, ``stats``."""
        return self._client.info(timeout_s=timeout_s)

    def submit(
        self,
        sequences: Sequence[tuple[Any, Any]],
        top_k: int | None = None,
        temperature: float | None = None,
    ) -> Future[list[TeacherOutput]]:
        """Score ``(prompt_ids, response_ids)`` pairs; ``None`` top_k/temperature take the service's
        defaults (``gkd teacher serve --top-k/--temperature``)."""
        sizes = [_length(p) + _length(r) for p, r in sequences]
        chunks = plan_chunks(
            sizes, max_items=self.max_sequences_per_request, max_tokens=self.max_tokens_per_request
        )
        parts, lens = [], []
        for chunk in chunks:
            fields, tensors = pack_request([sequences[i] for i in chunk], top_k, temperature, chunk.start)
            parts.append((fields, tensors))
            lens.append(tensors["response_lens"])
        result: Future[list[TeacherOutput]] = Future()
        if not parts:
            result.set_result([])
            return result

        def done(fut: Future[list[Message]]) -> None:
            try:
                replies = fut.result()
                outputs = [out for msg, n in zip(replies, lens, strict=True) for out in unpack_reply(msg, n)]
            except BaseException as e:  # handed to the caller through the future, never swallowed
                result.set_exception(e)
                return
            result.set_result(outputs)

        self._client.submit_split(OP_SCORE, parts).add_done_callback(done)
        return result

    def score(self, sequences, top_k: int | None = None, temperature: float | None = None):
        """``submit(...).result()``."""
        return self.submit(sequences, top_k, temperature).result()

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> TeacherClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _length(ids: Any) -> int:
    shape = getattr(ids, "shape", None)  # tensors and numpy arrays: count elements, whatever the shape
    return math.prod(shape) if shape is not None else len(ids)
