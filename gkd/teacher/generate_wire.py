"""The teacher service's ``generate`` op: the teacher samples answers and returns, with each, the rows a
``score`` of that answer would give (one pass: no second forward).

Request (fields + int32 tensors, flat)::

    fields   top_k: int | None, temperature: float | None   the scoring side (None: the service's default)
             max_new_tokens: int, gen_temperature: float (0 = greedy), top_p: float, seed: int | None,
             stop_ids: list[int], offset: int (index of the first prompt in the caller's batch)
    tensors  input_ids    [sum P] int32   the prompts back to back
             prompt_lens  [S] int32

Reply: the ``score`` reply's fields and tensors (``topk_ids``, ``topk_logprobs``, ``token_logprobs``,
``response_lens``) for the sampled answers, plus::

    tensors  response_ids  [sum R] int32   the answers back to back (R in [1, max_new_tokens] each)
             stopped       [S] int8        1: the answer ended with a stop token (included), 0: length
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from gkd.services.transport import Message, ProtocolError
from gkd.teacher.types import GenerateSettings, TeacherAnswer

OP_GENERATE = "generate"


def pack_generate_request(
    prompts: Sequence[Any],
    settings: GenerateSettings,
    top_k: int | None,
    temperature: float | None,
    offset: int = 0,
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Prompts (lists or 1-D integer tensors) + settings -> request fields and tensors."""
    from gkd.teacher.wire import _INT32, _flat_ids

    parts = [_flat_ids(p) for p in prompts]
    ids = torch.cat(parts).long() if parts else torch.empty(0, dtype=torch.long)
    if ids.numel() and (int(ids.min()) < _INT32[0] or int(ids.max()) > _INT32[1]):
        raise ValueError("token ids must fit in int32")
    fields = {
        "top_k": top_k,
        "temperature": temperature,
        "offset": int(offset),
        "max_new_tokens": settings.max_new_tokens,
        "gen_temperature": float(settings.temperature),
        "top_p": float(settings.top_p),
        "seed": None if settings.seed is None else settings.seed + int(offset),
        "stop_ids": list(settings.stop_token_ids),
    }
    tensors = {
        "input_ids": ids.to(torch.int32),
        "prompt_lens": torch.tensor([p.numel() for p in parts], dtype=torch.int32),
    }
    return fields, tensors


def unpack_generate_request(
    header: dict[str, Any], tensors: dict[str, torch.Tensor]
) -> tuple[list[list[int]], GenerateSettings]:
    """Request -> (prompts, settings); ``ValueError`` naming the field on anything inconsistent."""
    missing = {"input_ids", "prompt_lens"} - set(tensors)
    if missing:
        raise ValueError(f"generate request lacks tensors {sorted(missing)}")
    ids, plens = tensors["input_ids"], tensors["prompt_lens"]
    for name, t in (("input_ids", ids), ("prompt_lens", plens)):
        if t.dtype != torch.int32 or t.dim() != 1:
            raise ValueError(f"{name} must be a 1-D int32 tensor, got {t.dtype}{list(t.shape)}")
    if plens.numel() and int(plens.min()) < 0:
        raise ValueError("prompt lengths must be non-negative")
    if int(plens.long().sum()) != ids.numel():
        raise ValueError(
            f"prompt_lens add up to {int(plens.long().sum())} tokens but input_ids has {ids.numel()}"
        )
    stop = header.get("stop_ids", [])
    if not isinstance(stop, list) or not all(type(t) is int for t in stop):
        raise ValueError("field stop_ids must be a list of ints")
    try:
        settings = GenerateSettings(
            max_new_tokens=header.get("max_new_tokens"),
            temperature=header.get("gen_temperature"),
            top_p=header.get("top_p"),
            seed=header.get("seed"),
            stop_token_ids=tuple(stop),
        )
    except (TypeError, ValueError) as e:
        raise ValueError(f"generate settings: {e}") from e
    prompts = [p.tolist() for p in ids.long().split(plens.tolist())]
    return prompts, settings


def generate_reply(
    answers: Sequence[TeacherAnswer], top_k: int, out_dtype: torch.dtype
) -> dict[str, torch.Tensor]:
    """The reply tensors of ``answers`` (the worker side)."""
    outs = [a.output for a in answers]
    if answers:
        topk_ids = torch.cat([o.topk_ids for o in outs]).to(torch.int32)
        topk_lp = torch.cat([o.topk_logprobs for o in outs]).to(out_dtype)
        token_lp = torch.cat([o.token_logprobs for o in outs]).float()
        response = torch.tensor([t for a in answers for t in a.response_ids], dtype=torch.int32)
    else:
        topk_ids, topk_lp = torch.empty(0, top_k, dtype=torch.int32), torch.empty(0, top_k, dtype=out_dtype)
        token_lp, response = torch.empty(0), torch.empty(0, dtype=torch.int32)
    return {
        "topk_ids": topk_ids,
        "topk_logprobs": topk_lp,
        "token_logprobs": token_lp,
        "response_lens": torch.tensor([len(a.response_ids) for a in answers], dtype=torch.int32),
        "response_ids": response,
        "stopped": torch.tensor([a.finish_reason == "stop" for a in answers], dtype=torch.int8),
    }


def unpack_generate_reply(
    msg: Message,
    prompts: int,
    max_new_tokens: int,
    *,
    top_k: int | None = None,
    vocab_size: int | None = None,
) -> list[TeacherAnswer]:
    """Reply -> one :class:`TeacherAnswer` per prompt; ``ProtocolError`` when it does not fit the request
    (``BadValues`` naming the worker for the values ``gkd.teacher.wire.unpack_reply`` checks, and answer
    ids outside ``[0, vocab_size)``)."""
    from gkd.services.values import check_ids, sender
    from gkd.teacher.wire import unpack_reply

    t = msg.tensors
    missing = {"response_ids", "response_lens", "stopped"} - set(t)
    if missing:
        raise ProtocolError(f"teacher generate reply lacks tensors {sorted(missing)}")
    lens, resp, stopped = t["response_lens"], t["response_ids"], t["stopped"]
    if lens.dtype != torch.int32 or lens.shape != (prompts,) or stopped.shape != (prompts,):
        raise ProtocolError(
            f"teacher generate reply: response_lens {lens.dtype}{list(lens.shape)} / stopped "
            f"{list(stopped.shape)} do not fit {prompts} prompts"
        )
    if prompts and (int(lens.min()) < 1 or int(lens.max()) > max_new_tokens):
        raise ProtocolError(
            f"teacher generate reply: answer lengths outside [1, max_new_tokens={max_new_tokens}]"
        )
    if resp.dtype != torch.int32 or resp.shape != (int(lens.long().sum()),):
        raise ProtocolError(
            f"teacher generate reply: response_ids {resp.dtype}{list(resp.shape)} do not fit the lengths"
        )
    check_ids(sender("teacher", msg.header), "response_ids", resp, vocab_size)
    outputs = unpack_reply(msg, lens, top_k=top_k, vocab_size=vocab_size)
    return [
        TeacherAnswer(r.tolist(), "stop" if int(s) else "length", o)
        for r, s, o in zip(resp.split(lens.tolist()), stopped, outputs, strict=True)
    ]
