"""Fused lm_head + loss: ``hidden @ W.T`` is computed one row chunk at a time inside the autograd
Function, so ``[N, V]`` logits never exist in full; memory beyond the inputs and their gradients is
O(chunk x V).
"""

from __future__ import annotations

import torch

from gkd.kernels._common import (
    REDUCTIONS,
    LossSpec,
    check_choice,
    default_chunk_rows,
    row_weights,
    take_eager_grads,
)
from gkd.kernels.functional import _chunk_fn, _prepare, _reduce, _torch_chunk, compute_dtype
from gkd.kernels.topk_torch import topk_torch_chunk_


def _check_linear(hidden, weight, bias):
    if hidden.dim() != 2:
        raise ValueError(f"hidden must have shape [N, H], got {tuple(hidden.shape)}")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[1]:
        raise ValueError(
            f"lm_head_weight must have shape [V, H={hidden.shape[1]}], got {tuple(weight.shape)}"
        )
    if bias is not None and (bias.dim() != 1 or bias.shape[0] != weight.shape[0]):
        raise ValueError(f"lm_head_bias must have shape [V={weight.shape[0]}], got {tuple(bias.shape)}")
    if hidden.dtype != weight.dtype:
        raise ValueError(f"hidden ({hidden.dtype}) and lm_head_weight ({weight.dtype}) must share a dtype")


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


def _linear_pass(hidden, weight, bias, ids, lp, valid, scale, spec, chunk, chunk_fn, grads: tuple[bool, ...]):
    """One pass over the row chunks. Returns (values [N], grad_hidden, grad_weight, grad_bias), the
    gradients of ``sum(values)`` (None where not requested).

    Peak memory beyond inputs and gradients: one [C, V] logits/dlogits chunk (the torch loss passes work
    in place; other backends may add their own temporaries).
    bf16/fp16 weights add an fp32 accumulator and one reused [V, H] product buffer in the input dtype
    (together 3 bytes x V x H), so that per-chunk sums do not round to bf16."""
    n = hidden.shape[0]
    need_h, need_w, need_b = grads
    need_grad = need_h or need_w or need_b
    acc = compute_dtype(hidden.dtype)
    values = torch.empty(n, dtype=acc, device=hidden.device)
    g_h = torch.empty_like(hidden) if need_h else None
    g_w = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_w else None
    g_b = torch.zeros(weight.shape[0], dtype=acc, device=weight.device) if need_b else None
    prod = None  # [V, H] chunk product, reused across chunks when weights are bf16/fp16
    # one logits buffer for all chunks; the chunk functions overwrite it with dlogits in place
    size = min(chunk, n) * weight.shape[0]
    buf = torch.empty(size, dtype=hidden.dtype, device=hidden.device) if n else None
    transposed = chunk_fn is topk_torch_chunk_  # other chunk functions want row-major logits
    for start in range(0, n, chunk):
        sl = slice(start, min(start + chunk, n))
        h = hidden[sl]
        if transposed:
            z = _logits_t(h, weight, bias, buf)
        else:
            z = _logits(h, weight, bias, buf[: h.shape[0] * weight.shape[0]].view(h.shape[0], -1))
        values[sl], d = chunk_fn(z, ids[sl], lp[sl], valid[sl], scale[sl], spec, need_grad)
        if not need_grad:
            continue
        d = d.to(hidden.dtype)  # [C, V]
        if need_h:
            torch.mm(d, weight, out=g_h[sl])
        if need_w:
            if g_w.dtype == d.dtype:
                g_w.addmm_(d.t(), h)
            else:  # bf16/fp16 weights: chunk products in the input dtype, summed in fp32
                prod = torch.mm(d.t(), h, out=prod) if prod is not None else d.t() @ h
                g_w += prod
        if need_b:
            g_b += d.sum(0, dtype=acc)
        del d  # (a view of buf, or an fp32 copy for low-precision inputs: free it before the next GEMM)
    if g_w is not None:
        g_w = g_w.to(weight.dtype)
    if g_b is not None:
        g_b = g_b.to(bias.dtype)
    return values, g_h, g_w, g_b


class FusedLinearTopKDistillFunction(torch.autograd.Function):
    """loss = reduce_i w_i D(P_i, softmax((hidden_i W^T + b) / T)) over the teacher's top-k outcomes.

    Scalar reductions: gradients of hidden, W and b are computed in the forward pass (one GEMM pass) and
    the first backward scales them in place by the upstream gradient. ``reduction="none"`` (and a further
    backward of a retained graph): backward recomputes the chunks with the upstream gradient folded into
    the row weights.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, ids, lp, valid, w, spec, reduction, chunk, chunk_fn):
        grads = (
            ctx.needs_input_grad[0],
            ctx.needs_input_grad[1],
            bias is not None and ctx.needs_input_grad[2],
        )
        eager = reduction != "none" and any(grads)
        values, g_h, g_w, g_b = _linear_pass(
            hidden, weight, bias, ids, lp, valid, w, spec, chunk, chunk_fn, grads if eager else (False,) * 3
        )
        ctx.spec, ctx.reduction, ctx.chunk, ctx.chunk_fn, ctx.grads = spec, reduction, chunk, chunk_fn, grads
        ctx.save_for_backward(hidden, weight, bias, ids, lp, valid, w)  # references only
        ctx.eager_grads = (g_h, g_w, g_b) if eager else None
        return _reduce(values, reduction)

    @staticmethod
    def backward(ctx, grad_out):
        if ctx.eager_grads is not None:
            return take_eager_grads(ctx, grad_out) + (None,) * 8
        # reduction="none", or a second backward through a retained graph: recompute
        hidden, weight, bias, ids, lp, valid, w = ctx.saved_tensors
        _, g_h, g_w, g_b = _linear_pass(
            hidden,
            weight,
            bias,
            ids,
            lp,
            valid,
            w * grad_out.to(w.dtype),
            ctx.spec,
            ctx.chunk,
            ctx.chunk_fn,
            ctx.grads,
        )
        return (g_h, g_w, g_b) + (None,) * 8


def fused_linear_topk_distill_loss(
    hidden: torch.Tensor,  # [N, H]
    lm_head_weight: torch.Tensor,  # [V, H]
    teacher_ids: torch.Tensor,  # [N, K] int32 / int64
    teacher_logprobs: torch.Tensor,  # [N, K]; -inf marks an unused slot
    mask: torch.Tensor | None = None,  # [N] bool or float weights
    *,
    lm_head_bias: torch.Tensor | None = None,  # [V]
    chunk_size: int | None = None,
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
    logits: rows are processed ``chunk_size`` at a time (default: about 4M logits per chunk)."""
    spec = LossSpec(loss=loss, tail=tail, beta=beta, normalize_jsd=normalize_jsd, temperature=temperature)
    check_choice("reduction", reduction, REDUCTIONS)
    _check_linear(hidden, lm_head_weight, lm_head_bias)
    n, vocab = hidden.shape[0], lm_head_weight.shape[0]
    ids, lp, valid = _prepare(
        vocab, n, teacher_ids, teacher_logprobs, mask, hidden.device, check_inputs, hidden.dtype
    )
    w = row_weights(mask, n, hidden.device, reduction, lp.dtype)
    chunk = chunk_size or default_chunk_rows(vocab, n)
    fn = _chunk_fn(backend, hidden.device)
    if fn is _torch_chunk:  # whole-chunk vocabulary passes: this chunk is a reused buffer of ours
        fn = topk_torch_chunk_
    return FusedLinearTopKDistillFunction.apply(
        hidden, lm_head_weight, lm_head_bias, ids, lp, valid, w, spec, reduction, chunk, fn
    )


class FusedLinearTokenLogprobsFunction(torch.autograd.Function):
    """logq_i = z_i[y_i] - logsumexp(z_i), z_i = (hidden_i W^T + b) / T. Backward recomputes the chunks:
    dlogq_i/dz_i = onehot(y_i) - softmax(z_i)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, tokens, temperature, chunk):
        n = hidden.shape[0]
        acc = compute_dtype(hidden.dtype)
        out = torch.empty(n, dtype=acc, device=hidden.device)
        for start in range(0, n, chunk):
            sl = slice(start, min(start + chunk, n))
            z = _logits(hidden[sl], weight, bias).to(acc) / temperature
            out[sl] = z.gather(1, tokens[sl, None])[:, 0] - torch.logsumexp(z, dim=-1)
        ctx.save_for_backward(hidden, weight, bias, tokens)
        ctx.temperature, ctx.chunk = temperature, chunk
        return out

    @staticmethod
    def backward(ctx, grad_out):
        hidden, weight, bias, tokens = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        g_h = torch.empty_like(hidden) if need_h else None
        acc = compute_dtype(hidden.dtype)
        g_w = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_w else None
        g_b = torch.zeros(weight.shape[0], dtype=acc, device=weight.device) if need_b else None
        inv_t = 1.0 / ctx.temperature
        for start in range(0, hidden.shape[0], ctx.chunk):
            sl = slice(start, min(start + ctx.chunk, hidden.shape[0]))
            h = hidden[sl]
            z = _logits(h, weight, bias).to(acc).mul_(inv_t)
            go = grad_out[sl].to(acc)[:, None] * inv_t  # [C, 1]
            d = torch.softmax(z, dim=-1).mul_(-go)  # -g softmax
            d.scatter_add_(1, tokens[sl, None], go)
            d = d.to(hidden.dtype)
            if need_h:
                torch.mm(d, weight, out=g_h[sl])
            if need_w:
                g_w += (d.t() @ h).to(acc)
            if need_b:
                g_b += d.sum(0, dtype=acc)
        return (
            g_h,
            None if g_w is None else g_w.to(weight.dtype),
            None if g_b is None else g_b.to(bias.dtype),
            None,
            None,
            None,
        )


def fused_linear_token_logprobs(
    hidden: torch.Tensor,  # [N, H]
    lm_head_weight: torch.Tensor,  # [V, H]
    token_ids: torch.Tensor,  # [N] int
    *,
    lm_head_bias: torch.Tensor | None = None,  # [V]
    temperature: float = 1.0,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """[N] fp32 log q(token_ids) under softmax((hidden W^T + b) / T), differentiable, without full logits."""
    _check_linear(hidden, lm_head_weight, lm_head_bias)
    n, vocab = hidden.shape[0], lm_head_weight.shape[0]
    if token_ids.shape != (n,):
        raise ValueError(f"token_ids must have shape [N={n}], got {tuple(token_ids.shape)}")
    if token_ids.is_floating_point():
        raise ValueError(f"token_ids must be an integer tensor, got {token_ids.dtype}")
    if n and bool(((token_ids < 0) | (token_ids >= vocab)).any()):
        bad = int(((token_ids < 0) | (token_ids >= vocab)).nonzero()[0])
        raise ValueError(f"token_ids[{bad}] = {int(token_ids[bad])} is outside [0, V={vocab})")
    if not temperature > 0:
        raise ValueError(f"temperature={temperature} must be positive")
    chunk = chunk_size or default_chunk_rows(vocab, n)
    return FusedLinearTokenLogprobsFunction.apply(
        hidden, lm_head_weight, lm_head_bias, token_ids.long(), float(temperature), chunk
    )
