"""Triton kernels for the top-k distillation loss on one chunk of rows (the CUDA backend).

One program per row. The kernel reads the row's logits tile by tile (BLOCK_V entries at a time) and
keeps everything else in registers: pass 1 folds the tiles into two online logsumexps, one over the
whole vocabulary and one over the entries that are not among the row's valid teacher ids (the exact
log-mass of the tail bucket, never ``log(1 - Q)`` by subtraction); the K member logits are then
gathered with one load, the row's divergence and its gradient with respect to the K+1 outcome
log-probs are formed, and pass 2 writes ``dloss/dlogits`` tile by tile over the logits it has just
read (the Liger-Kernel habit: the loss kernel writes the input gradient during forward).

Gradient (see gkd.kernels.topk_torch): with ``g_j = dL/ds_j`` for the outcome log-probs and
``G = sum_j g_j``,

    member (slot k):  dL/dz_v = g_k - G q_v
    non-member:       dL/dz_v = g_tail exp(z_v - lse_rest) - G q_v     (tail="bucket")
                      dL/dz_v = -G q_v                                  (tail="none", G = -S)
                      dL/dz_v = 0                                       (tail="renorm", q := q/Q on the ids)

with ``z = logits / T``; the kernel stores ``scale * dL/dz / T``, the gradient of the raw logits.
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

from gkd.kernels._common import LOG_TAIL_FLOOR, TAIL_FLOOR, LossSpec
from gkd.kernels.topk_torch import topk_chunk_

# constexpr codes of the loss kind and the tail treatment
_KINDS = {"forward_kl": 0, "reverse_kl": 1, "jsd": 2}
_TAILS = {"bucket": 0, "renorm": 1, "none": 2}

# Largest BLOCK_V x BLOCK_K membership tile (int1 compares) a program builds per vocab tile.
_MAX_MEMBERSHIP_TILE = 1 << 16
_MAX_BLOCK_V = 4096
_MAX_BLOCK_V_INTERPRET = 1024


@triton.jit
def _log1p_small(x):
    """log(1 + x) for x in [0, 1], precise for tiny x (Goldberg: log(u) x / (u - 1), u = 1 + x)."""
    u = 1.0 + x
    exact = u == 1.0
    den = tl.where(exact, 1.0, u - 1.0)
    return tl.where(exact, x, tl.log(u) * (x / den))


@triton.jit
def _logaddexp(a, b):
    hi = tl.maximum(a, b)
    lo = tl.minimum(a, b)
    return hi + _log1p_small(tl.exp(lo - hi))


@triton.jit
def _round_fp32_to_bf16_grid(x):
    """fp32 -> the nearest bf16 value (ties to even), as fp32. The Triton interpreter truncates fp32 -> bf16
    casts (compiled code rounds to nearest); this makes its stores round like the GPU's."""
    bits = x.to(tl.uint32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _outcome_terms(
    s,  # [BLOCK_K] or scalar fp32 student outcome log-probs (0 where absent)
    t,  # same shape, fp32 teacher outcome log-probs (0 where absent)
    beta,  # fp32 scalar (jsd)
    log_b,  # fp32 scalar log(beta) (jsd)
    log_1mb,  # fp32 scalar log1p(-beta) (jsd)
    KIND: tl.constexpr,
):
    """Elementwise divergence terms and their derivatives with respect to ``s`` (jsd unscaled)."""
    if KIND == 0:  # forward KL: p (t - s)
        p = tl.exp(t)
        term = p * (t - s)
        grad = -p
    elif KIND == 1:  # reverse KL: q (s - t)
        q = tl.exp(s)
        diff = s - t
        term = q * diff
        grad = q * (diff + 1.0)
    else:  # jsd: -(beta p (log M - t) + (1 - beta) q (log M - s)); the M-terms cancel in the derivative
        p = tl.exp(t)
        q = tl.exp(s)
        d_s = _logaddexp(log_1mb, log_b + (t - s))  # log M - s
        d_t = _logaddexp(log_b, log_1mb + (s - t))  # log M - t
        term = -(beta * p * d_t + (1.0 - beta) * q * d_s)
        grad = -(1.0 - beta) * q * d_s
    return term, grad


@triton.jit
def _topk_distill_fwd_kernel(
    logits_ptr,  # [C, V] fp32 / bf16 / fp16 logits, row stride `stride_row`; dlogits on return (NEED_GRAD)
    ids_ptr,  # [C, K] int64 / int32 teacher ids, contiguous; unused slots point at a valid index
    lp_ptr,  # [C, K] fp32 teacher log-probs, contiguous; -inf for unused slots
    valid_ptr,  # [C, K] uint8 (a bool tensor viewed as uint8), contiguous
    scale_ptr,  # [C] fp32 row weights
    values_ptr,  # [C] fp32 out: scale * divergence
    stride_row,  # int: elements between rows of logits
    V,  # int: vocabulary size
    K,  # int: teacher slots per row
    inv_t,  # fp32: 1 / temperature
    beta,  # fp32: jsd beta
    log_b,  # fp32: log(beta) (jsd only)
    log_1mb,  # fp32: log1p(-beta) (jsd only)
    jsd_scale,  # fp32: 1 / (beta (1 - beta)) for normalised jsd, else 1
    tail_floor,  # fp32: TAIL_FLOOR
    log_tail_floor,  # fp32: LOG_TAIL_FLOOR
    KIND: tl.constexpr,  # 0 forward_kl, 1 reverse_kl, 2 jsd
    TAIL: tl.constexpr,  # 0 bucket, 1 renorm, 2 none
    NEED_GRAD: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_K: tl.constexpr,  # next power of two >= K
    ROUND_BF16: tl.constexpr,  # interpreter + bf16 logits: round dlogits to nearest before the store
):
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * stride_row
    neg_inf = float("-inf")

    offs_k = tl.arange(0, BLOCK_K)  # [BLOCK_K]
    kmask = offs_k < K
    ids = tl.load(ids_ptr + row * K + offs_k, mask=kmask, other=0).to(tl.int64)
    valid = (tl.load(valid_ptr + row * K + offs_k, mask=kmask, other=0) != 0) & kmask
    lp = tl.load(lp_ptr + row * K + offs_k, mask=kmask, other=neg_inf).to(tl.float32)
    member_ids = tl.where(valid, ids, -1)  # [BLOCK_K]; -1 matches no vocabulary entry
    scale = tl.load(scale_ptr + row).to(tl.float32)
    keep = scale != 0.0

    # the K member logits, one gather
    z_top = tl.load(row_ptr + ids, mask=valid, other=0.0).to(tl.float32) * inv_t  # [BLOCK_K]

    lse = 0.0
    lse_rest = 0.0
    has_tail = False
    tail_coef = 0.0
    if TAIL == 1:
        # renorm: both distributions renormalised over the valid ids; no pass over the vocabulary
        zt = tl.where(valid, z_top, neg_inf)
        m_top = tl.max(zt, 0)
        m_top = tl.where(m_top == neg_inf, 0.0, m_top)
        sum_top = tl.sum(tl.exp(zt - m_top), 0)
        lse_top = m_top + tl.log(tl.where(sum_top > 0.0, sum_top, 1.0))  # 0 for a row without slots
        lt = tl.where(valid, lp, neg_inf)
        m_lp = tl.max(lt, 0)
        m_lp = tl.where(m_lp == neg_inf, 0.0, m_lp)
        sum_lp = tl.sum(tl.exp(lt - m_lp), 0)
        lse_lp = m_lp + tl.log(tl.where(sum_lp > 0.0, sum_lp, 1.0))
        lp = tl.where(valid, lp, 0.0)
        s = tl.where(valid, z_top - lse_top, 0.0)
        t = tl.where(valid, lp - lse_lp, 0.0)
        term, g = _outcome_terms(s, t, beta, log_b, log_1mb, KIND)
        term = tl.where(valid, term, 0.0)
        g = tl.where(valid, g, 0.0) * jsd_scale
        value = tl.sum(term, 0) * jsd_scale
        big_g = tl.sum(g, 0)
        g_member = tl.where(valid, g - big_g * tl.exp(s), 0.0)
    else:
        # pass 1: online logsumexp over all entries and over the non-members
        m_all = neg_inf
        d_all = 0.0
        m_rest = neg_inf
        d_rest = 0.0
        for start in range(0, V, BLOCK_V):
            offs = start + tl.arange(0, BLOCK_V)  # [BLOCK_V]
            x = tl.load(row_ptr + offs, mask=offs < V, other=neg_inf).to(tl.float32) * inv_t
            m_new = tl.maximum(m_all, tl.max(x, 0))
            m_safe = tl.where(m_new == neg_inf, 0.0, m_new)
            d_all = d_all * tl.exp(m_all - m_safe) + tl.sum(tl.exp(x - m_safe), 0)
            m_all = m_new
            if TAIL == 0:
                hit = tl.sum((offs[:, None] == member_ids[None, :]).to(tl.int32), 1) > 0  # [BLOCK_V]
                xr = tl.where(hit, neg_inf, x)
                mr_new = tl.maximum(m_rest, tl.max(xr, 0))
                mr_safe = tl.where(mr_new == neg_inf, 0.0, mr_new)
                d_rest = d_rest * tl.exp(m_rest - mr_safe) + tl.sum(tl.exp(xr - mr_safe), 0)
                m_rest = mr_new
        lse = m_all + tl.log(d_all)
        s_top = tl.where(valid, z_top - lse, 0.0)
        t_top = tl.where(valid, lp, 0.0)
        term, g = _outcome_terms(s_top, t_top, beta, log_b, log_1mb, KIND)
        term = tl.where(valid, term, 0.0)
        g = tl.where(valid, g, 0.0) * jsd_scale
        value = tl.sum(term, 0) * jsd_scale
        big_g = tl.sum(g, 0)
        if TAIL == 0:
            # the bucket: teacher 1 - S (floored), student exp(lse_rest - lse); absent if no non-members
            has_tail = d_rest > 0.0
            lse_rest = tl.where(has_tail, m_rest + tl.log(tl.where(has_tail, d_rest, 1.0)), 0.0)
            mass = tl.sum(tl.where(valid, tl.exp(lp), 0.0), 0)
            t_tail = tl.maximum(tl.log(tl.maximum(1.0 - mass, tail_floor)), log_tail_floor)
            s_tail = tl.where(has_tail, lse_rest - lse, 0.0)
            term_tail, g_tail = _outcome_terms(s_tail, t_tail, beta, log_b, log_1mb, KIND)
            g_tail = tl.where(has_tail, g_tail * jsd_scale, 0.0)
            value += tl.where(has_tail, term_tail * jsd_scale, 0.0)
            big_g += g_tail
            # non-members: exp(z_v - lse_rest) (g_tail - G exp(lse_rest - lse))
            tail_coef = tl.where(has_tail, g_tail - big_g * tl.exp(s_tail), 0.0)
        g_member = tl.where(valid, g - big_g * tl.exp(s_top), 0.0)

    tl.store(values_ptr + row, tl.where(keep, value * scale, 0.0))

    if NEED_GRAD:
        # pass 2: dlogits tile by tile, in place, already scaled for the raw logits
        out_scale = scale * inv_t
        for start in range(0, V, BLOCK_V):
            offs = start + tl.arange(0, BLOCK_V)  # [BLOCK_V]
            vmask = offs < V
            eq = offs[:, None] == member_ids[None, :]  # [BLOCK_V, BLOCK_K]
            d_member = tl.sum(tl.where(eq, g_member[None, :], 0.0), 1)  # [BLOCK_V]
            if TAIL == 1:
                dz = d_member
            else:
                hit = tl.sum(eq.to(tl.int32), 1) > 0
                x = tl.load(row_ptr + offs, mask=vmask, other=0.0).to(tl.float32) * inv_t
                if TAIL == 0:
                    d_rest_v = tl.where(has_tail, tail_coef * tl.exp(x - lse_rest), 0.0)
                else:
                    d_rest_v = -big_g * tl.exp(x - lse)
                dz = tl.where(hit, d_member, d_rest_v)
            dz = tl.where(keep, dz * out_scale, 0.0)
            if ROUND_BF16:
                dz = _round_fp32_to_bf16_grid(dz)
            tl.store(row_ptr + offs, dz.to(logits_ptr.dtype.element_ty), mask=vmask)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _block_sizes(vocab: int, k: int, device: torch.device) -> tuple[int, int]:
    block_k = triton.next_power_of_2(max(k, 1))
    cap = _MAX_BLOCK_V if device.type == "cuda" and not _interpreting() else _MAX_BLOCK_V_INTERPRET
    # keep the [BLOCK_V, BLOCK_K] membership tile bounded for large K
    cap = min(cap, max(128, _MAX_MEMBERSHIP_TILE // block_k))
    return min(triton.next_power_of_2(max(vocab, 1)), cap), block_k


def topk_distill_forward(
    logits: torch.Tensor,  # [C, V] fp32 / bf16 / fp16, unit stride along V; overwritten when need_grad
    ids: torch.Tensor,  # [C, K] int64 / int32
    lp: torch.Tensor,  # [C, K] fp32 teacher log-probs, -inf for unused slots
    valid: torch.Tensor,  # [C, K] bool
    scale: torch.Tensor,  # [C] fp32 row weights
    spec: LossSpec,
    need_grad: bool,
    block_v: int | None = None,
) -> torch.Tensor:
    """Launch the kernel; return values [C] fp32. With ``need_grad`` the logits buffer holds
    ``d(sum values)/d logits`` on return. ``block_v`` (a power of two) overrides the tile width."""
    c, vocab = logits.shape
    k = ids.shape[1]
    values = torch.empty(c, dtype=torch.float32, device=logits.device)
    if c == 0:
        return values
    bv, bk = _block_sizes(vocab, k, logits.device)
    if block_v is not None:
        bv = block_v
    kind = spec.kind
    beta = float(spec.beta)
    log_b = math.log(beta) if kind == "jsd" else 0.0
    log_1mb = math.log1p(-beta) if kind == "jsd" else 0.0
    ids = ids.contiguous()
    lp = lp.to(torch.float32).contiguous()
    valid = valid.contiguous().view(torch.uint8)
    scale = scale.to(torch.float32).contiguous()
    num_warps = 8 if bv >= 2048 else 4
    _topk_distill_fwd_kernel[(c,)](
        logits,
        ids,
        lp,
        valid,
        scale,
        values,
        logits.stride(0),
        vocab,
        k,
        1.0 / float(spec.temperature),
        beta,
        log_b,
        log_1mb,
        float(spec.jsd_scale),
        TAIL_FLOOR,
        LOG_TAIL_FLOOR,
        KIND=_KINDS[kind],
        TAIL=_TAILS[spec.tail],
        NEED_GRAD=need_grad,
        BLOCK_V=bv,
        BLOCK_K=bk,
        ROUND_BF16=logits.dtype == torch.bfloat16 and _interpreting(),
        num_warps=num_warps,
    )
    return values


def _torch_fallback(logits, ids, lp, valid, scale, spec: LossSpec, need_grad: bool):
    """float64 chunks (gradcheck): the kernel computes in fp32 only, so run the torch implementation."""
    inv_t = 1.0 / spec.temperature
    if inv_t != 1.0:
        logits.mul_(inv_t)
    values = topk_chunk_(logits, ids, lp, valid, scale, spec, need_grad)
    if not need_grad:
        return values, None
    if inv_t != 1.0:
        logits.mul_(inv_t)
    return values, logits


def topk_chunk_triton_(
    logits: torch.Tensor,  # [C, V] fp32 / bf16 / fp16 (fp64 goes to the torch implementation); overwritten
    ids: torch.Tensor,  # [C, K] int64, unused slots point at index 0
    lp: torch.Tensor,  # [C, K] fp32 teacher log-probs, -inf for unused slots
    valid: torch.Tensor,  # [C, K] bool
    scale: torch.Tensor,  # [C] fp32 row weights (mask, mean, upstream gradient folded in)
    spec: LossSpec,
    need_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Triton backend on a chunk the caller owns, with the semantics of functional._torch_chunk.

    Returns (values [C] fp32, dlogits [C, V] or None); dlogits is the ``logits`` buffer itself, in its
    dtype, holding the gradient of ``sum(values)`` with respect to the raw (untempered) logits.
    """
    if logits.dim() != 2:
        raise ValueError(f"logits must have shape [C, V], got {tuple(logits.shape)}")
    if logits.dtype == torch.float64:
        return _torch_fallback(logits, ids, lp, valid, scale, spec, need_grad)
    if logits.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"the triton backend takes fp32 / bf16 / fp16 logits, got {logits.dtype}")
    if logits.device.type != "cuda" and not _interpreting():
        raise RuntimeError(
            f"the triton backend needs CUDA tensors (got {logits.device}) or TRITON_INTERPRET=1 set before "
            "gkd.kernels is imported; use backend='torch' on CPU"
        )
    if logits.shape[0] and logits.stride(1) != 1:
        logits = logits.contiguous()  # the kernel needs unit stride along V; dlogits is then this copy
    values = topk_distill_forward(logits, ids, lp, valid, scale, spec, need_grad)
    return values, (logits if need_grad else None)
