"""The rollout service's wire format.

One op, ``generate``. Request (fields + int32 tensors, all flat)::

    fields   max_new_tokens, temperature, top_p, top_k, stop_token_ids, seed, return_topk (a SamplingConfig)
             seed_offset: int  prompt i samples with seed + seed_offset + i (the chunk's place in the batch)
             offset: int       index of the first prompt in the caller's whole batch, for error messages
             min_version: int | None   start only once the worker holds at least this policy version
             wait_s: float | None      how long to wait for min_version before an error reply
    tensors  prompt_ids    [sum P] int32   the prompts back to back
             prompt_lens   [S] int32

Reply::

    fields   policy_version: int   the one version that produced every sample of this reply
             worker: str           "host pid N" (named in the client's value errors: ``gkd.services.values``)
    tensors  response_ids       [sum R] int32
             response_lens      [S] int32
             response_logprobs  [sum R] float32   log softmax(logits / T) of each sampled token
             finish_codes       [S] uint8         index into FINISH_REASONS
             policy_versions    [S] int64
             topk_ids           [sum R, m] int32  only when return_topk = m > 0: the m most likely ids at
                                                  each response position under the sampling distribution
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict
from typing import Any

import torch

from gkd.rollout.types import FINISH_REASONS, Sample, SamplingConfig
from gkd.services.transport import Limits, Message, ProtocolError
from gkd.services.values import BadValues, check_ids, check_logprobs, refuse_nonfinite, sender, worker_label

OP_GENERATE = "generate"
OPS = (OP_GENERATE,)

#: Request bounds, enforced by the broker (before queueing) and the worker (before decoding): prompts as
#: int32 ids, so 16 MiB is ~4M prompt tokens.
LIMITS = Limits(
    max_message_bytes=16 << 20,
    max_sequences=1 << 14,
    max_tokens=1 << 22,
    sequence_tensors=("prompt_lens",),
    token_tensors=("prompt_ids",),
)
#: Reply bounds (the client's decode).
REPLY_LIMITS = Limits(
    max_message_bytes=256 << 20,
    max_sequences=1 << 14,
    max_tokens=1 << 22,
    sequence_tensors=("response_lens", "finish_codes", "policy_versions"),
    token_tensors=("response_ids", "response_logprobs"),
)

_INT32 = (-(1 << 31), (1 << 31) - 1)
_SAMPLING_FIELDS = (
    "max_new_tokens",
    "temperature",
    "top_p",
    "top_k",
    "stop_token_ids",
    "seed",
    "return_topk",
)


def _flat_ids(i: int, prompt: Any) -> torch.Tensor:
    t = torch.as_tensor(prompt) if len(prompt) or isinstance(prompt, torch.Tensor) else torch.empty(0)
    if t.numel() == 0:
        return torch.empty(0, dtype=torch.long)
    if t.dtype.is_floating_point or t.dtype == torch.bool:
        raise TypeError(f"prompt {i}: token ids must be integers, got {t.dtype}")
    return t.reshape(-1).long()


def pack_request(
    prompts: Sequence[Any],
    sampling: SamplingConfig,
    *,
    offset: int = 0,
    seed_offset: int = 0,
    min_version: int | None = None,
    wait_s: float | None = None,
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Prompts (lists or 1-D integer tensors) + sampling -> request fields and tensors."""
    parts = [_flat_ids(offset + i, p) for i, p in enumerate(prompts)]
    ids = torch.cat(parts) if parts else torch.empty(0, dtype=torch.long)
    if ids.numel() and (int(ids.min()) < _INT32[0] or int(ids.max()) > _INT32[1]):
        raise ValueError("token ids must fit in int32")
    fields = {k: v for k, v in asdict(sampling).items() if k in _SAMPLING_FIELDS}
    fields["stop_token_ids"] = list(sampling.stop_token_ids)
    fields.update(offset=int(offset), seed_offset=int(seed_offset), min_version=min_version, wait_s=wait_s)
    tensors = {
        "prompt_ids": ids.to(torch.int32),
        "prompt_lens": torch.tensor([p.numel() for p in parts], dtype=torch.int32),
    }
    return fields, tensors


def _int_field(header: dict[str, Any], name: str, default: Any) -> Any:
    value = header.get(name, default)
    if value is not None and type(value) is not int:
        raise ValueError(f"field {name} must be an int, got {type(value).__name__}")
    return value


def unpack_request(header: dict[str, Any], tensors: dict[str, torch.Tensor]):
    """Request -> ``(prompts, sampling, extra)``; ``extra`` has offset, seed_offset, min_version, wait_s.
    Raises ``ValueError`` on an inconsistent or ill-typed request."""
    missing = {"prompt_ids", "prompt_lens"} - set(tensors)
    if missing:
        raise ValueError(f"request lacks tensors {sorted(missing)}")
    ids, lens = tensors["prompt_ids"], tensors["prompt_lens"]
    for name, t in (("prompt_ids", ids), ("prompt_lens", lens)):
        if t.dtype != torch.int32 or t.dim() != 1:
            raise ValueError(f"{name} must be a 1-D int32 tensor, got {t.dtype}{list(t.shape)}")
    if lens.numel() and int(lens.min()) < 0:
        raise ValueError("prompt lengths must be non-negative")
    if int(lens.long().sum()) != ids.numel():
        raise ValueError(
            f"prompt_lens add up to {int(lens.long().sum())} tokens but prompt_ids has {ids.numel()}"
        )
    stop = header.get("stop_token_ids") or []
    if not isinstance(stop, list) or any(type(t) is not int for t in stop):
        raise ValueError("field stop_token_ids must be a list of ints")
    temperature, top_p, wait_s = (
        header.get("temperature", 1.0),
        header.get("top_p", 1.0),
        header.get("wait_s"),
    )
    for name, v in (("temperature", temperature), ("top_p", top_p), ("wait_s", wait_s)):
        if v is not None and (type(v) is bool or not isinstance(v, int | float) or not math.isfinite(v)):
            raise ValueError(f"field {name} must be a finite number, got {v!r}")
    if wait_s is not None and wait_s < 0:
        raise ValueError(f"field wait_s must be >= 0 seconds, got {wait_s!r}")
    sampling = SamplingConfig(
        max_new_tokens=_int_field(header, "max_new_tokens", 256),
        temperature=float(temperature),
        top_p=float(top_p),
        top_k=_int_field(header, "top_k", 0),
        stop_token_ids=tuple(stop),
        seed=_int_field(header, "seed", None),
        return_topk=_int_field(header, "return_topk", 0),
    )
    extra = {
        "offset": _int_field(header, "offset", 0),
        "seed_offset": _int_field(header, "seed_offset", 0),
        "min_version": _int_field(header, "min_version", None),
        "wait_s": None if wait_s is None else float(wait_s),
    }
    prompts = [p.tolist() for p in ids.long().split(lens.tolist())] if lens.numel() else []
    return prompts, sampling, extra


def pack_reply(
    samples: Sequence[Sample], version: int, service_s: float | None = None
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """``service_s``: the worker's own generation seconds for this request (``perf/rollout_tokens_per_s``).
    Raises ``ValueError`` naming this worker (an error reply) when a log-prob is NaN, infinite or > 0."""
    parts = [torch.as_tensor(s.response_ids, dtype=torch.int32).reshape(-1) for s in samples]
    lps = [s.response_logprobs.float().reshape(-1) for s in samples]
    tensors = {
        "response_ids": torch.cat(parts) if parts else torch.empty(0, dtype=torch.int32),
        "response_lens": torch.tensor([p.numel() for p in parts], dtype=torch.int32),
        "response_logprobs": torch.cat(lps) if lps else torch.empty(0),
        "finish_codes": torch.tensor(
            [FINISH_REASONS.index(s.finish_reason) for s in samples], dtype=torch.uint8
        ),
        "policy_versions": torch.tensor([s.policy_version for s in samples], dtype=torch.int64),
    }
    tops = [s.topk_ids for s in samples]
    if tops and all(t is not None for t in tops):
        rows = [t.to(torch.int32).reshape(len(r), -1) for t, r in zip(tops, parts, strict=True)]
        tensors["topk_ids"] = torch.cat(rows)
    refuse_nonfinite("rollout", response_logprobs=(tensors["response_logprobs"], False))
    fields: dict[str, Any] = {"policy_version": int(version), "worker": worker_label()}
    if service_s is not None:
        fields["service_s"] = float(service_s)
    return fields, tensors


def unpack_reply(
    msg: Message, prompts: Sequence[Any], *, return_topk: int | None = None, vocab_size: int | None = None
) -> list[Sample]:
    """Reply -> one ``Sample`` per prompt (in order); raises ``ProtocolError`` if it does not fit, and
    ``BadValues`` naming the worker when a log-prob is not finite and <= 0, an id is outside
    ``[0, vocab_size)`` (``>= 0`` when None) or ``topk_ids`` has not ``return_topk`` columns (None: any)."""
    t = msg.tensors
    names = ("response_ids", "response_lens", "response_logprobs", "finish_codes", "policy_versions")
    missing = set(names) - set(t)
    if missing:
        raise ProtocolError(f"rollout reply lacks tensors {sorted(missing)}")
    ids, lens, lps, codes, versions = (t[n] for n in names)
    dtypes = (torch.int32, torch.int32, torch.float32, torch.uint8, torch.int64)
    if any(
        x.dtype != d or x.dim() != 1 for x, d in zip((ids, lens, lps, codes, versions), dtypes, strict=True)
    ):
        raise ProtocolError("rollout reply tensors are not 1-D with the contract's dtypes")
    n = len(prompts)
    if lens.numel() != n or codes.numel() != n or versions.numel() != n:
        raise ProtocolError(f"rollout reply has {lens.numel()} samples for {n} prompts")
    if int(lens.long().sum()) != ids.numel() or lps.numel() != ids.numel() or (n and int(lens.min()) < 0):
        raise ProtocolError("rollout reply's response_lens do not fit its response tensors")
    if n and int(codes.max()) >= len(FINISH_REASONS):
        raise ProtocolError(f"rollout reply has an unknown finish code {int(codes.max())}")
    who = sender("rollout", msg.header)
    check_ids(who, "response_ids", ids, vocab_size)
    check_logprobs(who, "response_logprobs", lps, allow_neg_inf=False)
    top = t.get("topk_ids")
    _check_topk(who, top, return_topk, vocab_size)
    counts = lens.tolist()
    samples = [
        Sample(_as_list(p), r.tolist(), lp, FINISH_REASONS[c], v)
        for p, r, lp, c, v in zip(
            prompts, ids.split(counts), lps.split(counts), codes.tolist(), versions.tolist(), strict=True
        )
    ]
    if top is not None:
        if top.dtype != torch.int32 or top.dim() != 2 or top.shape[0] != ids.numel():
            raise ProtocolError(
                f"rollout reply's topk_ids {top.dtype}{list(top.shape)} is not int32 [{ids.numel()}, m]"
            )
        for s, rows in zip(samples, top.split(counts), strict=True):
            s.topk_ids = rows
    seconds = msg.header.get("service_s")
    if isinstance(seconds, int | float) and seconds >= 0 and n:  # the request's time, shared per sample
        for s in samples:
            s.extra["service_s"] = float(seconds) / n
    return samples


def _check_topk(who: str, top: torch.Tensor | None, asked: int | None, vocab_size: int | None) -> None:
    """``topk_ids`` present with ``asked`` columns exactly when ``asked > 0`` (None: not checked)."""
    width = 0 if top is None else (top.shape[1] if top.dim() == 2 else -1)
    if asked is not None and width != asked:
        raise BadValues(f"{who}: the reply has {width} top-k column(s) per token but return_topk={asked}")
    if top is not None and top.dim() == 2:
        check_ids(who, "topk_ids", top, vocab_size)


def _as_list(prompt: Any) -> list[int]:
    return prompt.reshape(-1).tolist() if isinstance(prompt, torch.Tensor) else [int(x) for x in prompt]
