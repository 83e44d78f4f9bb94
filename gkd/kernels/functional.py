"""Public distillation losses: top-k KL family (logits or fused lm_head), token log-probs, sampled
reverse KL. Each picks its backend per call from the tensors' device ("auto": Triton for CUDA tensors,
torch otherwise); nothing is decided at import time.
"""

from __future__ import annotations

import torch

from gkd.kernels._common import (
    BACKENDS,
    REDUCTIONS,
    ChunkKernel,
    LossSpec,
    check_choice,
    check_topk_inputs,
    default_chunk_rows,
    row_weights,
    take_eager_grads,
)
from gkd.kernels.topk_torch import topk_chunk_, topk_torch_chunk_


def chunk_kernel(backend: str, device: torch.device, *, reused_buffer: bool = False) -> ChunkKernel:
    """The backend ("auto": Triton for CUDA tensors, else torch) that computes one chunk's values and
    dlogits. ``reused_buffer``: the caller's chunk is a scratch buffer of its own (the fused path), so the
    torch backend runs each vocabulary pass over the whole chunk instead of cache-sized row blocks."""
    check_choice("backend", backend, BACKENDS)
    if backend == "auto":
        backend = "triton" if device.type == "cuda" else "torch"
    if backend == "torch":
        if reused_buffer:
            return ChunkKernel("torch", topk_torch_chunk_, column_major=True)
        return ChunkKernel("torch", _torch_chunk)
    from gkd.kernels.topk_triton import topk_chunk_triton_

    return ChunkKernel("triton", topk_chunk_triton_)


def _torch_chunk(logits, ids, lp, valid, scale, spec: LossSpec, need_grad: bool):
    """Torch backend on a chunk the caller owns: returns (values [C], dlogits [C, V] or None).

    The vocabulary-wide passes run on blocks of rows of about 1 MiB, so each block's several passes stay
    in cache and no chunk-sized temporary is allocated (the GEMM chunk itself can stay large).
    """
    # no copy when already fp32/fp64: the chunk is ours to overwrite
    z = logits if logits.dtype in (torch.float32, torch.float64) else logits.float()
    inv_t = 1.0 / spec.temperature
    values = torch.empty(z.shape[0], dtype=z.dtype, device=z.device)
    rows = max(1, (1 << 20) // max(1, z.shape[1] * z.element_size()))
    for start in range(0, z.shape[0], rows):
        sl = slice(start, start + rows)
        block = z[sl]
        if inv_t != 1.0:
            block.mul_(inv_t)
        values[sl] = topk_chunk_(block, ids[sl], lp[sl], valid[sl], scale[sl], spec, need_grad, inv_t)
    return values, (z if need_grad else None)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Loss arithmetic runs in fp32 (fp64 when the inputs are fp64, e.g. for gradcheck)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _prepare(vocab, n, teacher_ids, teacher_logprobs, mask, device, check, dtype):
    check_topk_inputs(vocab, n, teacher_ids, teacher_logprobs, mask, check_values=check)
    lp = teacher_logprobs.to(device=device, dtype=compute_dtype(dtype))
    valid = lp > float("-inf")
    ids = torch.where(valid, teacher_ids.to(device=device, dtype=torch.long), 0)
    return ids, lp, valid


def _reduce(values: torch.Tensor, reduction: str) -> torch.Tensor:
    return values if reduction == "none" else values.sum()


class TopKDistillFunction(torch.autograd.Function):
    """Top-k distillation loss on given logits.

    value_i = w_i * D(P_i, Q_i) with D the divergence of ``spec`` over the teacher's top-k outcomes
    (plus the tail bucket), Q = softmax(logits / T). For scalar reductions dlogits is computed during
    forward (chunk by chunk, so temporaries stay O(chunk x V)) and the first backward only scales it in
    place; for ``reduction="none"`` (and any further backward of a retained graph) backward recomputes it
    with the upstream gradient folded into w.
    """

    @staticmethod
    def forward(ctx, logits, ids, lp, valid, w, spec, reduction, chunk, kernel: ChunkKernel):
        n = logits.shape[0]
        need_grad = ctx.needs_input_grad[0] and reduction != "none"
        values = torch.empty(n, dtype=compute_dtype(logits.dtype), device=logits.device)
        grad = torch.empty_like(logits) if need_grad else None
        for start in range(0, n, chunk):
            sl = slice(start, min(start + chunk, n))
            part = logits[sl].clone()  # the chunk functions work in place; never on the caller's tensor
            values[sl], g = kernel.run(part, ids[sl], lp[sl], valid[sl], w[sl], spec, need_grad)
            if need_grad:
                grad[sl] = g
        ctx.spec, ctx.reduction, ctx.chunk, ctx.kernel = spec, reduction, chunk, kernel
        ctx.save_for_backward(logits, ids, lp, valid, w)  # references only: recompute if needed
        ctx.eager_grads = (grad,) if need_grad else None
        return _reduce(values, reduction)

    @staticmethod
    def backward(ctx, grad_out):
        if ctx.eager_grads is not None:
            return take_eager_grads(ctx, grad_out) + (None,) * 8
        # reduction="none", or a second backward through a retained graph: recompute the chunks with
        # the upstream gradient folded into the row weights
        logits, ids, lp, valid, w = ctx.saved_tensors
        scale = w * grad_out.to(w.dtype)
        grad = torch.empty_like(logits)
        for start in range(0, logits.shape[0], ctx.chunk):
            sl = slice(start, min(start + ctx.chunk, logits.shape[0]))
            _, grad[sl] = ctx.kernel.run(
                logits[sl].clone(), ids[sl], lp[sl], valid[sl], scale[sl], ctx.spec, True
            )
        return (grad,) + (None,) * 8


def topk_distill_loss(
    student_logits: torch.Tensor,  # [N, V] float32 / bf16 / fp16
    teacher_ids: torch.Tensor,  # [N, K] int32 / int64, ids in [0, V)
    teacher_logprobs: torch.Tensor,  # [N, K] teacher log-probs; -inf marks an unused slot
    mask: torch.Tensor | None = None,  # [N] bool or float token weights
    *,
    loss: str = "forward_kl",
    beta: float = 0.5,
    normalize_jsd: bool = False,
    tail: str = "bucket",
    temperature: float = 1.0,
    reduction: str = "sum",
    backend: str = "auto",
    chunk_size: int | None = None,
    check_inputs: bool = True,
) -> torch.Tensor:
    """Distillation loss between the student's full-vocabulary distribution and the teacher's top-k.

    q = softmax(student_logits / temperature); p = exp(teacher_logprobs); S = sum p, Q = sum q[ids].
    tail="bucket": divergences over K+1 outcomes (the K ids + one bucket with 1-S / 1-Q).
    tail="renorm": p/S against q/Q over the K ids. tail="none": forward_kl = sum p (log p - log q[ids]).
    loss: "forward_kl" KL(P||Q), "reverse_kl" KL(Q||P), "jsd" beta KL(P||M) + (1-beta) KL(Q||M) with
    M = beta P + (1-beta) Q (beta=0 -> forward KL, beta=1 -> reverse KL; normalize_jsd divides by
    beta (1-beta)). Returns a scalar ("sum", "mean" over unmasked tokens) or [N] ("none").
    ``check_inputs=False`` skips the value checks (a host sync) in trusted hot loops.
    """
    spec = LossSpec(loss=loss, tail=tail, beta=beta, normalize_jsd=normalize_jsd, temperature=temperature)
    check_choice("reduction", reduction, REDUCTIONS)
    if student_logits.dim() != 2:
        raise ValueError(f"student_logits must have shape [N, V], got {tuple(student_logits.shape)}")
    n, vocab = student_logits.shape
    ids, lp, valid = _prepare(
        vocab,
        n,
        teacher_ids,
        teacher_logprobs,
        mask,
        student_logits.device,
        check_inputs,
        student_logits.dtype,
    )
    w = row_weights(mask, n, student_logits.device, reduction, lp.dtype)
    chunk = chunk_size or default_chunk_rows(vocab, n)
    kernel = chunk_kernel(backend, student_logits.device)
    return TopKDistillFunction.apply(student_logits, ids, lp, valid, w, spec, reduction, chunk, kernel)
