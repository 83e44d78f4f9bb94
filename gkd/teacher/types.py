"""The teacher engine contract: what ``score`` returns and which inputs it refuses."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

LOGPROB_DTYPES = {"float16": torch.float16, "float32": torch.float32}
#: What a reply's rows cover: ``topk`` (the teacher's top-k, today's and the default) or ``union`` (the
#: teacher's top-k plus the ids the request asked for, deduplicated, ``-inf`` padded to a fixed width).
SUPPORTS = ("topk", "union")


@dataclass
class TeacherOutput:
    """The teacher's view of one response of R tokens.

    Row j describes the position that predicts response token j (given prompt + response[:j]).
    """

    topk_ids: torch.Tensor  # [R, K] int32, the teacher's top-k token ids, most likely first
    topk_logprobs: torch.Tensor  # [R, K] fp16/fp32, their log-probs at the teacher temperature
    token_logprobs: torch.Tensor  # [R] fp32, log-prob of the response token actually there
    # "union": rows hold the top-k then the requested ids not among them (-inf slots pad the width);
    # "topk": only the teacher's own ranking (a request's ids may be missing: see the engine)
    support: str = "topk"
    # the teacher worker's scoring seconds for the request, shared over its sequences (0: not reported)
    service_s: float = 0.0

    @property
    def num_tokens(self) -> int:
        return int(self.topk_ids.shape[0])

    def padded(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(ids [R, k] int32, log-probs [R, k] fp32): the top-k widened to ``k`` columns with unused
        slots (id 0, log-prob -inf), for a batch whose teachers answered with different K."""
        ids, lp = self.topk_ids.to(torch.int32), self.topk_logprobs.to(torch.float32)
        extra = k - int(ids.shape[1])
        if extra > 0:
            ids = torch.nn.functional.pad(ids, (0, extra))
            lp = torch.nn.functional.pad(lp, (0, extra), value=float("-inf"))
        return ids, lp


def check_sequences(
    sequences: Sequence[tuple[Sequence[int], Sequence[int]]],
    *,
    vocab_size: int,
    max_len: int,
    top_k: int,
    max_top_k: int,
    index_offset: int = 0,
) -> None:
    """Reject bad requests before any compute, naming the sequence index and the problem.

    ``index_offset`` is added to the indices in messages: a service scoring one micro-request of a split
    batch names the sequence by its index in the caller's whole batch.
    """
    if not 1 <= top_k <= max_top_k:
        raise ValueError(f"top_k={top_k} is outside [1, {max_top_k}] (the maximum this teacher serves)")
    for i, seq in enumerate(sequences, start=index_offset):
        if len(seq) != 2:
            raise ValueError(f"sequence {i}: expected (prompt_ids, response_ids), got {len(seq)} parts")
        prompt, response = seq
        if len(prompt) == 0:
            raise ValueError(f"sequence {i}: empty prompt (the first response token needs a context)")
        if len(response) == 0:
            raise ValueError(f"sequence {i}: empty response (nothing to score)")
        total = len(prompt) + len(response)
        if total > max_len:
            raise ValueError(f"sequence {i}: {total} tokens exceed the teacher's limit of {max_len}")
        for part, ids in (("prompt", prompt), ("response", response)):
            lo, hi = min(ids), max(ids)
            if lo < 0 or hi >= vocab_size:
                bad = lo if lo < 0 else hi
                raise ValueError(
                    f"sequence {i}: {part} token id {bad} is outside the vocabulary [0, {vocab_size})"
                )


def union_rows(
    logp: torch.Tensor,  # [N, V] log-probs
    top_k: int,
    requested: torch.Tensor,  # [N, M] integer ids in [0, V)
) -> tuple[torch.Tensor, torch.Tensor]:
    """The teacher's top-k of each row, then the requested ids not already there (deduplicated), as
    ``(ids [N, W] int32, logprobs [N, W])`` with ``W = min(top_k + M, V)``. Unused slots (a requested id
    already present) hold id 0 and ``-inf``, after the used ones, so every row has the same width."""
    n, vocab = logp.shape
    top_lp, top_ids = logp.topk(top_k, dim=-1)  # [N, K]
    req = requested.to(device=logp.device, dtype=torch.long)  # [N, M]
    m = req.shape[1]
    in_top = (req[:, :, None] == top_ids[:, None, :]).any(-1)  # [N, M]
    earlier = torch.ones(m, m, dtype=torch.bool, device=logp.device).tril(-1)  # [j, i]: i < j
    repeated = ((req[:, :, None] == req[:, None, :]) & earlier).any(-1)  # [N, M]
    keep = torch.cat([torch.ones_like(top_ids, dtype=torch.bool), ~(in_top | repeated)], dim=1)
    ids = torch.cat([top_ids, req], dim=1).masked_fill(~keep, 0)
    lps = torch.cat([top_lp, logp.gather(1, req)], dim=1).masked_fill(~keep, float("-inf"))
    order = (~keep).to(torch.int8).argsort(dim=1, stable=True)  # used slots first, in their order
    width = min(top_k + m, vocab)
    return ids.gather(1, order)[:, :width].int(), lps.gather(1, order)[:, :width]


def check_requested(
    sequences: Sequence[tuple[Sequence[int], Sequence[int]]],
    requested: Sequence[torch.Tensor],
    *,
    vocab_size: int,
    max_width: int,
    index_offset: int = 0,
) -> None:
    """Reject requested ids that do not fit their sequences: one ``[R, M]`` integer tensor per sequence
    (R its response length, the same M >= 1 for all, at most ``max_width``), ids in ``[0, vocab_size)``."""
    if len(requested) != len(sequences):
        raise ValueError(f"{len(requested)} requested-id tensors for {len(sequences)} sequences")
    widths = {int(t.shape[1]) for t in requested if t.dim() == 2}
    for i, ((_, response), t) in enumerate(zip(sequences, requested, strict=True), start=index_offset):
        if t.dim() != 2 or t.shape[0] != len(response) or t.dtype.is_floating_point or t.dtype == torch.bool:
            raise ValueError(
                f"sequence {i}: requested ids must be an integer tensor [R={len(response)}, M], got "
                f"{t.dtype}{list(t.shape)}"
            )
        if len(widths) > 1 or not 1 <= t.shape[1] <= max_width:
            raise ValueError(
                f"sequence {i}: requested ids are {t.shape[1]} per position; every sequence of a request "
                f"needs the same number, in [1, {max_width}]"
            )
        if t.numel() and (int(t.min()) < 0 or int(t.max()) >= vocab_size):
            bad = int(t.min()) if int(t.min()) < 0 else int(t.max())
            raise ValueError(f"sequence {i}: requested id {bad} is outside the vocabulary [0, {vocab_size})")


def check_score_request(
    engine,
    sequences: Sequence[tuple[Sequence[int], Sequence[int]]],
    top_k: int,
    temperature: float,
    requested_ids: Sequence[torch.Tensor] | None = None,
    index_offset: int = 0,
) -> None:
    """Every check of a ``score`` call against ``engine``'s limits (its ``vocab_size``, ``max_len`` and
    ``max_top_k``), run once per request by the engine itself; messages name sequences from
    ``index_offset`` (a service's micro-request names them by their index in the caller's batch)."""
    if not 0 < temperature < float("inf"):
        raise ValueError(f"temperature={temperature} must be a positive finite number")
    check_sequences(
        sequences,
        vocab_size=engine.vocab_size,
        max_len=engine.max_len,
        top_k=top_k,
        max_top_k=engine.max_top_k,
        index_offset=index_offset,
    )
    if requested_ids is not None:
        check_requested(
            sequences,
            requested_ids,
            vocab_size=engine.vocab_size,
            max_width=engine.max_top_k,
            index_offset=index_offset,
        )


@dataclass
class TeacherAnswer:
    """One answer the teacher sampled (the ``generate`` op) with its own view of it: ``output`` is what a
    ``score`` request of ``(prompt, response_ids)`` would return, taken from the same forward passes."""

    response_ids: list[int]
    finish_reason: str  # "stop" (ended with a stop token, included) | "length"
    output: TeacherOutput


@dataclass(frozen=True)
class GenerateSettings:
    """How the teacher samples answers (``teacher.generate.*``): ``temperature`` 0 is greedy; the
    answers' top-k rows are taken at the scoring temperature, not this one."""

    max_new_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()

    def __post_init__(self):
        if type(self.max_new_tokens) is not int or self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={self.max_new_tokens!r} must be an int >= 1")
        if not (isinstance(self.temperature, int | float) and 0 <= self.temperature < float("inf")):
            raise ValueError(f"temperature={self.temperature!r} must be a finite number >= 0 (0 = greedy)")
        if not (isinstance(self.top_p, int | float) and 0 < self.top_p <= 1):
            raise ValueError(f"top_p={self.top_p!r} must lie in (0, 1]")
        if self.seed is not None and type(self.seed) is not int:
            raise ValueError(f"seed={self.seed!r} must be an int or None")
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))


def check_prompts_for_generate(
    engine, prompts: Sequence[Sequence[int]], settings: GenerateSettings, top_k: int, index_offset: int = 0
) -> None:
    """Reject a ``generate`` request the engine cannot serve, naming the prompt by its index in the
    caller's batch: empty prompt, ids outside the vocabulary, prompt + max_new_tokens beyond ``max_len``."""
    if not 1 <= top_k <= engine.max_top_k:
        raise ValueError(
            f"top_k={top_k} is outside [1, {engine.max_top_k}] (the maximum this teacher serves)"
        )
    for i, p in enumerate(prompts, start=index_offset):
        if len(p) == 0:
            raise ValueError(f"prompt {i}: empty (the first answer token needs a context)")
        lo, hi = min(p), max(p)
        if lo < 0 or hi >= engine.vocab_size:
            bad = lo if lo < 0 else hi
            raise ValueError(f"prompt {i}: token id {bad} is outside the vocabulary [0, {engine.vocab_size})")
        if len(p) + settings.max_new_tokens > engine.max_len:
            raise ValueError(
                f"prompt {i}: {len(p)} tokens + max_new_tokens {settings.max_new_tokens} exceed the "
                f"teacher's limit of {engine.max_len}"
            )
