"""Sampled-token reverse KL as a policy-gradient loss (one log-prob per token, no vocabulary work)."""

from __future__ import annotations

import torch

from gkd.kernels._common import REDUCTIONS, check_choice, reduce_weighted


def sampled_reverse_kl_loss(
    student_logprobs: torch.Tensor,  # [N] log q(y) under the current student, differentiable
    rollout_logprobs: torch.Tensor,  # [N] log mu(y) under the policy that sampled y (detached)
    teacher_token_logprobs: torch.Tensor,  # [N] log p(y) under the teacher
    mask: torch.Tensor | None = None,  # [N] bool or float weights
    *,
    ratio_clip: float | None = None,
    reduction: str = "sum",
) -> torch.Tensor:
    """loss = -sum_i w_i * ratio_i * A_i with A_i = -(log mu(y_i) - log p(y_i)) (no gradient) and
    ratio_i = exp(log q(y_i) - log mu(y_i)).

    The gradient is -sum w ratio A grad log q(y), the (importance-weighted) policy gradient of the
    sampled-token reverse KL: with fresh samples (q = mu) it is sum (log q - log p) grad log q.
    ``ratio_clip=c`` truncates the importance weight at c (truncated importance sampling): the value uses
    min(ratio, c) and the gradient is -w min(ratio, c) A grad log q(y).
    """
    check_choice("reduction", reduction, REDUCTIONS)
    n = student_logprobs.shape
    for name, t in (
        ("rollout_logprobs", rollout_logprobs),
        ("teacher_token_logprobs", teacher_token_logprobs),
    ):
        if t.shape != n:
            raise ValueError(
                f"{name} must have the shape of student_logprobs {tuple(n)}, got {tuple(t.shape)}"
            )
    if mask is not None and mask.shape != n:
        raise ValueError(f"mask must have the shape of student_logprobs {tuple(n)}, got {tuple(mask.shape)}")
    if ratio_clip is not None and not ratio_clip > 0:
        raise ValueError(f"ratio_clip={ratio_clip} must be positive (or None)")
    acc = torch.float64 if student_logprobs.dtype == torch.float64 else torch.float32
    logq = student_logprobs.to(acc)
    logmu = rollout_logprobs.detach().to(acc)
    adv = -(logmu - teacher_token_logprobs.detach().to(acc))
    log_ratio = logq - logmu
    if ratio_clip is None:
        ratio = log_ratio.exp()
    else:
        # value min(r, c), gradient min(r, c) * grad log q
        ratio = log_ratio.detach().exp().clamp(max=ratio_clip) * (logq - logq.detach()).exp()
    w = torch.ones_like(logq) if mask is None else mask.to(logq.dtype)
    per_token = torch.where(w != 0, -ratio * adv * w, torch.zeros_like(logq))
    return reduce_weighted(per_token, w, reduction)
