"""Fused lm_head + loss: ``hidden @ W.T`` is computed one row chunk at a time inside the autograd
Function, so ``[N, V]`` logits never exist in full; memory beyond the inputs and their gradients is
O(chunk x V).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from gkd.kernels._common import REDUCTIONS, ChunkKernel, LossSpec, check_choice, row_weights, take_eager_grads
from gkd.kernels.functional import _prepare, _reduce, chunk_kernel
from gkd.kernels.functional import compute_dtype as _acc_dtype
from gkd.kernels.grad_accumulate import weight_accumulator
from gkd.kernels.memory import FusedShape, fused_chunk_rows


def _check_linear(hidden, weight, bias, cdt):
    if hidden.dim() != 2:
        raise ValueError(f"hidden must have shape [N, H], got {tuple(hidden.shape)}")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[1]:
        raise ValueError(
            f"lm_head_weight must have shape [V, H={hidden.shape[1]}], got {tuple(weight.shape)}"
        )
    if bias is not None and (bias.dim() != 1 or bias.shape[0] != weight.shape[0]):
        raise ValueError(f"lm_head_bias must have shape [V={weight.shape[0]}], got {tuple(bias.shape)}")
    if cdt is None and hidden.dtype != weight.dtype:
        raise ValueError(
            f"hidden ({hidden.dtype}) and lm_head_weight ({weight.dtype}) must share a dtype, or pass "
            "compute_dtype= (the dtype both are cast to for the GEMMs)"
        )
    if cdt is not None and cdt not in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        raise ValueError(f"compute_dtype must be a floating dtype (float32, bfloat16, float16), got {cdt}")


def _logits_t(hidden_c, weight, bias, flat):
    """[C, V] logits of one chunk as the transpose of a contiguous [V, C] block at the start of ``flat``
    (a reusable buffer). ``W @ h^T`` runs markedly faster in MKL than ``h @ W^T`` for short chunks (at
    V=152k, C=208: about 0.75x the time; the weight is read untransposed), and the other two GEMMs and
    the loss passes take the transposed view at about the same speed."""
    c, v = hidden_c.shape[0], weight.shape[0]
    out = flat[: v * c].view(v, c)
    if bias is None:
        torch.mm(weight, hidden_c.t(), out=out)
    else:
        torch.addmm(bias[:, None], weight, hidden_c.t(), out=out)
    return out.t()


def _logits(hidden_c, weight, bias, buf=None):
    """[C, V] logits of one chunk, in the input dtype (the GEMM accumulates in fp32), written into
    ``buf`` ([C, V], a view of a reusable buffer) when given: fresh pages for every chunk cost page
    faults."""
    out = buf
    if bias is None:
        return torch.mm(hidden_c, weight.t(), out=out)
    return torch.addmm(bias, hidden_c, weight.t(), out=out)


def _cast_inputs(hidden, weight, bias, cdt):
    """hidden, weight, bias in the compute dtype: one cast per call (e.g. of fp32 master weights to bf16),
    never a per-chunk copy of the [V, H] weight."""
    return tuple(None if t is None else t.to(cdt) for t in (hidden, weight, bias))


class _PassOptions(NamedTuple):
    spec: LossSpec
    chunk: int  # rows per chunk
    kernel: ChunkKernel  # the loss on one [C, V] logits chunk: (values [C], dlogits [C, V] in place)
    cdt: torch.dtype  # GEMM (compute) dtype


def _linear_pass(hidden, weight, bias, ids, lp, valid, scale, opts: _PassOptions, grads: tuple[bool, ...]):
    """One pass over the row chunks, GEMMs in ``opts.cdt`` (fp32 accumulation) whatever autocast says.
    Returns (values [N], grad_hidden, grad_weight, grad_bias), the gradients of ``sum(values)`` in the
    inputs' dtypes (None where not requested).

    Peak memory beyond inputs and gradients (gkd.kernels.memory models it): one [C, V] logits/dlogits
    chunk in ``cdt`` (the torch and Triton loss passes work in place; the torch path adds an fp32 copy for
    bf16/fp16 chunks), the compute-dtype copies of hidden and weight when ``cdt`` differs from theirs, and
    what the weight-gradient accumulator holds beyond the gradient (gkd.kernels.grad_accumulate)."""
    with torch.autocast(hidden.device.type, enabled=False):
        return _linear_chunks(hidden, weight, bias, ids, lp, valid, scale, opts, grads)


def _linear_chunks(hidden, weight, bias, ids, lp, valid, scale, opts: _PassOptions, grads):
    spec, chunk, kernel, cdt = opts
    n = hidden.shape[0]
    need_h, need_w, need_b = grads
    need_grad = need_h or need_w or need_b
    acc = _acc_dtype(cdt)
    h_all, w_c, b_c = _cast_inputs(hidden, weight, bias, cdt)
    values = torch.empty(n, dtype=acc, device=hidden.device)
    g_h = torch.empty_like(hidden) if need_h else None
    g_b = torch.zeros(weight.shape[0], dtype=acc, device=weight.device) if need_b else None
    w_acc = weight_accumulator(weight, cdt, acc, -(-n // chunk)) if need_w else None
    # one logits buffer for all chunks; the chunk functions overwrite it with dlogits in place
    size = min(chunk, n) * weight.shape[0]
    buf = torch.empty(size, dtype=cdt, device=hidden.device) if n else None
    transposed = kernel.column_major  # else the chunk is row-major
    for start in range(0, n, chunk):
        sl = slice(start, min(start + chunk, n))
        h = h_all[sl]
        if transposed:
            z = _logits_t(h, w_c, b_c, buf)
        else:
            z = _logits(h, w_c, b_c, buf[: h.shape[0] * weight.shape[0]].view(h.shape[0], -1))
        values[sl], d = kernel.run(z, ids[sl], lp[sl], valid[sl], scale[sl], spec, need_grad)
        if not need_grad:
            continue
        if d.dtype != cdt:  # the torch loss's fp32 copy: back into the chunk buffer, no new [C, V]
            d = z.copy_(d)
        if need_h:
            if g_h.dtype == cdt:
                torch.mm(d, w_c, out=g_h[sl])
            else:
                g_h[sl] = torch.mm(d, w_c)
        if need_w:
            w_acc.add(d.t(), h)
        if need_b:
            g_b += d.sum(0, dtype=acc)
        del d
    g_w = None if w_acc is None else w_acc.result().to(weight.dtype)
    if g_b is not None:
        g_b = g_b.to(bias.dtype)
    return values, g_h, g_w, g_b


class FusedLinearTopKDistillFunction(torch.autograd.Function):
    """loss = reduce_i w_i D(P_i, softmax((hidden_i W^T + b) / T)) over the teacher's top-k outcomes.

    Scalar reductions: gradients of hidden, W and b are computed in the forward pass (one GEMM pass) and
    the first backward scales them in place by the upstream gradient. ``reduction="none"`` (and a further
    backward of a retained graph): backward recomputes the chunks with the upstream gradient folded into
    the row weights. The GEMMs run in ``cdt`` whatever autocast says (autocast is off inside).
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, ids, lp, valid, w, reduction, opts):
        grads = (
            ctx.needs_input_grad[0],
            ctx.needs_input_grad[1],
            bias is not None and ctx.needs_input_grad[2],
        )
        eager = reduction != "none" and any(grads)
        values, g_h, g_w, g_b = _linear_pass(
            hidden, weight, bias, ids, lp, valid, w, opts, grads if eager else (False,) * 3
        )
        ctx.reduction, ctx.opts, ctx.grads = reduction, opts, grads
        ctx.save_for_backward(hidden, weight, bias, ids, lp, valid, w)  # references only
        ctx.eager_grads = (g_h, g_w, g_b) if eager else None
        return _reduce(values, reduction)

    @staticmethod
    def backward(ctx, grad_out):
        if ctx.eager_grads is not None:
            return take_eager_grads(ctx, grad_out) + (None,) * 6
        # reduction="none", or a second backward through a retained graph: recompute
        hidden, weight, bias, ids, lp, valid, w = ctx.saved_tensors
        scale = w * grad_out.to(w.dtype)
        _, g_h, g_w, g_b = _linear_pass(hidden, weight, bias, ids, lp, valid, scale, ctx.opts, ctx.grads)
        return (g_h, g_w, g_b) + (None,) * 6


def _compute_setup(hidden, weight, bias, compute_dtype, chunk_size, chunk_bytes, path):
    """Checks; (compute dtype, rows per chunk). ``path``: the loss path (gkd.kernels.memory.PATHS)."""
    _check_linear(hidden, weight, bias, compute_dtype)
    cdt = compute_dtype or hidden.dtype
    shape = FusedShape.of(hidden, weight, bias, cdt, path)
    return cdt, fused_chunk_rows(shape, hidden.device, chunk_size, chunk_bytes)


def fused_linear_topk_distill_loss(
    hidden: torch.Tensor,  # [N, H]
    lm_head_weight: torch.Tensor,  # [V, H]
    teacher_ids: torch.Tensor,  # [N, K] int32 / int64
    teacher_logprobs: torch.Tensor,  # [N, K]; -inf marks an unused slot
    mask: torch.Tensor | None = None,  # [N] bool or float weights
    *,
    lm_head_bias: torch.Tensor | None = None,  # [V]
    chunk_size: int | None = None,
    chunk_bytes: int | None = None,
    compute_dtype: torch.dtype | None = None,
    loss: str = "forward_kl",
    beta: float = 0.5,
    normalize_jsd: bool = False,
    tail: str = "bucket",
    temperature: float = 1.0,
    reduction: str = "sum",
    backend: str = "auto",
    check_inputs: bool = True,
) -> torch.Tensor:
    """``topk_distill_loss(hidden @ lm_head_weight.T + lm_head_bias, ...)`` without materialising the
    logits: rows are processed a chunk at a time (``chunk_size`` rows; else as many as ``chunk_bytes`` of
    logits allow; default on CUDA: the largest chunks that keep the call's whole extra memory within
    1.375 GiB, gkd.kernels.memory; about N/8 rows and >= 4M logits on CPU).

    ``compute_dtype`` (e.g. torch.bfloat16 with fp32 master weights): hidden, weight and bias are cast
    to it once per call and the three GEMMs run in it; the loss arithmetic stays fp32, and every gradient
    is returned in its input's dtype. The weight gradient sums its chunks in fp32 (in the fp32 gradient
    itself, or for bf16/fp16 weights as the bf16/fp16 gradient plus a bf16/fp16 correction term:
    gkd.kernels.grad_accumulate). No host sync with ``check_inputs=False``."""
    spec = LossSpec(loss=loss, tail=tail, beta=beta, normalize_jsd=normalize_jsd, temperature=temperature)
    check_choice("reduction", reduction, REDUCTIONS)
    kernel = chunk_kernel(backend, hidden.device, reused_buffer=True)
    path = f"topk_{kernel.name}"
    cdt, chunk = _compute_setup(
        hidden, lm_head_weight, lm_head_bias, compute_dtype, chunk_size, chunk_bytes, path
    )
    n, vocab = hidden.shape[0], lm_head_weight.shape[0]
    ids, lp, valid = _prepare(vocab, n, teacher_ids, teacher_logprobs, mask, hidden.device, check_inputs, cdt)
    w = row_weights(mask, n, hidden.device, reduction, lp.dtype)
    opts = _PassOptions(spec, chunk, kernel, cdt)
    return FusedLinearTopKDistillFunction.apply(
        hidden, lm_head_weight, lm_head_bias, ids, lp, valid, w, reduction, opts
    )


class FusedLinearTokenLogprobsFunction(torch.autograd.Function):
    """logq_i = z_i[y_i] - logsumexp(z_i), z_i = (hidden_i W^T + b) / T, GEMMs in ``cdt``, the rest in
    fp32. Backward recomputes the chunks: dlogq_i/dz_i = onehot(y_i) - softmax(z_i)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, tokens, temperature, chunk, cdt):
        n = hidden.shape[0]
        out = torch.empty(n, dtype=_acc_dtype(cdt), device=hidden.device)
        inv_t = 1.0 / temperature
        with torch.autocast(hidden.device.type, enabled=False):
            h_all, w_c, b_c = _cast_inputs(hidden, weight, bias, cdt)
            for start in range(0, n, chunk):
                sl = slice(start, min(start + chunk, n))
                z = _chunk_logits_fp32(h_all[sl], w_c, b_c, inv_t)
                out[sl] = z.gather(1, tokens[sl, None])[:, 0] - torch.logsumexp(z, dim=-1)
        ctx.save_for_backward(hidden, weight, bias, tokens)
        ctx.inv_t, ctx.chunk, ctx.cdt = inv_t, chunk, cdt
        return out

    @staticmethod
    def backward(ctx, grad_out):
        hidden, weight, bias, tokens = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        cdt, inv_t = ctx.cdt, ctx.inv_t
        acc = _acc_dtype(cdt)
        g_h = torch.empty_like(hidden) if need_h else None
        g_b = torch.zeros(weight.shape[0], dtype=acc, device=weight.device) if need_b else None
        n = hidden.shape[0]
        w_acc = weight_accumulator(weight, cdt, acc, -(-n // ctx.chunk)) if need_w else None
        with torch.autocast(hidden.device.type, enabled=False):
            h_all, w_c, b_c = _cast_inputs(hidden, weight, bias, cdt)
            for start in range(0, hidden.shape[0], ctx.chunk):
                sl = slice(start, min(start + ctx.chunk, hidden.shape[0]))
                h = h_all[sl]
                d = torch.softmax(_chunk_logits_fp32(h, w_c, b_c, inv_t), dim=-1)
                go = grad_out[sl].to(acc)[:, None] * inv_t  # [C, 1]
                d.mul_(-go).scatter_add_(1, tokens[sl, None], go)  # (onehot - softmax) g / T
                d = d.to(cdt)
                if need_h:
                    g_h[sl] = torch.mm(d, w_c)
                if need_w:
                    w_acc.add(d.t(), h)
                if need_b:
                    g_b += d.sum(0, dtype=acc)
                del d  # before the next chunk's logits
        return (
            g_h,
            None if w_acc is None else w_acc.result().to(weight.dtype),
            None if g_b is None else g_b.to(bias.dtype),
            None,
            None,
            None,
            None,
        )


def _chunk_logits_fp32(h, weight, bias, inv_t):
    """[C, V] fp32 (fp64 for fp64 inputs) logits / T of one chunk; the GEMM runs in the inputs' dtype."""
    z = _logits(h, weight, bias)
    z = z.to(_acc_dtype(z.dtype))
    return z.mul_(inv_t) if inv_t != 1.0 else z


def fused_linear_token_logprobs(
    hidden: torch.Tensor,  # [N, H]
    lm_head_weight: torch.Tensor,  # [V, H]
    token_ids: torch.Tensor,  # [N] int
    *,
    lm_head_bias: torch.Tensor | None = None,  # [V]
    temperature: float = 1.0,
    chunk_size: int | None = None,
    chunk_bytes: int | None = None,
    compute_dtype: torch.dtype | None = None,
    check_inputs: bool = True,
) -> torch.Tensor:
    """[N] fp32 log q(token_ids) under softmax((hidden W^T + b) / T), differentiable, without full logits.
    ``chunk_size`` / ``chunk_bytes`` / ``compute_dtype`` as in fused_linear_topk_distill_loss;
    ``check_inputs=False`` skips the id range check (a host sync)."""
    cdt, chunk = _compute_setup(
        hidden, lm_head_weight, lm_head_bias, compute_dtype, chunk_size, chunk_bytes, "token_logprobs"
    )
    n, vocab = hidden.shape[0], lm_head_weight.shape[0]
    if token_ids.shape != (n,):
        raise ValueError(f"token_ids must have shape [N={n}], got {tuple(token_ids.shape)}")
    if token_ids.is_floating_point():
        raise ValueError(f"token_ids must be an integer tensor, got {token_ids.dtype}")
    if check_inputs and n and bool(((token_ids < 0) | (token_ids >= vocab)).any()):
        bad = int(((token_ids < 0) | (token_ids >= vocab)).nonzero()[0])
        raise ValueError(f"token_ids[{bad}] = {int(token_ids[bad])} is outside [0, V={vocab})")
    if not temperature > 0:
        raise ValueError(f"temperature={temperature} must be positive")
    return FusedLinearTokenLogprobsFunction.apply(
        hidden, lm_head_weight, lm_head_bias, token_ids.long(), float(temperature), chunk, cdt
    )
