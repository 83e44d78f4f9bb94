"""Peak memory of the fused lm_head losses beyond their inputs and gradients, and the default chunk
rows derived from it.

The model counts what a fused call allocates on top of ``hidden``, ``weight`` (and bias), the teacher's
[N, K] data and the gradients it returns:

- the [rows, V] logits chunk while its loss runs, ``per_logit_bytes`` per logit: the Triton loss works
  in place on the compute-dtype chunk (its itemsize); the torch loss adds an fp32 copy of a 16-bit
  chunk; the token log-prob path holds the fp32 chunk and one more fp32 [rows, V] (log-sum-exp's
  temporary in forward, beside the 16-bit chunk; the softmax in backward); the dlogits are back in the
  compute dtype (in the chunk's buffer) before the weight gradient takes them, so the two phases do
  not add up;
- compute-dtype copies of ``hidden`` / ``weight`` / bias when their dtype differs from it;
- the weight gradient's accumulator beyond the gradient itself (gkd.kernels.grad_accumulate): none when
  the gradient is in the GEMM dtype or is the fp32 accumulator (fp32 master weights); for 16-bit weights
  with more than one chunk, the 16-bit correction (V x H) and one fp32 product block.

Left out: O(N) and O(N x K) buffers (row values, prepared ids / log-probs: 13 bytes per teacher slot,
8 MiB at N=16384, K=64) and allocator rounding; ``DEFAULT_EXTRA_BYTES`` keeps a margin for them.

Default chunking on CUDA (no ``chunk_size`` / ``chunk_bytes``): the largest balanced chunks whose modelled
extra peak fits ``DEFAULT_EXTRA_BYTES`` (1.375 GiB), at least ``MIN_CHUNK_ROWS`` rows. At V = 151936 in
bf16 that is 5 chunks of 3280 rows at H = 1024 and 7 of 2352 at H = 2048 for N = 16384, against the
1.45 GiB Liger-Kernel 0.8.5's chunked distillation loss measured at both (bench/gpu_kernels.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from gkd.kernels._common import default_chunk_rows
from gkd.kernels.grad_accumulate import product_block_rows

DEFAULT_EXTRA_BYTES = 11 << 27  # 1.375 GiB: the default extra-memory budget of one fused call on CUDA
MIN_CHUNK_ROWS = 256  # below this the three GEMMs per chunk lose their speed: the budget gives way
PATHS = ("topk_triton", "topk_torch", "token_logprobs")


def _size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _acc_dtype(cdt: torch.dtype) -> torch.dtype:
    return torch.float64 if cdt == torch.float64 else torch.float32


@dataclass(frozen=True)
class FusedShape:
    """What the extra memory of one fused call depends on."""

    n: int  # rows (tokens)
    vocab: int
    hidden: int
    cdt: torch.dtype  # GEMM dtype
    hidden_dtype: torch.dtype
    weight_dtype: torch.dtype
    path: str  # one of PATHS
    weight_grad: bool = True
    bias: bool = False
    cuda: bool = True  # elsewhere the 16-bit weight-gradient products take a 16-bit buffer first

    @classmethod
    def of(cls, hidden, weight, bias, cdt, path: str) -> FusedShape:
        return cls(
            n=hidden.shape[0],
            vocab=weight.shape[0],
            hidden=weight.shape[1],
            cdt=cdt,
            hidden_dtype=hidden.dtype,
            weight_dtype=weight.dtype,
            path=path,
            weight_grad=weight.requires_grad and torch.is_grad_enabled(),
            bias=bias is not None,
            cuda=weight.is_cuda,
        )


def per_logit_bytes(path: str, cdt: torch.dtype) -> int:
    """Bytes per logit of a chunk while its loss runs, by loss path (see the module docstring)."""
    size, acc = _size(cdt), _size(_acc_dtype(cdt))
    widened = acc if size < acc else 0  # the fp32 copy of a 16-bit chunk
    if path == "topk_triton":
        return size
    if path == "topk_torch":
        return size + widened
    if path == "token_logprobs":  # backward: the fp32 logits and their softmax
        return 2 * acc
    raise ValueError(f"path must be one of {PATHS}, got {path!r}")


def _pair(s: FusedShape, chunks: int) -> bool:
    return s.weight_grad and s.cdt != _acc_dtype(s.cdt) and s.weight_dtype == s.cdt and chunks > 1


def fixed_extra_bytes(s: FusedShape, chunks: int) -> int:
    """What stays allocated across the chunks: input casts and the weight-gradient accumulator's
    buffers beyond the gradient."""
    size = _size(s.cdt)
    total = 0
    if s.hidden_dtype != s.cdt:
        total += s.n * s.hidden * size
    if s.weight_dtype != s.cdt:
        total += (s.vocab * s.hidden + (s.vocab if s.bias else 0)) * size
    if _pair(s, chunks):  # the correction term and the fp32 product block
        total += s.vocab * s.hidden * size + product_block_rows(s.vocab, s.hidden) * s.hidden * 4
    elif s.weight_grad and s.cdt != _acc_dtype(s.cdt) and s.weight_dtype != s.cdt:
        if s.weight_dtype != _acc_dtype(s.cdt):  # an fp32 accumulator beside the returned gradient
            total += s.vocab * s.hidden * 4
        if not s.cuda:  # no fp32-output GEMM: a [V, H] product buffer
            total += s.vocab * s.hidden * size
    return total


def extra_peak_bytes(s: FusedShape, rows: int) -> int:
    """Modelled extra peak of one call in chunks of ``rows`` rows: the fixed part plus the larger of the
    chunk while its loss runs and the chunk's dlogits while the weight gradient takes them (beside, off
    CUDA, the 16-bit product block that the pair accumulator widens)."""
    rows = max(1, min(rows, s.n))
    chunks = -(-s.n // rows)
    logits = rows * s.vocab
    loss = logits * per_logit_bytes(s.path, s.cdt)
    grad = logits * _size(s.cdt)
    if _pair(s, chunks) and not s.cuda:
        grad += product_block_rows(s.vocab, s.hidden) * s.hidden * _size(s.cdt)
    peak = fixed_extra_bytes(s, chunks) + max(loss, grad)
    if s.path == "token_logprobs":  # its forward: the chunk, its fp32 copy, log-sum-exp's temporary
        peak = max(
            peak,
            logits * (per_logit_bytes(s.path, s.cdt) + (_size(s.cdt) if s.cdt != _acc_dtype(s.cdt) else 0)),
        )
    return peak


def balanced_rows(n: int, most: int) -> int:
    """Rows per chunk for at most ``most`` rows a chunk: the chunks balanced (N=16384 in 4096-row
    chunks, not 4416 + 4416 + 4416 + 3136) and a multiple of 16 when that still fits."""
    most = max(1, most)
    if n <= most:
        return max(n, 1)
    rows = -(-n // -(-n // most))  # ceil(n / number of chunks)
    rows16 = -(-rows // 16) * 16
    return rows16 if rows16 <= most else rows


def budget_rows(s: FusedShape, budget: int = DEFAULT_EXTRA_BYTES) -> int:
    """The largest balanced chunk rows whose modelled extra peak fits ``budget`` (the model grows with
    the rows: a search over them); at least MIN_CHUNK_ROWS (or N) when the fixed part alone nearly
    fills it."""
    if extra_peak_bytes(s, s.n) <= budget:
        return max(s.n, 1)
    lo, hi = 0, s.n  # extra_peak_bytes(s, hi) > budget; lo rows fit (0: none found yet)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if extra_peak_bytes(s, mid) <= budget else (lo, mid)
    return balanced_rows(s.n, max(MIN_CHUNK_ROWS, lo))


def fused_chunk_rows(
    s: FusedShape, device: torch.device, chunk_size: int | None, chunk_bytes: int | None
) -> int:
    """Rows per chunk of a fused loss: ``chunk_size`` if given; else the most balanced rows whose
    ``[rows, V]`` compute-dtype logits fit ``chunk_bytes``; else, on CUDA, :func:`budget_rows` (the
    whole call within DEFAULT_EXTRA_BYTES), on CPU default_chunk_rows (about N/8)."""
    if chunk_size is not None:
        if chunk_size < 1:
            raise ValueError(f"chunk_size={chunk_size} must be >= 1 (rows per chunk), or None")
        return chunk_size
    if chunk_bytes is not None:
        if chunk_bytes < 1:
            raise ValueError(
                f"chunk_bytes={chunk_bytes} must be >= 1 (bytes of one [rows, V] logits chunk), or None"
            )
        return balanced_rows(s.n, chunk_bytes // (max(s.vocab, 1) * _size(s.cdt)))
    if device.type != "cuda":
        return default_chunk_rows(s.vocab, s.n)
    return budget_rows(s)
