"""Triton kernels for the top-k distillation loss on one chunk of rows (the CUDA backend).

Work per row is O(V + K), in three launches (a launch boundary is the barrier between phases; it is
ordered the same way on a GPU stream and under the interpreter):

1. ``_topk_gather_kernel``: gather the K member logits into a ``[C, K]`` fp32 scratch and, for
   tail="bucket", write -inf at the member ids, so that the row now holds only the non-members.
2. ``_topk_distill_fwd_kernel``: one streaming online logsumexp over the row (the exact log-mass of
   the non-members for "bucket", never ``log(1 - Q)`` by subtraction; the whole row for "none"; no
   pass for "renorm"), the K+1 outcome terms and their gradients in registers, the row's value; with
   ``NEED_GRAD`` one streaming pass writes the non-member gradients in place (the Liger-Kernel habit:
   the loss kernel writes the input gradient during forward) and the K member gradients go to a second
   ``[C, K]`` scratch.
3. ``_topk_scatter_kernel``: scatter the member gradients to their ids (or, without ``NEED_GRAD``,
   put the member logits back, so that the buffer is unchanged).

Gradient (see gkd.kernels.topk_torch): with ``g_j = dL/ds_j`` for the outcome log-probs and
``G = sum_j g_j``,

    member (slot k):  dL/dz_v = g_k - G q_v
    non-member:       dL/dz_v = g_tail exp(z_v - lse_rest) - G q_v     (tail="bucket")
                      dL/dz_v = -G q_v                                  (tail="none", G = -S)
                      dL/dz_v = 0                                       (tail="renorm", q := q/Q on the ids)

with ``z = logits / T``; the kernels store ``scale * dL/dz / T``, the gradient of the raw logits.
A program handles BLOCK_R rows (several when V is small) with ``[BLOCK_R, BLOCK_V]`` tiles; row offsets
are int64 (a chunk may hold more than 2^31 logits).
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

from gkd.kernels._common import LOG_TAIL_FLOOR, TAIL_FLOOR, LossSpec
from gkd.kernels.topk_torch import topk_torch_chunk_

# constexpr codes of the loss kind and the tail treatment
_KINDS = {"forward_kl": 0, "reverse_kl": 1, "jsd": 2}
_TAILS = {"bucket": 0, "renorm": 1, "none": 2}

# Tiles, chosen at launch (not import) time. GPU: 4096-wide vocabulary tiles with 8 warps (16 fp32 per
# thread per tile: wide vector loads, enough bytes in flight per SM). A fixed heuristic rather than
# triton.autotune: these kernels overwrite their input in place, so autotuning's repeated runs would
# need every buffer restored between configurations. The interpreter runs each tile's block ops in
# numpy: 1024-wide tiles keep the tests quick.
_BLOCK_V_GPU = 4096
_BLOCK_V_INTERPRET = 1024
_ROW_TILE = 4096  # rows per program when V is small: BLOCK_R x BLOCK_V <= this
_MAX_ROWS = 16
_SLOT_TILE = 2048  # BLOCK_R x BLOCK_K <= this (the [rows, slots] tensors live in registers)
# Above this many slots the [BLOCK_K] register tiles would spill badly; such chunks (far beyond any
# teacher's top-k) run the torch implementation instead.
_MAX_BLOCK_K = 4096


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
def _member_slots(ids_ptr, valid_ptr, C, stride_row, K, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    """This program's [BLOCK_R, BLOCK_K] slots: (slot offsets into [C, K] buffers, in-range mask, valid
    mask, int64 offsets of the member ids into the [C, V] logits)."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)  # [BLOCK_R] int64
    offs_k = tl.arange(0, BLOCK_K)  # [BLOCK_K]
    slot = rows[:, None] * K + offs_k[None, :]  # [BLOCK_R, BLOCK_K]
    smask = (rows < C)[:, None] & (offs_k < K)[None, :]
    ids = tl.load(ids_ptr + slot, mask=smask, other=0).to(tl.int64)
    valid = (tl.load(valid_ptr + slot, mask=smask, other=0) != 0) & smask
    return slot, smask, valid, rows[:, None] * stride_row + ids


@triton.jit
def _topk_gather_kernel(
    logits_ptr,  # [C, V] fp32 / bf16 / fp16, row stride `stride_row`; -inf at the member ids on return (MARK)
    ids_ptr,  # [C, K] int64 / int32, contiguous; unused slots may hold anything
    valid_ptr,  # [C, K] uint8 (a bool tensor viewed as uint8), contiguous
    z_top_ptr,  # [C, K] fp32 out: the raw member logits (0 in unused slots)
    C,  # int: rows
    stride_row,  # int: elements between rows of logits
    K,  # int: teacher slots per row
    MARK: tl.constexpr,  # write -inf at the member ids (tail="bucket")
    BLOCK_R: tl.constexpr,  # rows per program
    BLOCK_K: tl.constexpr,  # next power of two >= K
):
    slot, smask, valid, member = _member_slots(ids_ptr, valid_ptr, C, stride_row, K, BLOCK_R, BLOCK_K)
    ptrs = logits_ptr + member  # [BLOCK_R, BLOCK_K]
    z = tl.load(ptrs, mask=valid, other=0.0).to(tl.float32)
    tl.store(z_top_ptr + slot, z, mask=smask)
    if MARK:
        neg = tl.full([BLOCK_R, BLOCK_K], float("-inf"), tl.float32)
        tl.store(ptrs, neg.to(logits_ptr.dtype.element_ty), mask=valid)


@triton.jit
def _topk_distill_fwd_kernel(
    logits_ptr,  # [C, V] fp32 / bf16 / fp16 (members -inf for bucket), row stride `stride_row`; in place:
    #              non-member dlogits on return (NEED_GRAD)
    z_top_ptr,  # [C, K] fp32 raw member logits (from _topk_gather_kernel)
    lp_ptr,  # [C, K] fp32 teacher log-probs, contiguous; -inf for unused slots
    valid_ptr,  # [C, K] uint8, contiguous
    scale_ptr,  # [C] fp32 row weights
    values_ptr,  # [C] fp32 out: scale * divergence
    g_top_ptr,  # [C, K] fp32 out (NEED_GRAD): dlogits at the member ids, already scaled
    C,  # int: rows
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
    BLOCK_R: tl.constexpr,  # rows per program
    BLOCK_V: tl.constexpr,  # vocabulary tile width
    BLOCK_K: tl.constexpr,  # next power of two >= K
    ROUND_BF16: tl.constexpr,  # interpreter + bf16 logits: round dlogits to nearest before the store
):
    neg_inf = float("-inf")
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)  # [BLOCK_R] int64
    rmask = rows < C
    row_ptr = logits_ptr + rows[:, None] * stride_row  # [BLOCK_R, 1]
    offs_k = tl.arange(0, BLOCK_K)  # [BLOCK_K]
    slot = rows[:, None] * K + offs_k[None, :]  # [BLOCK_R, BLOCK_K]
    smask = rmask[:, None] & (offs_k < K)[None, :]
    valid = (tl.load(valid_ptr + slot, mask=smask, other=0) != 0) & smask
    lp = tl.load(lp_ptr + slot, mask=smask, other=neg_inf).to(tl.float32)
    z_top = tl.load(z_top_ptr + slot, mask=smask, other=0.0) * inv_t  # [BLOCK_R, BLOCK_K]
    scale = tl.load(scale_ptr + rows, mask=rmask, other=0.0).to(tl.float32)  # [BLOCK_R]
    keep = scale != 0.0
    zt = tl.where(valid, z_top, neg_inf)
    m_top = tl.max(zt, 1)
    m_top = tl.where(m_top == neg_inf, 0.0, m_top)
    sum_top = tl.sum(tl.exp(zt - m_top[:, None]), 1)
    lse_top = tl.where(sum_top > 0.0, m_top + tl.log(tl.where(sum_top > 0.0, sum_top, 1.0)), neg_inf)

    tail_coef = tl.zeros([BLOCK_R], tl.float32)
    shift = tl.zeros([BLOCK_R], tl.float32)  # the pass-2 exponent's offset: lse_rest / lse
    if TAIL == 1:
        # renorm: both distributions renormalised over the valid ids; no pass over the vocabulary
        lt = tl.where(valid, lp, neg_inf)
        m_lp = tl.max(lt, 1)
        m_lp = tl.where(m_lp == neg_inf, 0.0, m_lp)
        sum_lp = tl.sum(tl.exp(lt - m_lp[:, None]), 1)
        lse_lp = m_lp + tl.log(tl.where(sum_lp > 0.0, sum_lp, 1.0))
        lse_top = tl.where(sum_top > 0.0, lse_top, 0.0)  # 0 for a row without slots
        s = tl.where(valid, z_top - lse_top[:, None], 0.0)
        t = tl.where(valid, lp - lse_lp[:, None], 0.0)
        term, g = _outcome_terms(s, t, beta, log_b, log_1mb, KIND)
        g = tl.where(valid, g, 0.0) * jsd_scale
        value = tl.sum(tl.where(valid, term, 0.0), 1) * jsd_scale
        big_g = tl.sum(g, 1)
        g_member = tl.where(valid, g - big_g[:, None] * tl.exp(s), 0.0)
    else:
        # one streaming online logsumexp: over the non-members (bucket: the members read -inf) or the row
        m = tl.full([BLOCK_R], neg_inf, tl.float32)
        d = tl.zeros([BLOCK_R], tl.float32)
        for start in range(0, V, BLOCK_V):
            offs = start + tl.arange(0, BLOCK_V)  # [BLOCK_V]
            vmask = rmask[:, None] & (offs < V)[None, :]
            x = tl.load(row_ptr + offs[None, :], mask=vmask, other=neg_inf).to(tl.float32) * inv_t
            m_new = tl.maximum(m, tl.max(x, 1))
            m_safe = tl.where(m_new == neg_inf, 0.0, m_new)
            d = d * tl.exp(m - m_safe) + tl.sum(tl.exp(x - m_safe[:, None]), 1)
            m = m_new
        has_mass = d > 0.0
        lse_pass = tl.where(has_mass, m + tl.log(tl.where(has_mass, d, 1.0)), neg_inf)
        if TAIL == 0:
            # lse = logaddexp(lse_top, lse_rest), -inf only when both are
            hi = tl.maximum(lse_top, lse_pass)
            lo = tl.minimum(lse_top, lse_pass)
            hi_safe = tl.where(hi == neg_inf, 0.0, hi)
            lse = hi + _log1p_small(tl.exp(lo - hi_safe))
        else:
            lse = lse_pass
        lse_safe = tl.where(lse == neg_inf, 0.0, lse)
        s_top = tl.where(valid, z_top - lse_safe[:, None], 0.0)
        term, g = _outcome_terms(s_top, tl.where(valid, lp, 0.0), beta, log_b, log_1mb, KIND)
        g = tl.where(valid, g, 0.0) * jsd_scale
        value = tl.sum(tl.where(valid, term, 0.0), 1) * jsd_scale
        big_g = tl.sum(g, 1)
        if TAIL == 0:
            # the bucket: teacher 1 - S (floored), student exp(lse_rest - lse); absent if no non-members
            has_tail = has_mass
            shift = tl.where(has_tail, lse_pass, 0.0)
            mass = tl.sum(tl.where(valid, tl.exp(lp), 0.0), 1)
            t_tail = tl.maximum(tl.log(tl.maximum(1.0 - mass, tail_floor)), log_tail_floor)
            s_tail = tl.where(has_tail, shift - lse_safe, 0.0)
            term_tail, g_tail = _outcome_terms(s_tail, t_tail, beta, log_b, log_1mb, KIND)
            g_tail = tl.where(has_tail, g_tail * jsd_scale, 0.0)
            value += tl.where(has_tail, term_tail * jsd_scale, 0.0)
            big_g += g_tail
            # non-members: exp(z_v - lse_rest) (g_tail - G exp(lse_rest - lse))
            tail_coef = tl.where(has_tail, g_tail - big_g * tl.exp(s_tail), 0.0)
        else:
            # none: non-members -G q_v = -G exp(z_v - lse)
            shift = lse_safe
            tail_coef = -big_g
        g_member = tl.where(valid, g - big_g[:, None] * tl.exp(s_top), 0.0)

    tl.store(values_ptr + rows, tl.where(keep, value * scale, 0.0), mask=rmask)

    if NEED_GRAD:
        out_scale = tl.where(keep, scale * inv_t, 0.0)  # [BLOCK_R]
        tl.store(g_top_ptr + slot, g_member * out_scale[:, None], mask=smask)
        coef = tail_coef * out_scale
        # the non-member gradients, one streaming pass (members get theirs from _topk_scatter_kernel)
        for start in range(0, V, BLOCK_V):
            offs = start + tl.arange(0, BLOCK_V)  # [BLOCK_V]
            vmask = rmask[:, None] & (offs < V)[None, :]
            if TAIL == 1:
                dz = tl.zeros([BLOCK_R, BLOCK_V], tl.float32)
            else:
                x = tl.load(row_ptr + offs[None, :], mask=vmask, other=neg_inf).to(tl.float32) * inv_t
                dz = coef[:, None] * tl.exp(x - shift[:, None])
            if ROUND_BF16:
                dz = _round_fp32_to_bf16_grid(dz)
            tl.store(row_ptr + offs[None, :], dz.to(logits_ptr.dtype.element_ty), mask=vmask)


@triton.jit
def _topk_scatter_kernel(
    logits_ptr,  # [C, V] fp32 / bf16 / fp16, row stride `stride_row`; src written at the member ids
    ids_ptr,  # [C, K] int64 / int32, contiguous
    valid_ptr,  # [C, K] uint8, contiguous
    src_ptr,  # [C, K] fp32: member gradients, or the raw member logits to put back
    C,  # int: rows
    stride_row,  # int: elements between rows of logits
    K,  # int: teacher slots per row
    BLOCK_R: tl.constexpr,  # rows per program
    BLOCK_K: tl.constexpr,  # next power of two >= K
    ROUND_BF16: tl.constexpr,  # interpreter + bf16 logits: round to nearest before the store
):
    slot, smask, valid, member = _member_slots(ids_ptr, valid_ptr, C, stride_row, K, BLOCK_R, BLOCK_K)
    x = tl.load(src_ptr + slot, mask=valid, other=0.0)
    if ROUND_BF16:
        x = _round_fp32_to_bf16_grid(x)
    tl.store(logits_ptr + member, x.to(logits_ptr.dtype.element_ty), mask=valid)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _config(vocab: int, k: int, device: torch.device, block_v: int | None, block_r: int | None):
    """(BLOCK_R, BLOCK_V, BLOCK_K, num_warps) of the main kernel, decided per launch from the shapes."""
    block_k = triton.next_power_of_2(max(k, 1))
    cap = _BLOCK_V_GPU if device.type == "cuda" and not _interpreting() else _BLOCK_V_INTERPRET
    bv = block_v or min(triton.next_power_of_2(max(vocab, 1)), cap)
    br = block_r or max(1, min(_MAX_ROWS, _ROW_TILE // bv, _SLOT_TILE // block_k))
    return br, bv, block_k, 8 if br * bv >= 2048 else 4


def topk_distill_forward(
    logits: torch.Tensor,  # [C, V] fp32 / bf16 / fp16, unit stride along V; overwritten when need_grad
    ids: torch.Tensor,  # [C, K] int64 / int32
    lp: torch.Tensor,  # [C, K] fp32 teacher log-probs, -inf for unused slots
    valid: torch.Tensor,  # [C, K] bool
    scale: torch.Tensor,  # [C] fp32 row weights
    spec: LossSpec,
    need_grad: bool,
    block_v: int | None = None,
    block_r: int | None = None,
) -> torch.Tensor:
    """Launch the three kernels; return values [C] fp32. With ``need_grad`` the logits buffer holds
    ``d(sum values)/d logits`` on return, else it is unchanged. ``block_v`` / ``block_r`` (powers of
    two) override the vocabulary tile width and the rows per program. No host sync."""
    c, vocab = logits.shape
    values = torch.empty(c, dtype=torch.float32, device=logits.device)
    if c == 0:
        return values
    if ids.shape[1] == 0:  # one unused slot instead of zero-size [C, 0] buffers
        ids = torch.zeros(c, 1, dtype=ids.dtype, device=ids.device)
        lp = torch.full((c, 1), float("-inf"), device=lp.device)
        valid = torch.zeros(c, 1, dtype=torch.bool, device=valid.device)
    k = ids.shape[1]
    br, bv, bk, num_warps = _config(vocab, k, logits.device, block_v, block_r)
    kind = spec.kind
    beta = float(spec.beta)
    log_b = math.log(beta) if kind == "jsd" else 0.0
    log_1mb = math.log1p(-beta) if kind == "jsd" else 0.0
    ids = ids.contiguous()
    lp = lp.to(torch.float32).contiguous()
    valid = valid.contiguous().view(torch.uint8)
    scale = scale.to(torch.float32).contiguous()
    z_top = torch.empty(c, k, dtype=torch.float32, device=logits.device)
    g_top = torch.empty_like(z_top) if need_grad else z_top
    tail = _TAILS[spec.tail]
    round_bf16 = logits.dtype == torch.bfloat16 and _interpreting()
    # the [C, K] kernels: as many rows per program as the slot tile allows
    br_k = max(1, min(_SLOT_TILE // bk, triton.next_power_of_2(c)))
    grid_k = (triton.cdiv(c, br_k),)
    mark = tail == 0
    _topk_gather_kernel[grid_k](
        logits, ids, valid, z_top, c, logits.stride(0), k, MARK=mark, BLOCK_R=br_k, BLOCK_K=bk, num_warps=4
    )
    _topk_distill_fwd_kernel[(triton.cdiv(c, br),)](
        logits,
        z_top,
        lp,
        valid,
        scale,
        values,
        g_top,
        c,
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
        TAIL=tail,
        NEED_GRAD=need_grad,
        BLOCK_R=br,
        BLOCK_V=bv,
        BLOCK_K=bk,
        ROUND_BF16=round_bf16,
        num_warps=num_warps,
    )
    if need_grad or mark:  # member gradients, or the member logits put back over the -inf marks
        _topk_scatter_kernel[grid_k](
            logits,
            ids,
            valid,
            g_top,
            c,
            logits.stride(0),
            k,
            BLOCK_R=br_k,
            BLOCK_K=bk,
            ROUND_BF16=round_bf16 and need_grad,
            num_warps=4,
        )
    return values


def _torch_fallback(logits, ids, lp, valid, scale, spec: LossSpec, need_grad: bool):
    """The torch implementation on a copy of the chunk, under this backend's contract (dlogits in the
    buffer, in its dtype): float64 chunks (gradcheck; the kernels compute in fp32) and K beyond the
    kernels' register tiles."""
    z = logits.to(torch.float64 if logits.dtype == torch.float64 else torch.float32, copy=True)
    values, d = topk_torch_chunk_(z, ids, lp.to(z.dtype), valid, scale.to(z.dtype), spec, need_grad)
    if need_grad:
        logits.copy_(d)
    return values, (logits if need_grad else None)


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
    if logits.dtype not in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        raise ValueError(f"the triton backend takes fp32 / bf16 / fp16 logits, got {logits.dtype}")
    if logits.dtype == torch.float64 or triton.next_power_of_2(max(ids.shape[1], 1)) > _MAX_BLOCK_K:
        return _torch_fallback(logits, ids, lp, valid, scale, spec, need_grad)
    if logits.device.type != "cuda" and not _interpreting():
        raise RuntimeError(
            f"the triton backend needs CUDA tensors (got {logits.device}) or TRITON_INTERPRET=1 set before "
            "gkd.kernels is imported; use backend='torch' on CPU"
        )
    if logits.shape[0] and logits.stride(1) != 1:
        logits = logits.contiguous()  # the kernel needs unit stride along V; dlogits is then this copy
    values = topk_distill_forward(logits, ids, lp, valid, scale, spec, need_grad)
    return values, (logits if need_grad else None)
