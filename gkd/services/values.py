"""Value checks on the numbers a service sends back: log-probs finite and at most 0, token ids inside the
vocabulary, as many top-k columns as were asked for.

Both ends use them. A worker refuses to send a reply whose log-probs are NaN or +inf (a teacher with
broken weights, an fp16 overflow): it answers with an error naming itself instead (:func:`refuse_nonfinite`).
A client checks every reply it decodes (:func:`check_logprobs`, :func:`check_ids`) and raises
:class:`BadValues` (a ``ProtocolError``) naming the worker that sent it, which the scheduler retries and
then reports as ``PhaseFailed("score")`` / ``("generate")``. Every check is one vectorised pass over the
whole tensor; only the message looks at single elements.

``-inf`` is a valid top-k log-prob (a union row's padding slots, an fp16 underflow) but not a token's own
log-prob: the loss would turn it into an infinite value.
"""

from __future__ import annotations

import os
import socket

import torch

from gkd.services.transport import ProtocolError

#: How far above 0 a log-prob may be before it is wrong: low-precision log-softmax rounds the top token's
#: log-prob (exactly 0 in theory) to a small positive value.
LOGPROB_SLACK = 1e-2


class BadValues(ProtocolError):
    """A reply decoded fine but holds values no engine should produce (NaN, log-prob > 0, id >= V...)."""


def worker_label() -> str:
    """How a worker names itself in its replies (``service_s`` sits next to it): ``host pid N``."""
    return f"{socket.gethostname()} pid {os.getpid()}"


def sender(service: str, header: dict) -> str:
    """``teacher worker host pid 123`` from a reply's ``worker`` field (``an unnamed`` one without)."""
    label = header.get("worker")
    return f"{service} worker {label}" if isinstance(label, str) and label else f"an unnamed {service} worker"


def _first_bad(name: str, t: torch.Tensor, bad: torch.Tensor, what: str) -> str:
    count = int(bad.sum())
    index = int(bad.reshape(-1).nonzero()[0, 0])
    row = index // t.shape[1] if t.dim() == 2 else index
    value = t.reshape(-1)[index].item()
    return f"{name} has {count} {what} value(s), the first {value} at row {row}"


def logprob_problem(name: str, t: torch.Tensor, *, allow_neg_inf: bool) -> str | None:
    """Why ``t`` (log-probs, any float dtype) is not a tensor of log-probs, or None: NaN, +inf, a value
    above ``LOGPROB_SLACK``, or (unless ``allow_neg_inf``) -inf."""
    if t.numel() == 0:
        return None
    x = t.float()
    bad = torch.isnan(x) | (x > LOGPROB_SLACK)
    if not allow_neg_inf:
        bad |= torch.isneginf(x)
    if not bool(bad.any()):
        return None
    return _first_bad(name, t, bad, "non-finite or positive") + " (log-probs must be finite and <= 0)"


def ids_problem(name: str, t: torch.Tensor, vocab_size: int | None) -> str | None:
    """Why ``t`` (token ids) is not inside ``[0, vocab_size)`` (``None``: only ``>= 0``), or None."""
    if t.numel() == 0:
        return None
    lo, hi = int(t.min()), int(t.max())
    if lo >= 0 and (vocab_size is None or hi < vocab_size):
        return None
    bad = (t < 0) | (t >= vocab_size) if vocab_size is not None else t < 0
    bound = f"[0, {vocab_size})" if vocab_size is not None else ">= 0"
    return _first_bad(name, t, bad, "out-of-range") + f" (token ids must be in {bound})"


def check_logprobs(who: str, name: str, t: torch.Tensor, *, allow_neg_inf: bool) -> None:
    """Client side: :class:`BadValues` ``"<who>: <problem>"`` when :func:`logprob_problem` finds one."""
    problem = logprob_problem(name, t, allow_neg_inf=allow_neg_inf)
    if problem is not None:
        raise BadValues(f"{who}: {problem}")


def check_ids(who: str, name: str, t: torch.Tensor, vocab_size: int | None) -> None:
    """Client side: :class:`BadValues` ``"<who>: <problem>"`` when :func:`ids_problem` finds one."""
    problem = ids_problem(name, t, vocab_size)
    if problem is not None:
        raise BadValues(f"{who}: {problem}")


def refuse_nonfinite(service: str, **logprobs: tuple[torch.Tensor, bool]) -> None:
    """Worker side, before a reply is sent: ``ValueError`` naming this worker when a log-prob tensor
    (``name=(tensor, allow_neg_inf)``) holds NaN, +inf or a positive value; the worker answers with an
    error reply and keeps serving."""
    for name, (t, allow_neg_inf) in logprobs.items():
        problem = logprob_problem(name, t, allow_neg_inf=allow_neg_inf)
        if problem is not None:
            raise ValueError(
                f"{service} worker {worker_label()} refuses to send its reply: {problem}; check the "
                "model's weights and dtype"
            )
