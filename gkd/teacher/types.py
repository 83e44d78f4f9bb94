"""The teacher engine contract: what ``score`` returns and which inputs it refuses."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

LOGPROB_DTYPES = {"float16": torch.float16, "float32": torch.float32}


@dataclass
class TeacherOutput:
    """The teacher's view of one response of R tokens.

    Row j describes the position that predicts response token j (given prompt + response[:j]).
    """

    topk_ids: torch.Tensor  # [R, K] int32, the teacher's top-k token ids, most likely first
    topk_logprobs: torch.Tensor  # [R, K] fp16/fp32, their log-probs at the teacher temperature
    token_logprobs: torch.Tensor  # [R] fp32, log-prob of the response token actually there

    @property
    def num_tokens(self) -> int:
        return int(self.topk_ids.shape[0])


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
