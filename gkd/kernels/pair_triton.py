"""Triton pass of the 16-bit pair accumulator (gkd.kernels.grad_accumulate): ``s = hi + lo + prod`` in
fp32, ``hi = round(s)``, ``lo = round(s - hi)``, one read of each operand and one write of ``hi`` and
``lo`` (the torch ops take five passes and an fp32 temporary)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 4096


@triton.jit
def _pair_add_kernel(hi_ptr, lo_ptr, prod_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    hi = tl.load(hi_ptr + offs, mask=m, other=0.0)
    s = tl.load(prod_ptr + offs, mask=m, other=0.0) + hi.to(tl.float32)
    s += tl.load(lo_ptr + offs, mask=m, other=0.0).to(tl.float32)
    new_hi = s.to(hi_ptr.dtype.element_ty, fp_downcast_rounding="rtne")
    tl.store(hi_ptr + offs, new_hi, mask=m)
    lo = (s - new_hi.to(tl.float32)).to(lo_ptr.dtype.element_ty, fp_downcast_rounding="rtne")
    tl.store(lo_ptr + offs, lo, mask=m)


def pair_add_triton_(hi: torch.Tensor, lo: torch.Tensor, prod: torch.Tensor) -> None:
    """``hi + lo += prod`` on contiguous blocks of one shape (``prod`` fp32, left as it was)."""
    if not (hi.is_contiguous() and lo.is_contiguous() and prod.is_contiguous()):
        raise ValueError("pair_add_triton_ needs contiguous hi, lo and prod")
    if not hi.shape == lo.shape == prod.shape or prod.dtype != torch.float32:
        raise ValueError(f"pair_add_triton_: shapes {hi.shape} {lo.shape} {prod.shape}, prod {prod.dtype}")
    n = hi.numel()
    if n:
        _pair_add_kernel[(triton.cdiv(n, BLOCK),)](hi, lo, prod, n, BLOCK=BLOCK)
