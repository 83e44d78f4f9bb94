"""Torch implementation of the top-k distillation loss on one chunk of rows.

Works in place on a float32 logits chunk: on return the buffer holds ``dloss/dlogits`` for the chunk,
so a chunk never needs more than its own ``[C, V]`` buffer plus the temporaries of one logsumexp.

Gradient, for any of the divergences: with K+1 outcome log-probs ``s_j`` (teacher slots, then the tail
bucket) and ``g_j = dL/ds_j``, ``G = sum_j g_j``, for a vocabulary entry v

    member of the top-k (slot k):  dL/dz_v = g_k - G q_v
    outside it:                    dL/dz_v = g_tail exp(z_v - lse_rest) - G q_v

where ``q = softmax(z)`` and ``lse_rest`` is the logsumexp over non-members (so ``s_tail = lse_rest - lse``).
"""

from __future__ import annotations

import math

import torch

from gkd.kernels._common import LOG_TAIL_FLOOR, LossSpec

_NEG_INF = float("-inf")


def outcome_terms(
    s: torch.Tensor,  # [C, J] student outcome log-probs
    t: torch.Tensor,  # [C, J] teacher outcome log-probs
    present: torch.Tensor,  # [C, J] bool
    spec: LossSpec,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row divergence and its gradient with respect to ``s``; absent outcomes contribute 0."""
    zero = torch.zeros((), dtype=s.dtype, device=s.device)
    s = torch.where(present, s, zero)
    t = torch.where(present, t, zero)
    kind = spec.kind
    if kind == "forward_kl":
        p = torch.where(present, t.exp(), zero)
        return (p * (t - s)).sum(-1), -p
    q = torch.where(present, s.exp(), zero)
    if kind == "reverse_kl":
        diff = s - t
        return (q * diff).sum(-1), q * (diff + 1.0)
    beta = spec.beta
    p = torch.where(present, t.exp(), zero)
    log_b, log_1mb = math.log(beta), math.log1p(-beta)
    # log M - s and log M - t, each as a logaddexp of two terms so that they keep full precision when
    # beta is close to 0 or 1 (normalised JSD divides by beta (1 - beta) afterwards).
    d_s = torch.logaddexp(torch.full_like(s, log_1mb), log_b + (t - s))
    d_t = torch.logaddexp(torch.full_like(t, log_b), log_1mb + (s - t))
    scale = spec.jsd_scale
    value = -(beta * (p * d_t).sum(-1) + (1.0 - beta) * (q * d_s).sum(-1))
    grad = -(1.0 - beta) * q * d_s  # d/ds of the value above: the M-terms cancel
    return value * scale, grad * scale


def topk_chunk_(
    z: torch.Tensor,  # [C, V] float32 logits (already divided by the temperature); overwritten
    ids: torch.Tensor,  # [C, K] int64, unused slots point at a valid index (e.g. 0)
    lp: torch.Tensor,  # [C, K] float32 teacher log-probs, -inf for unused slots
    valid: torch.Tensor,  # [C, K] bool
    scale: torch.Tensor,  # [C] float32 row weights (mask, mean and upstream gradient folded in)
    spec: LossSpec,
    need_grad: bool,
) -> torch.Tensor:
    """Return per-row values ``[C]`` (already multiplied by ``scale``); if ``need_grad``, ``z`` holds
    ``d(sum values)/dz`` on return (multiply by 1/temperature for the gradient of raw logits)."""
    neg = torch.full_like(lp, _NEG_INF)
    z_top = z.gather(1, ids)  # [C, K]
    if spec.tail == "renorm":
        z_top = torch.where(valid, z_top, neg)
        lse_top = torch.logsumexp(z_top, dim=-1, keepdim=True)
        s = z_top - lse_top
        log_s = torch.logsumexp(torch.where(valid, lp, neg), dim=-1, keepdim=True)
        t = lp - log_s
        value, g = outcome_terms(s, t, valid, spec)
        if need_grad:
            big_g = g.sum(-1, keepdim=True)
            g_top = torch.where(valid, g - big_g * s.exp(), torch.zeros_like(g))
            z.zero_().scatter_add_(1, ids, g_top)
    else:
        lse = torch.logsumexp(z, dim=-1, keepdim=True)  # [C, 1]
        s_top = z_top - lse
        if spec.tail == "none":
            p = torch.where(valid, lp.exp(), torch.zeros_like(lp))
            value = (p * torch.where(valid, lp - s_top, torch.zeros_like(lp))).sum(-1)
            g_top, g_tail, big_g, lse_rest = -p, None, -p.sum(-1, keepdim=True), lse
        else:
            # Remove the members from the chunk (their logits are kept in z_top) to get the exact
            # log-mass of the rest; 1 - Q by subtraction would lose it when Q is close to 1.
            z.scatter_reduce_(1, ids, torch.where(valid, neg, z_top), reduce="amin")
            lse_rest = torch.logsumexp(z, dim=-1, keepdim=True)
            has_tail = torch.isfinite(lse_rest)
            log_mass = torch.logsumexp(torch.where(valid, lp, neg), dim=-1, keepdim=True)  # log S
            t_tail = (
                torch.log(-torch.expm1(log_mass)).nan_to_num(nan=LOG_TAIL_FLOOR).clamp_min(LOG_TAIL_FLOOR)
            )
            s_all = torch.cat([s_top, lse_rest - lse], dim=1)
            t_all = torch.cat([lp, t_tail], dim=1)
            present = torch.cat([valid, has_tail], dim=1)
            value, g = outcome_terms(s_all, t_all, present, spec)
            g_top, g_tail = g[:, :-1], g[:, -1:]
            big_g = g.sum(-1, keepdim=True)
        if need_grad:
            if g_tail is None:
                # non-members: -G q_v
                z.sub_(lse).exp_().mul_(-big_g)
            else:
                # non-members: exp(z_v - lse_rest) (g_tail - G exp(lse_rest - lse)); members hold -inf -> 0
                safe_rest = torch.where(has_tail, lse_rest, torch.zeros_like(lse_rest))
                coef = torch.where(
                    has_tail, g_tail - big_g * (lse_rest - lse).exp(), torch.zeros_like(g_tail)
                )
                z.sub_(safe_rest).exp_().mul_(coef)
            g_mem = torch.where(valid, g_top - big_g * s_top.exp(), torch.zeros_like(g_top))
            if g_tail is None:
                # members currently hold -G q_v; add g_k
                z.scatter_add_(1, ids, torch.where(valid, g_top, torch.zeros_like(g_top)))
            else:
                z.scatter_add_(1, ids, g_mem)
    keep = scale != 0
    value = torch.where(keep, value * scale, torch.zeros_like(value))
    if need_grad:
        z.mul_(scale[:, None]).masked_fill_(~keep[:, None], 0.0)
    return value
