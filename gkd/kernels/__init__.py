"""Distillation losses that never materialise ``[tokens x vocab]`` logits: the top-k losses (torch and
Triton), the fused lm-head losses, the sampled reverse KL, and their memory model. See
gkd.kernels.functional.topk_distill_loss for the definitions. May import: torch and triton only (nothing
else of gkd)."""

from gkd.kernels.functional import topk_distill_loss
from gkd.kernels.fused_linear import fused_linear_token_logprobs, fused_linear_topk_distill_loss
from gkd.kernels.sampled import sampled_reverse_kl_loss

__all__ = [
    "fused_linear_token_logprobs",
    "fused_linear_topk_distill_loss",
    "sampled_reverse_kl_loss",
    "topk_distill_loss",
]
