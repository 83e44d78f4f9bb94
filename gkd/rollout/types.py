"""The rollout engine contract: sampling settings in, samples (tagged with their policy version) out."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch

#: Temperatures below this sample greedily: ``logits / T`` overflows to inf/NaN long before T reaches 0.
GREEDY_BELOW = 1e-5
#: Most student top ids a sample may carry per position (``SamplingConfig.return_topk``).
MAX_RETURN_TOPK = 128


@dataclass(frozen=True)
class SamplingConfig:
    """How to sample responses.

    ``temperature=0`` is greedy decoding (so is any ``temperature < 1e-5``, stored as 0: ``logits / T``
    would overflow). ``top_k=0`` and ``top_p=1`` disable those filters. With ``seed`` set, prompt i
    of a request samples from its own generator seeded with ``seed + i`` (the caller passes ``seed_offset``
    when it splits a batch), so results do not depend on how prompts were batched. ``return_topk=m > 0``:
    each sample also carries, per response position, the m most likely ids under softmax(logits / T)
    before truncation (the logits already computed to sample; the same order as the logits themselves).
    """

    max_new_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    stop_token_ids: tuple[int, ...] = ()
    seed: int | None = None
    return_topk: int = 0

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={self.max_new_tokens} must be >= 1")
        if not (isinstance(self.temperature, int | float) and math.isfinite(self.temperature)):
            raise ValueError(f"temperature={self.temperature} must be a finite number >= 0 (0 = greedy)")
        if self.temperature < 0:
            raise ValueError(f"temperature={self.temperature} must be >= 0 (0 = greedy)")
        if self.temperature < GREEDY_BELOW:
            object.__setattr__(self, "temperature", 0.0)
        if not (isinstance(self.top_p, int | float) and 0 < self.top_p <= 1):
            raise ValueError(f"top_p={self.top_p} must lie in (0, 1]")
        if self.top_k < 0:
            raise ValueError(f"top_k={self.top_k} must be >= 0 (0 = off)")
        if not 0 <= self.return_topk <= MAX_RETURN_TOPK:
            raise ValueError(f"return_topk={self.return_topk} must lie in [0, {MAX_RETURN_TOPK}] (0 = off)")
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))


FINISH_REASONS = ("length", "stop")  # why a response ended; the wire sends the index


@dataclass
class Sample:
    """One sampled response. ``response_logprobs[j]`` is log softmax(logits / T)[response_ids[j]] of the
    policy that sampled it, over the full vocabulary, i.e. before top-k/top-p truncation (T = 1 for
    greedy). ``policy_version`` is the single weight version that produced every token. ``topk_ids``: with
    ``SamplingConfig.return_topk = m``, row j holds the m most likely ids at response position j under
    that same distribution, most likely first; None otherwise."""

    prompt_ids: list[int]
    response_ids: list[int]
    response_logprobs: torch.Tensor  # [R] float32
    finish_reason: str  # FINISH_REASONS: "stop" (a stop token, included in response_ids) | "length"
    policy_version: int
    extra: dict = field(default_factory=dict)
    topk_ids: torch.Tensor | None = None  # [R, m] int32


def check_named_tensors(
    expected: dict[str, torch.Tensor], named: Iterable[tuple[str, torch.Tensor]]
) -> dict[str, torch.Tensor]:
    """Strict name/shape check of an incoming state against the engine's parameters, before any copy.

    Raises ValueError listing missing names, unexpected names and shape mismatches.
    """
    incoming = dict(named)
    missing = sorted(set(expected) - set(incoming))
    unexpected = sorted(set(incoming) - set(expected))
    shapes = [
        f"{k}: engine {tuple(expected[k].shape)} vs given {tuple(incoming[k].shape)}"
        for k in sorted(set(expected) & set(incoming))
        if tuple(expected[k].shape) != tuple(incoming[k].shape)
    ]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"missing {missing[:10]}{' ...' if len(missing) > 10 else ''}")
        if unexpected:
            parts.append(f"unexpected {unexpected[:10]}{' ...' if len(unexpected) > 10 else ''}")
        if shapes:
            parts.append(f"shape mismatches {shapes[:10]}")
        raise ValueError(
            "load_weights: the given state does not match the engine's parameters: " + "; ".join(parts)
        )
    return incoming


def check_prompts(
    prompts: Sequence[Sequence[int]],
    *,
    vocab_size: int,
    max_len: int | None = None,
    max_new_tokens: int = 0,
    offset: int = 0,
) -> None:
    """Raise ``ValueError`` naming the first bad prompt by its index in the caller's batch: empty, a token
    id outside ``[0, vocab_size)``, or ``len(prompt) + max_new_tokens`` beyond the engine's context
    (checked when ``max_len`` is given)."""
    for i, p in enumerate(prompts):
        if len(p) == 0:
            raise ValueError(f"prompt {offset + i} is empty")
        lo, hi = min(p), max(p)
        if lo < 0 or hi >= vocab_size:
            bad = lo if lo < 0 else hi
            raise ValueError(
                f"prompt {offset + i}: token id {bad} is outside the vocabulary [0, {vocab_size})"
            )
        if max_len is not None and len(p) + max_new_tokens > max_len:
            raise ValueError(
                f"prompt {offset + i}: {len(p)} tokens + max_new_tokens {max_new_tokens} exceed the engine's "
                f"context of {max_len}"
            )
