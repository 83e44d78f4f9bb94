"""Readable ground truth for the distillation losses. Tests and benchmarks only.

It materialises the full ``[N, V]`` log-softmax, builds the explicit outcome distributions and lets
autograd produce gradients, so it shares no hand-derived formula with the fast paths. Pass float64
inputs for a tight reference.
"""

from __future__ import annotations

import torch

from gkd.kernels._common import (
    LOG_TAIL_FLOOR,
    REDUCTIONS,
    TAIL_FLOOR,
    LossSpec,
    check_choice,
    reduce_weighted,
)


def _divergence(s: torch.Tensor, t: torch.Tensor, present: torch.Tensor, spec: LossSpec) -> torch.Tensor:
    """Per-row divergence between student outcome log-probs ``s`` and teacher ``t`` (both [N, J])."""
    s = torch.where(present, s, torch.zeros_like(s))
    t = torch.where(present, t, torch.zeros_like(t))
    p = torch.where(present, t.exp(), torch.zeros_like(t))
    q = torch.where(present, s.exp(), torch.zeros_like(s))
    kind = spec.kind
    if kind == "forward_kl":  # KL(P || Q)
        return (p * (t - s)).sum(-1)
    if kind == "reverse_kl":  # KL(Q || P)
        return (q * (s - t)).sum(-1)
    beta = spec.beta  # JSD_beta = beta KL(P || M) + (1 - beta) KL(Q || M), M = beta P + (1 - beta) Q
    log_m = torch.logaddexp(
        t + torch.log(torch.tensor(beta, dtype=t.dtype)),
        s + torch.log(torch.tensor(1.0 - beta, dtype=s.dtype)),
    )
    value = beta * (p * (t - log_m)).sum(-1) + (1.0 - beta) * (q * (s - log_m)).sum(-1)
    return value * spec.jsd_scale


def topk_distill_loss_reference(
    student_logits: torch.Tensor,  # [N, V]
    teacher_ids: torch.Tensor,  # [N, K] int
    teacher_logprobs: torch.Tensor,  # [N, K]; -inf marks an unused slot
    mask: torch.Tensor | None = None,  # [N] bool or float weights
    *,
    reduction: str = "sum",
    **options,
) -> torch.Tensor:
    """Top-k distillation loss, computed the obvious way (see gkd.kernels.topk_distill_loss). ``options``:
    ``LossSpec``'s fields (loss, tail, beta, normalize_jsd, temperature), with its defaults."""
    spec = LossSpec(**options)
    check_choice("reduction", reduction, REDUCTIONS)
    tail, temperature = spec.tail, spec.temperature
    dtype = student_logits.dtype
    n, vocab = student_logits.shape
    logq = torch.log_softmax(student_logits / temperature, dim=-1)  # [N, V]
    valid = teacher_logprobs > float("-inf")  # [N, K]
    ids = torch.where(valid, teacher_ids.long(), torch.zeros_like(teacher_ids, dtype=torch.long))
    lp = teacher_logprobs.to(dtype)
    s_top = logq.gather(1, ids)  # [N, K]

    if tail == "none":
        p = torch.where(valid, lp.exp(), torch.zeros_like(lp))
        diff = torch.where(valid, lp - s_top, torch.zeros_like(lp))
        per_row = (p * diff).sum(-1)
    elif tail == "renorm":
        neg = torch.full_like(s_top, float("-inf"))
        s = torch.where(valid, s_top, neg)
        s = s - torch.logsumexp(s, dim=-1, keepdim=True)
        t = torch.where(valid, lp, neg)
        t = t - torch.logsumexp(t, dim=-1, keepdim=True)
        per_row = _divergence(s, t, valid, spec)
    else:  # bucket: K teacher ids + one bucket with all remaining vocabulary mass
        # counts, not a bool scatter: unused slots may repeat a used id and must not overwrite it
        counts = torch.zeros(n, vocab, dtype=logq.dtype, device=logq.device)
        member = counts.scatter_add_(1, ids, valid.to(logq.dtype)) > 0
        s_tail = torch.logsumexp(logq.masked_fill(member, float("-inf")), dim=-1)  # log(1 - Q), exact
        mass = torch.where(valid, lp.exp(), torch.zeros_like(lp)).sum(-1)  # S
        t_tail = torch.log(torch.clamp(1.0 - mass, min=TAIL_FLOOR))
        t_tail = torch.clamp(t_tail, min=LOG_TAIL_FLOOR)
        has_tail = torch.isfinite(s_tail)  # empty when the top-k covers the whole vocabulary
        s = torch.cat([s_top, s_tail[:, None]], dim=1)
        t = torch.cat([lp, t_tail[:, None]], dim=1)
        present = torch.cat([valid, has_tail[:, None]], dim=1)
        per_row = _divergence(s, t, present, spec)

    w = torch.ones(n, dtype=dtype, device=per_row.device) if mask is None else mask.to(dtype)
    per_row = torch.where(w != 0, per_row * w, torch.zeros_like(per_row))
    return reduce_weighted(per_row, w, reduction)
