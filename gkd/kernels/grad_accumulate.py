"""Weight-gradient accumulation of the fused lm_head losses: ``grad_W += dlogits_c^T @ hidden_c`` over
the row chunks, without a [V, H] buffer wider than it must be.

- ``_InPlaceAccumulator``: the gradient is in the GEMM dtype (fp32 / fp64 weights and compute): one
  ``addmm_`` per chunk into the gradient itself; nothing extra.
- ``_WideAccumulator``: the gradient is wider than the GEMM dtype (fp32 master weights, bf16 compute): the
  fp32 gradient is the accumulator; nothing extra on CUDA (fp32-output GEMM), a [V, H] product buffer in
  the compute dtype elsewhere.
- ``_PairAccumulator``: weights, compute and gradient all 16-bit. The gradient ``hi`` plus a 16-bit
  correction ``lo`` (the rounding error of ``hi``) carry the running sum: after each chunk
  ``hi = round(s)``, ``lo = round(s - hi)`` with ``s = hi + lo + product`` in fp32, so ``hi`` ends as the
  correctly rounded fp32 sum (error ~2^-17 relative before the last rounding, against ~n_chunks x 2^-9 for
  a plain 16-bit running sum). Extra memory: ``lo`` (V x H x 2 bytes, half an fp32 accumulator, none
  with a single chunk) and one fp32 product block of ``block_rows`` x H.
"""

from __future__ import annotations

import torch

PRODUCT_BLOCK_BYTES = 64 << 20  # one fp32 [rows of V, H] block of the pair accumulator's product


def product_block_rows(vocab: int, hidden: int) -> int:
    """Rows of the weight gradient per fp32 product block of the pair accumulator."""
    return max(1, min(vocab, PRODUCT_BLOCK_BYTES // (4 * max(hidden, 1))))


class _InPlaceAccumulator:
    """``acc += a @ b`` with ``acc`` in the dtype of ``a`` and ``b``."""

    def __init__(self, acc: torch.Tensor):
        self.acc = acc

    def add(self, a: torch.Tensor, b: torch.Tensor) -> None:
        self.acc.addmm_(a, b)

    def result(self) -> torch.Tensor:
        return self.acc


class _WideAccumulator:
    """``acc += a @ b`` where ``acc`` (the weight gradient) is wider than ``a`` and ``b``.

    bf16/fp16 products into an fp32 ``acc``: on CUDA one GEMM that accumulates into ``acc`` itself
    (``addmm(..., out_dtype=float32, out=acc)``; no product buffer); where that is missing (CPU, or a
    torch whose fp32-output addmm wants ``self`` in the input dtype) the chunk product goes to one reused
    [V, H] buffer in the input dtype and is summed in fp32.
    """

    def __init__(self, acc: torch.Tensor):
        self.acc = acc
        self.fused = acc.is_cuda
        self.prod = None

    def add(self, a: torch.Tensor, b: torch.Tensor) -> None:
        if self.fused:
            try:
                torch.addmm(self.acc, a, b, out_dtype=self.acc.dtype, out=self.acc)
                return
            except (RuntimeError, TypeError):  # raised by the argument checks, before any work is queued
                self.fused = False
        self.prod = torch.mm(a, b, out=self.prod) if self.prod is not None else a @ b
        self.acc += self.prod

    def result(self) -> torch.Tensor:
        return self.acc


def _product_fp32(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor, state: dict) -> torch.Tensor:
    """``a @ b`` into the fp32 ``out``: one fp32-output GEMM on CUDA, else the 16-bit product (fp32
    accumulation inside the GEMM, one rounding) widened into ``out``."""
    if state["fp32_out"]:
        try:
            return torch.mm(a, b, out_dtype=torch.float32, out=out)
        except (RuntimeError, TypeError):  # argument checks (CPU, older torch): before any work
            state["fp32_out"] = False
    return out.copy_(torch.mm(a, b))


def pair_add_torch_(hi: torch.Tensor, lo: torch.Tensor, prod: torch.Tensor) -> None:
    """``hi + lo += prod`` (``prod`` fp32, overwritten): ``hi = round(s)``, ``lo = round(s - hi)``."""
    s = prod.add_(hi).add_(lo)
    hi.copy_(s)
    lo.copy_(s.sub_(hi))


def pair_add_(hi: torch.Tensor, lo: torch.Tensor, prod: torch.Tensor) -> None:
    """The pair update of contiguous blocks: one Triton pass on CUDA (reads 8 bytes and writes 4 per
    element), the torch ops elsewhere."""
    if hi.is_cuda:
        from gkd.kernels.pair_triton import pair_add_triton_

        pair_add_triton_(hi, lo, prod)
    else:
        pair_add_torch_(hi, lo, prod)


class _PairAccumulator:
    """``hi += a @ b`` for a 16-bit ``hi`` (the returned gradient), with a 16-bit correction term.

    ``chunks``: how many products will be added. With one, the product is written to ``hi`` directly
    (the GEMM accumulates in fp32 and rounds once) and no correction buffer is allocated."""

    def __init__(self, hi: torch.Tensor, chunks: int):
        self.hi = hi
        self.single = chunks <= 1
        self.lo = None if self.single else torch.zeros_like(hi)
        self.rows = product_block_rows(*hi.shape)
        self.prod = None
        self.state = {"fp32_out": hi.is_cuda}

    def add(self, a: torch.Tensor, b: torch.Tensor) -> None:
        if self.single:
            self.hi.addmm_(a, b)
            return
        v = self.hi.shape[0]
        if self.prod is None:
            self.prod = torch.empty(min(self.rows, v), self.hi.shape[1], dtype=torch.float32, device=a.device)
        for start in range(0, v, self.rows):
            sl = slice(start, min(start + self.rows, v))
            prod = _product_fp32(a[sl], b, self.prod[: sl.stop - start], self.state)
            pair_add_(self.hi[sl], self.lo[sl], prod)

    def result(self) -> torch.Tensor:
        self.lo = self.prod = None
        return self.hi


def weight_accumulator(weight: torch.Tensor, cdt: torch.dtype, acc_dtype: torch.dtype, chunks: int):
    """The accumulator of ``weight``'s gradient for GEMMs in ``cdt`` over ``chunks`` row chunks (its
    ``result()`` is the gradient, in ``weight``'s dtype or, for _WideAccumulator, ``acc_dtype``)."""
    if cdt == acc_dtype:
        return _InPlaceAccumulator(torch.zeros(weight.shape, dtype=cdt, device=weight.device))
    if weight.dtype == cdt:
        return _PairAccumulator(torch.zeros(weight.shape, dtype=cdt, device=weight.device), chunks)
    return _WideAccumulator(torch.zeros(weight.shape, dtype=acc_dtype, device=weight.device))
