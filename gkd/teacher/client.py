"""``TeacherClient``: score sequences on a running teacher service.

    with TeacherClient("127.0.0.1:15555", timeout_s=60, retries=2) as teacher:
        fut = teacher.submit([(prompt_ids, response_ids), ...], top_k=64, temperature=1.0)
        outputs = fut.result()        # list[TeacherOutput], in the order of the sequences
        answers = teacher.generate(prompts, GenerateSettings(max_new_tokens=64, seed=0), top_k=64).result()
        # list[TeacherAnswer]: the teacher's sampled response_ids + the TeacherOutput a score of it gives
        teacher.info()                # broker info: workers (model, vocab_size, max_top_k...), counters

A large batch is split into micro-requests of at most ``max_sequences_per_request`` sequences and
``max_tokens_per_request`` tokens; the broker spreads them over idle workers and the results come back in
the original order. Errors: ``RemoteError`` (e.g. ``[handler_error] ValueError: sequence 17: response
token id 70000 is outside the vocabulary [0, 32000)``), ``TimeoutError`` after all retries,
``ServiceUnavailable`` (a ``TimeoutError``) once the service has not answered a liveness ping for
``liveness_timeout_s`` (15 s by default: a dead service surfaces in seconds, a long request does not).
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import Future
from typing import Any

from gkd.services.transport import Auth, plan_chunks
from gkd.services.transport.service_client import ServiceClient, item_length
from gkd.teacher.generate_wire import OP_GENERATE, pack_generate_request, unpack_generate_reply
from gkd.teacher.types import GenerateSettings, TeacherAnswer, TeacherOutput
from gkd.teacher.wire import OP_SCORE, REPLY_LIMITS, pack_request, unpack_reply


class TeacherClient(ServiceClient[TeacherOutput]):
    """Thread-safe client of a teacher service (one ZeroMQ socket, futures). ``info()`` lists the workers
    with their model, vocab_size, max_top_k and tokenizer."""

    reply_limits = REPLY_LIMITS

    def __init__(
        self,
        address: str,
        *,
        timeout_s: float = 120.0,
        retries: int = 2,
        auth: Auth | None = None,
        max_sequences_per_request: int = 16,
        max_tokens_per_request: int = 16384,
        liveness_timeout_s: float | None = 15.0,
    ):
        self.max_sequences_per_request = max_sequences_per_request
        self.max_tokens_per_request = max_tokens_per_request
        #: replies' ids must lie in [0, vocab_size) (None: >= 0 only); the trainer sets the student's
        self.vocab_size: int | None = None
        super().__init__(address, timeout_s, retries, auth, liveness_timeout_s)

    def submit(
        self,
        sequences: Sequence[tuple[Any, Any]],
        top_k: int | None = None,
        temperature: float | None = None,
        requested_ids: Sequence[Any] | None = None,
    ) -> Future[list[TeacherOutput]]:
        """Score ``(prompt_ids, response_ids)`` pairs; ``None`` top_k/temperature take the service's
        defaults (``gkd teacher serve --top-k/--temperature``). ``requested_ids``: one ``[R, M]`` integer
        tensor per sequence (the same M for all): rows then cover the union of the top-k and these ids
        (``TeacherOutput.support`` says whether the engine could: see ``gkd.teacher.wire``)."""
        sizes = [item_length(p) + item_length(r) for p, r in sequences]
        chunks = plan_chunks(
            sizes, max_items=self.max_sequences_per_request, max_tokens=self.max_tokens_per_request
        )
        parts = [
            pack_request(
                [sequences[i] for i in c],
                top_k,
                temperature,
                c.start,
                None if requested_ids is None else [requested_ids[i] for i in c],
            )
            for c in chunks
        ]
        lens = [tensors["response_lens"] for _, tensors in parts]
        m = int(parts[0][1]["requested_ids"].shape[1]) if parts and "requested_ids" in parts[0][1] else 0
        return self._submit_parts(
            OP_SCORE,
            parts,
            lambda i, msg: unpack_reply(msg, lens[i], top_k=top_k, requested=m, vocab_size=self.vocab_size),
        )

    def generate(
        self,
        prompts: Sequence[Any],
        settings: GenerateSettings,
        top_k: int | None = None,
        temperature: float | None = None,
    ) -> Future[list[TeacherAnswer]]:
        """The teacher's own answers to ``prompts`` (sampled with ``settings``; prompt i seeded
        ``settings.seed + i`` however the batch is split), each with its top-k rows at ``temperature`` (the
        scoring temperature; None: the service's defaults, as for :meth:`submit`)."""
        sizes = [item_length(p) + settings.max_new_tokens for p in prompts]
        chunks = plan_chunks(
            sizes, max_items=self.max_sequences_per_request, max_tokens=self.max_tokens_per_request
        )
        parts = [
            pack_generate_request([prompts[i] for i in c], settings, top_k, temperature, c.start)
            for c in chunks
        ]
        counts = [len(c) for c in chunks]
        n = settings.max_new_tokens
        return self._submit_parts(
            OP_GENERATE,
            parts,
            lambda i, msg: unpack_generate_reply(msg, counts[i], n, top_k=top_k, vocab_size=self.vocab_size),
        )

    def score(self, sequences, top_k: int | None = None, temperature: float | None = None):
        """``submit(...).result()``."""
        return self.submit(sequences, top_k, temperature).result()
