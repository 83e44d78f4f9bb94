"""The teacher service's wire format and its worker handler.

Two ops: ``score`` (below) and ``generate`` (the teacher samples answers: ``gkd.teacher.generate_wire``).
``score`` request (fields + int32 tensors, all flat)::

    fields   top_k: int | None, temperature: float | None   (None: the service's default)
             offset: int  (index of the first sequence in the caller's whole batch, for error messages)
    tensors  input_ids      [sum(P + R)] int32   each sequence's prompt then response, back to back
             prompt_lens    [S] int32
             response_lens  [S] int32
             requested_ids  [sum R, M] int32   optional: ids to score at each response position besides
                                               the top-k (the student's top-m and its sampled token)

Reply (response positions only; row j of a sequence predicts its response token j)::

    fields   top_k, temperature (as applied); worker: "host pid N" (named in the client's value errors)
             support: "topk" | "union"   union: each row is the top-k then the requested ids not among
                      them, deduplicated, padded with (id 0, -inf) to W = min(K + M, V) slots; topk: an
                      engine that cannot gather arbitrary ids (vLLM) answers a request with ids with its
                      top-W instead, W = K + M
    tensors  topk_ids        [sum R, W] int32     (W = K without requested_ids)
             topk_logprobs   [sum R, K] float16 | float32 (the service's ``--logprob-dtype``)
             token_logprobs  [sum R] float32
             response_lens   [S] int32 (echoed, so the client can check the reply fits its request)

Values are checked at both ends (``gkd.services.values``): a worker answers with an error rather than send
NaN/+inf/positive log-probs; the client refuses those, ids outside the vocabulary and columns other than
asked (``BadValues`` naming the worker). An input the engine refuses (``check_sequences``: ids outside
the vocabulary, empty prompt/response, too long, top_k above the served maximum) becomes an error
reply whose message names the sequence by its index in the caller's batch; the worker keeps serving.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import torch

from gkd.services.transport import Limits, Message, ProtocolError
from gkd.services.values import BadValues, check_ids, check_logprobs, refuse_nonfinite, sender, worker_label
from gkd.teacher.types import LOGPROB_DTYPES, SUPPORTS, TeacherOutput

OP_SCORE = "score"
OP_GENERATE = "generate"
OPS = (OP_SCORE, OP_GENERATE)

#: Request bounds, enforced by the broker (before queueing) and the worker (before decoding): a request is
#: int32 token ids plus two length vectors, so 8 MiB is ~2M tokens; the client splits bigger batches into
#: micro-requests far below these (16384 tokens by default).
LIMITS = Limits(
    max_message_bytes=8 << 20,
    max_sequences=1 << 14,
    max_tokens=1 << 20,
    sequence_tensors=("prompt_lens", "response_lens"),
    token_tensors=("input_ids",),
)
#: Reply bounds (the client's decode): [tokens, K] ids and log-probs are K times a request's size.
REPLY_LIMITS = Limits(
    max_message_bytes=1 << 30,
    max_sequences=1 << 14,
    max_tokens=1 << 21,
    sequence_tensors=("response_lens",),
    token_tensors=("token_logprobs",),
)

_INT32 = (-(1 << 31), (1 << 31) - 1)


def _flat_ids(part: Any) -> torch.Tensor:
    t = (
        torch.as_tensor(part)
        if len(part) or isinstance(part, torch.Tensor)
        else torch.empty(0, dtype=torch.long)
    )
    if t.dtype.is_floating_point or t.dtype == torch.bool:
        raise TypeError(f"token ids must be integers, got {t.dtype}")
    return t.reshape(-1)


def pack_request(
    sequences: Sequence[tuple[Any, Any]],
    top_k: int | None,
    temperature: float | None,
    offset: int = 0,
    requested_ids: Sequence[torch.Tensor] | None = None,
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """``(prompt_ids, response_ids)`` pairs (lists or 1-D integer tensors) -> request fields + tensors.
    ``requested_ids``: one ``[R, M]`` integer tensor per sequence (the same M for all), or None."""
    parts: list[torch.Tensor] = []
    prompt_lens, response_lens = [], []
    for i, seq in enumerate(sequences):
        if len(seq) != 2:
            raise ValueError(
                f"sequence {offset + i}: expected (prompt_ids, response_ids), got {len(seq)} parts"
            )
        prompt, response = _flat_ids(seq[0]), _flat_ids(seq[1])
        parts += [prompt, response]
        prompt_lens.append(prompt.numel())
        response_lens.append(response.numel())
    ids = torch.cat(parts).long() if parts else torch.empty(0, dtype=torch.long)
    if ids.numel() and (int(ids.min()) < _INT32[0] or int(ids.max()) > _INT32[1]):
        raise ValueError("token ids must fit in int32")
    fields = {"top_k": top_k, "temperature": temperature, "offset": int(offset)}
    tensors = {
        "input_ids": ids.to(torch.int32),
        "prompt_lens": torch.tensor(prompt_lens, dtype=torch.int32),
        "response_lens": torch.tensor(response_lens, dtype=torch.int32),
    }
    if requested_ids is not None:
        if len(requested_ids) != len(sequences):
            raise ValueError(f"{len(requested_ids)} requested-id tensors for {len(sequences)} sequences")
        for i, (t, r) in enumerate(zip(requested_ids, response_lens, strict=True)):
            if t.dim() != 2 or t.shape[0] != r or t.shape[1] != requested_ids[0].shape[1]:
                raise ValueError(
                    f"sequence {offset + i}: requested ids {list(t.shape)} must be [R={r}, M] with the same "
                    "M for every sequence"
                )
        req = torch.cat([t.long() for t in requested_ids]) if requested_ids else torch.empty(0, 1)
        if req.numel() and (int(req.min()) < _INT32[0] or int(req.max()) > _INT32[1]):
            raise ValueError("requested ids must fit in int32")
        tensors["requested_ids"] = req.to(torch.int32)
    return fields, tensors


def unpack_requested(tensors: dict[str, torch.Tensor]) -> list[torch.Tensor] | None:
    """The request's ``requested_ids`` split per sequence (``[R, M]`` views), or None when absent. Raises
    ``ValueError`` when its shape or dtype does not fit the response lengths."""
    req = tensors.get("requested_ids")
    if req is None:
        return None
    rlens = tensors["response_lens"]
    rows = int(rlens.long().sum())
    if req.dtype != torch.int32 or req.dim() != 2 or req.shape[0] != rows or req.shape[1] < 1:
        raise ValueError(
            f"requested_ids must be an int32 tensor [{rows}, M >= 1] (one row per response token), got "
            f"{req.dtype}{list(req.shape)}"
        )
    return list(req.split(rlens.tolist()))


def unpack_request(header: dict[str, Any], tensors: dict[str, torch.Tensor]) -> list[tuple[list, list]]:
    """Request tensors -> ``(prompt_ids, response_ids)`` lists; raises ``ValueError`` on inconsistency."""
    missing = {"input_ids", "prompt_lens", "response_lens"} - set(tensors)
    if missing:
        raise ValueError(f"request lacks tensors {sorted(missing)}")
    ids, plens, rlens = tensors["input_ids"], tensors["prompt_lens"], tensors["response_lens"]
    for name, t in (("input_ids", ids), ("prompt_lens", plens), ("response_lens", rlens)):
        if t.dtype != torch.int32 or t.dim() != 1:
            raise ValueError(f"{name} must be a 1-D int32 tensor, got {t.dtype}{list(t.shape)}")
    if plens.numel() != rlens.numel():
        raise ValueError(f"prompt_lens has {plens.numel()} entries but response_lens {rlens.numel()}")
    if plens.numel() and (int(plens.min()) < 0 or int(rlens.min()) < 0):
        raise ValueError("sequence lengths must be non-negative")
    lens = torch.stack([plens, rlens], 1).reshape(-1).long()  # [2S]: p0, r0, p1, r1, ...
    if int(lens.sum()) != ids.numel():
        raise ValueError(f"lengths add up to {int(lens.sum())} tokens but input_ids has {ids.numel()}")
    pieces = ids.long().split(lens.tolist())
    return [(pieces[2 * i].tolist(), pieces[2 * i + 1].tolist()) for i in range(plens.numel())]


def make_handler(engine, *, default_top_k: int, default_temperature: float = 1.0, logprob_dtype: str):
    """The worker handler around ``engine.score`` and ``engine.generate`` (one request at a time, as the
    Worker calls it)."""
    out_dtype = LOGPROB_DTYPES[logprob_dtype]

    def common(header: dict[str, Any]) -> tuple[int, float, int]:
        top_k = header.get("top_k")
        top_k = default_top_k if top_k is None else top_k
        temperature = header.get("temperature")
        temperature = default_temperature if temperature is None else temperature
        offset = header.get("offset", 0)
        if type(top_k) is not int or not isinstance(temperature, int | float) or type(offset) is not int:
            raise ValueError("fields top_k and offset must be ints and temperature a number")
        return top_k, float(temperature), offset

    def handle_generate(header: dict[str, Any], tensors: dict[str, torch.Tensor]):
        from gkd.teacher.generate_wire import generate_reply, unpack_generate_request

        top_k, temperature, offset = common(header)
        if not hasattr(engine, "generate"):
            raise ValueError(f"the {type(engine).__name__} teacher engine does not serve generate")
        prompts, settings = unpack_generate_request(header, tensors)
        start = time.perf_counter()
        answers = engine.generate(prompts, settings, top_k, temperature, index_offset=offset)
        seconds = time.perf_counter() - start
        fields = {"top_k": top_k, "temperature": temperature, "support": "topk", "service_s": seconds}
        reply = generate_reply(answers, top_k, out_dtype)
        refuse_nonfinite(
            "teacher",
            topk_logprobs=(reply["topk_logprobs"], True),
            token_logprobs=(reply["token_logprobs"], False),
        )
        return {**fields, "worker": worker_label()}, reply

    def handle(header: dict[str, Any], tensors: dict[str, torch.Tensor]):
        if header.get("op") == OP_GENERATE:
            return handle_generate(header, tensors)
        top_k, temperature, offset = common(header)
        sequences = unpack_request(header, tensors)
        requested = unpack_requested(tensors)
        start = time.perf_counter()
        # the engine checks the request (sequences named by their index in the caller's batch)
        outputs = engine.score(sequences, top_k, float(temperature), requested, index_offset=offset)
        seconds = time.perf_counter() - start
        k = top_k  # the width of an empty reply
        if outputs:
            topk_ids = torch.cat([o.topk_ids for o in outputs]).to(torch.int32)
            topk_lp = torch.cat([o.topk_logprobs for o in outputs]).to(out_dtype)
            token_lp = torch.cat([o.token_logprobs for o in outputs]).float()
        else:
            topk_ids, topk_lp = torch.empty(0, k, dtype=torch.int32), torch.empty(0, k, dtype=out_dtype)
            token_lp = torch.empty(0)
        support = outputs[0].support if outputs else ("topk" if requested is None else "union")
        # an engine that computed NaN/inf (broken weights, an overflow) answers with an error, never numbers
        refuse_nonfinite("teacher", topk_logprobs=(topk_lp, True), token_logprobs=(token_lp, False))
        fields = {"top_k": top_k, "temperature": float(temperature), "support": support, "service_s": seconds}
        fields["worker"] = worker_label()
        reply = {
            "topk_ids": topk_ids,
            "topk_logprobs": topk_lp,
            "token_logprobs": token_lp,
            "response_lens": tensors["response_lens"].clone(),
        }
        return fields, reply

    return handle


def unpack_reply(
    msg: Message,
    response_lens: torch.Tensor,
    *,
    top_k: int | None = None,
    requested: int | None = 0,
    vocab_size: int | None = None,
) -> list[TeacherOutput]:
    """Reply -> one ``TeacherOutput`` per sequence (views into the received frames, no copy).

    Checked besides shapes and dtypes (``BadValues``, naming the worker): log-probs finite and <= 0 (-inf
    allowed in the top-k columns), ids in ``[0, vocab_size)`` (``>= 0`` when None), and the columns asked
    for: ``top_k`` (None: the service's default, as the reply reports it) plus ``requested`` ids per row
    (``K + M`` for support ``topk``, between ``K`` and ``K + M`` for ``union``; None: at least ``K``)."""
    t = msg.tensors
    missing = {"topk_ids", "topk_logprobs", "token_logprobs", "response_lens"} - set(t)
    if missing:
        raise ProtocolError(f"teacher reply lacks tensors {sorted(missing)}")
    if not torch.equal(t["response_lens"].long(), response_lens.long()):
        raise ProtocolError("teacher reply's response_lens do not match the request")
    rows = int(response_lens.sum())
    ids, lp, tok = t["topk_ids"], t["topk_logprobs"], t["token_logprobs"]
    if ids.dim() != 2 or ids.shape[0] != rows or lp.shape != ids.shape or tok.shape != (rows,):
        shapes = [list(ids.shape), list(lp.shape), list(tok.shape)]
        raise ProtocolError(f"teacher reply shapes {shapes} do not fit {rows} response tokens")
    if ids.dtype != torch.int32 or lp.dtype not in LOGPROB_DTYPES.values() or tok.dtype != torch.float32:
        raise ProtocolError(
            f"teacher reply dtypes {ids.dtype}, {lp.dtype}, {tok.dtype} are not the contract's"
        )
    support = msg.header.get("support", "topk")
    if support not in SUPPORTS:
        raise ProtocolError(f"teacher reply's support {support!r} is not one of {SUPPORTS}")
    who = sender("teacher", msg.header)
    _check_columns(who, ids.shape[1], msg.header.get("top_k"), top_k, requested, support)
    check_ids(who, "topk_ids", ids, vocab_size)
    check_logprobs(who, "topk_logprobs", lp, allow_neg_inf=True)
    check_logprobs(who, "token_logprobs", tok, allow_neg_inf=False)
    counts = response_lens.tolist()
    seconds = msg.header.get("service_s")
    share = (
        float(seconds) / len(counts) if isinstance(seconds, int | float) and seconds >= 0 and counts else 0.0
    )
    return [
        TeacherOutput(a, b, c, support, share)
        for a, b, c in zip(ids.split(counts), lp.split(counts), tok.split(counts), strict=True)
    ]


def _check_columns(
    who: str, width: int, applied: Any, asked: int | None, requested: int | None, support: str
) -> None:
    """The reply's row width against the request: ``BadValues`` naming the worker when they differ. A reply
    without ``top_k`` (older workers) is held to the asked one; with neither, nothing is checked."""
    applied = asked if applied is None else applied
    if applied is None:
        return
    if type(applied) is not int or applied < 1 or (asked is not None and applied != asked):
        raise BadValues(f"{who}: the reply applied top_k={applied!r} but {asked} was asked for")
    if requested is None:
        low, high = applied, width
    elif support == "topk" or requested == 0:
        low = high = applied + requested
    else:  # the union of the top-k and the requested ids, padded to min(K + M, V) (V: the teacher's rows)
        low, high = applied, applied + requested
    if not low <= width <= high:
        span = str(low) if low == high else f"{low}..{high}"
        raise BadValues(
            f"{who}: the reply has {width} columns per row where top_k={applied} and {requested} requested "
            f"id(s) with support {support!r} give {span}"
        )
