"""``RolloutClient``: sample responses on a running rollout service.

    with RolloutClient("127.0.0.1:15557", timeout_s=120, retries=2) as rollout:
        fut = rollout.submit(prompts, SamplingConfig(max_new_tokens=256, seed=7), min_version=3)
        samples = fut.result()        # list[Sample], in the order of the prompts, each with policy_version
        rollout.info()                # broker info: workers (model, vocab_size, max_len...), counters

A batch is split into micro-requests of at most ``max_prompts_per_request`` prompts (spread over idle
workers by the broker) and the samples come back in the original order. Each micro-request carries its
first prompt's index as ``seed_offset``, so seeded results do not depend on the split. With
``min_version``, a worker waits up to ``min_version_wait_s`` for that version and then answers with an
error; keep that below ``timeout_s`` (the per-attempt timeout). Errors: ``RemoteError`` (e.g.
``[handler_error] ValueError: prompt 17: token id 70000 is outside the vocabulary [0, 32000)``),
``TimeoutError`` after all retries,
``ServiceUnavailable`` (a ``TimeoutError``) once the service has not answered a liveness ping for
``liveness_timeout_s`` (15 s by default: a dead service surfaces in seconds, a long request does not).
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import Future
from typing import Any

from gkd.rollout.types import Sample, SamplingConfig
from gkd.rollout.wire import OP_GENERATE, REPLY_LIMITS, pack_request, unpack_reply
from gkd.services.transport import Auth, plan_chunks
from gkd.services.transport.service_client import ServiceClient, item_length


class RolloutClient(ServiceClient[Sample]):
    """Thread-safe client of a rollout service (one ZeroMQ socket, futures). ``info()`` lists the workers
    with their model, vocab_size, max_len and weight channel."""

    reply_limits = REPLY_LIMITS

    def __init__(
        self,
        address: str,
        *,
        timeout_s: float = 600.0,
        retries: int = 2,
        auth: Auth | None = None,
        max_prompts_per_request: int = 16,
        max_tokens_per_request: int | None = None,
        min_version_wait_s: float | None = None,
        liveness_timeout_s: float | None = 15.0,
    ):
        self.max_prompts_per_request = max_prompts_per_request
        self.max_tokens_per_request = max_tokens_per_request  # prompt + max_new_tokens per micro-request
        self.min_version_wait_s = timeout_s / 2 if min_version_wait_s is None else min_version_wait_s
        #: replies' ids must lie in [0, vocab_size) (None: >= 0 only); the trainer sets the student's
        self.vocab_size: int | None = None
        super().__init__(address, timeout_s, retries, auth, liveness_timeout_s)

    def submit(
        self, prompts: Sequence[Any], sampling: SamplingConfig, min_version: int | None = None
    ) -> Future[list[Sample]]:
        """Sample one response per prompt (lists or 1-D integer tensors of token ids)."""
        sizes = [item_length(p) + sampling.max_new_tokens for p in prompts]
        chunks = plan_chunks(
            sizes, max_items=self.max_prompts_per_request, max_tokens=self.max_tokens_per_request
        )
        wait_s = None if min_version is None else self.min_version_wait_s
        parts = [
            pack_request(
                [prompts[i] for i in chunk],
                sampling,
                offset=chunk.start,
                seed_offset=chunk.start,
                min_version=min_version,
                wait_s=wait_s,
            )
            for chunk in chunks
        ]

        def unpack(i: int, msg):
            mine = [prompts[j] for j in chunks[i]]
            return unpack_reply(msg, mine, return_topk=sampling.return_topk, vocab_size=self.vocab_size)

        return self._submit_parts(OP_GENERATE, parts, unpack)

    def generate(self, prompts: Sequence[Any], sampling: SamplingConfig, min_version: int | None = None):
        """``submit(...).result()``."""
        return self.submit(prompts, sampling, min_version).result()
