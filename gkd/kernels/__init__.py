"""Distillation losses. See gkd.kernels.functional.topk_distill_loss for the definitions."""

from gkd.kernels.functional import topk_distill_loss
from gkd.kernels.fused_linear import fused_linear_token_logprobs, fused_linear_topk_distill_loss
from gkd.kernels.sampled import sampled_reverse_kl_loss

__all__ = [
    "fused_linear_token_logprobs",
    "fused_linear_topk_distill_loss",
    "sampled_reverse_kl_loss",
    "topk_distill_loss",
]
