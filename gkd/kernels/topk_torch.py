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
    grad_scale: float = 1.0,  # extra factor on the gradient only (1/temperature for raw logits)
) -> torch.Tensor:
    """Return per-row values ``[C]`` (already multiplied by ``scale``); if ``need_grad``, ``z`` holds
    ``grad_scale * d(sum values)/dz`` on return. Rows with ``scale == 0`` give 0 and a 0 gradient.

    Vocabulary-wide work, whole-chunk ops only (a handful of parallel regions per chunk, none per row):
    bucket and none = the four passes of one logsumexp done in place (over the non-members for bucket,
    ``_exp_lse_``) + one scaling pass for the gradient; renorm = none (only the K gathered
    logits matter). All per-row factors are folded into [C, 1] / [C, K] coefficients before touching
    the V axis. ``z`` is clobbered even when ``need_grad`` is false.
    """
    neg = torch.full_like(lp, _NEG_INF)
    zero = torch.zeros((), dtype=z.dtype, device=z.device)
    keep = (scale != 0)[:, None]
    row_g = torch.where(keep, scale[:, None] * grad_scale, zero)  # [C, 1]
    z_raw = z.gather(1, ids)  # [C, K]
    z_top = torch.where(valid, z_raw, neg)
    if spec.tail == "renorm":
        s = z_top - torch.logsumexp(z_top, dim=-1, keepdim=True)
        t = lp - torch.logsumexp(torch.where(valid, lp, neg), dim=-1, keepdim=True)
        value, g = outcome_terms(s, t, valid, spec)
        if need_grad:
            g_top = torch.where(valid, g - g.sum(-1, keepdim=True) * s.exp(), zero)
            z.zero_().scatter_add_(1, ids, g_top * row_g)
    elif spec.tail == "none":
        lse, sums = _exp_lse_(z)  # [C, 1]; z -> exp(z - max) = sums * q
        p = torch.where(valid, lp.exp(), zero)
        value = (p * torch.where(valid, lp - (z_top - lse), zero)).sum(-1)
        if need_grad:
            # dz_v = -G q_v with G = -S, plus g_k = -p_k at the members
            z.mul_(p.sum(-1, keepdim=True) * row_g / sums)
            z.scatter_add_(1, ids, -p * row_g)
    else:
        # Remove the members (their logits are kept in z_top) to get the exact log-mass of the rest;
        # 1 - Q by subtraction would lose it when Q is close to 1. The full logsumexp then follows from
        # the two parts without another pass over the vocabulary.
        # unused slots write their own value back (a no-op), even when their id is a used one's
        z.scatter_reduce_(1, ids, torch.where(valid, neg, z_raw), reduce="amin")
        lse_rest, sums = _exp_lse_(z)  # [C, 1]; z -> sums * exp(z_v - lse_rest), members 0
        lse = torch.logaddexp(torch.logsumexp(z_top, dim=-1, keepdim=True), lse_rest)
        has_tail = torch.isfinite(lse_rest)
        log_mass = torch.logsumexp(torch.where(valid, lp, neg), dim=-1, keepdim=True)  # log S
        t_tail = torch.log(-torch.expm1(log_mass)).nan_to_num(nan=LOG_TAIL_FLOOR).clamp_min(LOG_TAIL_FLOOR)
        s_top = z_top - lse
        s_all = torch.cat([s_top, lse_rest - lse], dim=1)
        present = torch.cat([valid, has_tail], dim=1)
        value, g = outcome_terms(s_all, torch.cat([lp, t_tail], dim=1), present, spec)
        if need_grad:
            g_top, g_tail, big_g = g[:, :-1], g[:, -1:], g.sum(-1, keepdim=True)
            # non-members: exp(z_v - lse_rest) (g_tail - G exp(lse_rest - lse)); members hold 0
            coef = (g_tail - big_g * (lse_rest - lse).exp()) * row_g
            z.mul_(torch.where(has_tail, coef / torch.where(has_tail, sums, 1.0), zero))
            z.scatter_add_(1, ids, torch.where(valid, g_top - big_g * s_top.exp(), zero) * row_g)
    return torch.where(keep[:, 0], value * scale, zero)


def _exp_lse_(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Overwrite ``z`` with ``exp(z - max)`` per row; return the row logsumexp ``[C, 1]`` and the
    row sums ``[C, 1]`` of the new ``z`` (so ``softmax(z) = z / sums``: callers fold ``1 / sums`` into
    their row coefficients instead of another pass).

    The same arithmetic as ``torch.logsumexp`` (max, shifted exp, pairwise sum) in four whole-chunk
    passes and without its two ``[C, V]`` temporaries. Rows that are all ``-inf`` give ``lse = -inf``
    and zeros.
    """
    m = _row_max(z)
    m = torch.where(torch.isfinite(m), m, torch.zeros((), dtype=m.dtype, device=m.device))
    sums = z.sub_(m).exp_().sum(dim=-1, keepdim=True)
    return sums.log() + m, sums


def _row_max(z: torch.Tensor, fold: int = 8) -> torch.Tensor:
    """``z.amax(-1, keepdim=True)``. For a transposed chunk (``z.t()`` contiguous, as the fused lm_head
    path writes it) torch's strided max runs ~7x slower than on rows; reducing ``fold`` rows of ``z.t()``
    side by side first runs ~2.5x faster (the same max, exactly)."""
    c, v = z.shape
    zt = z.t()
    if z.stride(-1) == 1 or not zt.is_contiguous() or v < 2 * fold:
        return z.amax(dim=-1, keepdim=True)
    main = v - v % fold
    m = zt[:main].view(main // fold, fold * c).amax(0).view(fold, c).amax(0)
    if main < v:
        m = torch.maximum(m, zt[main:].amax(0))
    return m[:, None]


def topk_torch_chunk_(logits, ids, lp, valid, scale, spec: LossSpec, need_grad: bool):
    """Torch backend on a whole chunk the caller owns (overwritten): (values [C], dlogits [C, V] or None).

    Every vocabulary pass is one op over the chunk: a few large parallel regions rather than several
    per row, which matters most when the machine is shared (each region waits for all its threads).
    """
    z = logits if logits.dtype in (torch.float32, torch.float64) else logits.float()
    inv_t = 1.0 / spec.temperature
    if inv_t != 1.0:
        z.mul_(inv_t)
    values = topk_chunk_(z, ids, lp, valid, scale, spec, need_grad, inv_t)
    return values, (z if need_grad else None)
