"""Shared pieces of the distillation losses: the loss specification, input checks, row weights.

Nothing here runs a kernel; everything is cheap [N, K]-sized work done once per call.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch

LOSSES = ("forward_kl", "reverse_kl", "jsd")
TAILS = ("bucket", "renorm", "none")
REDUCTIONS = ("sum", "mean", "none")
BACKENDS = ("auto", "torch", "triton")

# The teacher's "everything else" bucket holds 1 - S. Teacher log-probs arrive rounded (fp16 on the wire),
# so S can reach or pass 1 although the teacher's true tail is never exactly empty. The bucket's teacher
# probability is floored here so reverse KL and JSD stay finite; the floor is a constant of the teacher, so
# gradients with respect to the student stay exact for the value computed.
TAIL_FLOOR = 1e-6
LOG_TAIL_FLOOR = math.log(TAIL_FLOOR)


@dataclass(frozen=True)
class LossSpec:
    """What to compute per token. ``beta`` and ``normalize_jsd`` matter for jsd only."""

    loss: str = "forward_kl"
    tail: str = "bucket"
    beta: float = 0.5
    normalize_jsd: bool = False
    temperature: float = 1.0

    def __post_init__(self):
        if self.loss not in LOSSES:
            raise ValueError(f"loss={self.loss!r} is not one of {LOSSES}")
        if self.tail not in TAILS:
            raise ValueError(f"tail={self.tail!r} is not one of {TAILS}")
        if self.tail == "none" and self.loss != "forward_kl":
            raise ValueError(
                f"tail='none' defines forward_kl only (sum_k p_k (log p_k - log q_k)); loss={self.loss!r} "
                "needs tail='bucket' or tail='renorm'"
            )
        if not (0.0 <= float(self.beta) <= 1.0):
            raise ValueError(f"beta={self.beta} must lie in [0, 1]")
        if not (float(self.temperature) > 0.0 and math.isfinite(self.temperature)):
            raise ValueError(f"temperature={self.temperature} must be a positive finite number")

    @property
    def kind(self) -> str:
        """The divergence actually computed: jsd at beta=0 / beta=1 is forward / reverse KL (GKD/TRL)."""
        if self.loss == "jsd" and self.beta == 0.0:
            return "forward_kl"
        if self.loss == "jsd" and self.beta == 1.0:
            return "reverse_kl"
        return self.loss

    @property
    def jsd_scale(self) -> float:
        """Factor applied to jsd values: 1/(beta(1-beta)) when normalised, else 1."""
        if self.kind == "jsd" and self.normalize_jsd:
            return 1.0 / (self.beta * (1.0 - self.beta))
        return 1.0


class ChunkKernel(NamedTuple):
    """One backend's loss on a chunk of rows: the contract every top-k loss path calls.

    ``run(logits, ids, lp, valid, scale, spec, need_grad) -> (values [C], dlogits [C, V] or None)`` with
    ``logits`` a [C, V] chunk the caller owns (overwritten: dlogits comes back in it or in an fp32 copy),
    ``ids``/``lp``/``valid`` [C, K], ``scale`` [C] row weights. ``column_major``: ``run`` also takes a
    chunk whose unit stride runs along C, so the fused path may compute logits as ``(W @ h.T).T``."""

    name: str  # the backend: torch | triton
    run: Callable
    column_major: bool = False


def check_choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is not one of {allowed}")


def check_topk_inputs(
    vocab: int,
    n: int,
    teacher_ids: torch.Tensor,
    teacher_logprobs: torch.Tensor,
    mask: torch.Tensor | None,
    *,
    check_values: bool = True,
) -> None:
    """Shape, dtype and value checks that name the offending argument.

    ``check_values`` (one host sync) checks that ids of used slots lie in [0, V) and are unique per row;
    pass ``False`` to skip it in a hot loop once the data path is trusted.
    """
    if teacher_ids.dim() != 2 or teacher_ids.shape[0] != n:
        raise ValueError(f"teacher_ids must have shape [N={n}, K], got {tuple(teacher_ids.shape)}")
    if teacher_ids.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"teacher_ids must be int32 or int64, got {teacher_ids.dtype}")
    if teacher_logprobs.shape != teacher_ids.shape:
        raise ValueError(
            f"teacher_logprobs must have the shape of teacher_ids {tuple(teacher_ids.shape)}, "
            f"got {tuple(teacher_logprobs.shape)}"
        )
    if not teacher_logprobs.is_floating_point():
        raise ValueError(f"teacher_logprobs must be floating point, got {teacher_logprobs.dtype}")
    if teacher_ids.shape[1] > vocab:
        raise ValueError(
            f"teacher_ids has K={teacher_ids.shape[1]} slots, more than the vocabulary V={vocab}"
        )
    if mask is not None and (mask.dim() != 1 or mask.shape[0] != n):
        raise ValueError(f"mask must have shape [N={n}], got {tuple(mask.shape)}")
    if not check_values or teacher_ids.numel() == 0:
        return
    used = teacher_logprobs > float("-inf")
    bad = used & ((teacher_ids < 0) | (teacher_ids >= vocab))
    if bool(bad.any()):
        row, slot = (int(i) for i in bad.nonzero()[0])
        raise ValueError(
            f"teacher_ids[{row}, {slot}] = {int(teacher_ids[row, slot])} is outside [0, V={vocab}); "
            "ids must index the student's vocabulary (mark unused slots with teacher_logprobs = -inf)"
        )
    if bool(torch.isnan(teacher_logprobs).any()) or bool((teacher_logprobs > 1e-3).any()):
        raise ValueError(
            "teacher_logprobs must be log-probabilities (<= 0, or -inf for unused slots); got NaN or > 0"
        )
    # Unique ids among used slots: a repeated id would count its student mass twice.
    ids = torch.where(
        used, teacher_ids.long(), -1 - torch.arange(teacher_ids.shape[1], device=teacher_ids.device)
    )
    srt = ids.sort(dim=1).values
    dup = (srt[:, 1:] == srt[:, :-1]) & (srt[:, 1:] >= 0)
    if bool(dup.any()):
        row = int(dup.any(dim=1).nonzero()[0])
        raise ValueError(
            f"teacher_ids row {row} repeats an id among its used slots; ids must be unique per row"
        )


def row_weights(
    mask: torch.Tensor | None, n: int, device, reduction: str, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Per-row weights with the reduction folded in: ``sum(values * w)`` is the reduced loss.

    For ``mean`` the weights are divided by their sum (the count of unmasked tokens for a bool mask);
    an all-masked batch gives weights 0 and a loss of 0, not NaN.
    """
    w = torch.ones(n, device=device, dtype=dtype) if mask is None else mask.to(device=device, dtype=dtype)
    if reduction == "mean":
        total = w.sum()
        w = torch.where(total > 0, w / total.clamp_min(torch.finfo(dtype).tiny), torch.zeros_like(w))
    return w


def default_chunk_rows(vocab: int, n: int) -> int:
    """Rows per GEMM chunk: about N/8 (an unfused loss holds several [N, V] buffers, so the chunk's
    [rows, V] buffer stays a few percent of that), at least 4M and at most 32M logits per chunk.

    Larger chunks keep the three lm_head GEMMs per chunk efficient (each chunk re-reads the V x H weight;
    at V = 152k, 96-row chunks measured 1.21x the unfused time and 208-row chunks 1.08x). A multiple of 16.
    """
    v = max(vocab, 1)
    rows = min(max(n // 8, (1 << 22) // v), (1 << 25) // v)
    rows = max(16, rows // 16 * 16)
    return max(1, min(rows, max(n, 1)))


def weighted_mean(total: torch.Tensor, weight_sum: torch.Tensor) -> torch.Tensor:
    """``total / weight_sum``, or 0 when nothing is weighted (an all-masked batch), never NaN."""
    positive = weight_sum > 0
    return torch.where(
        positive, total / torch.where(positive, weight_sum, torch.ones_like(weight_sum)), total * 0
    )


def reduce_weighted(values: torch.Tensor, w: torch.Tensor, reduction: str) -> torch.Tensor:
    """Per-row ``values`` (already multiplied by their weights ``w``) reduced: as they are ("none"),
    summed ("sum"), or summed over ``w``'s sum ("mean"; 0 when nothing is weighted)."""
    if reduction == "none":
        return values
    total = values.sum()
    return weighted_mean(total, w.sum()) if reduction == "mean" else total


def take_eager_grads(ctx, grad_out: torch.Tensor) -> tuple:
    """Scale the gradients computed during forward by the scalar upstream gradient, in place.

    In place because a scaled copy would be one more gradient-sized buffer (for an lm_head: V x H) at
    the memory peak. The buffers are handed to autograd once; ``ctx.eager_grads`` is cleared so that a
    further backward through a retained graph recomputes instead of returning them scaled twice.
    """
    grads, ctx.eager_grads = ctx.eager_grads, None
    return tuple(None if g is None else g.mul_(grad_out.to(g.dtype)) for g in grads)
