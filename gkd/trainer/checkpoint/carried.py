"""The batches a checkpoint carries (:class:`gkd.trainer.scheduler.Carried`: generated, not yet trained) as
plain values and tensors, so ``trainer_state.pt`` keeps loading with ``torch.load(weights_only=True)``."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from gkd.rollout.types import Sample
from gkd.trainer.scheduler import Carried

__all__ = ["decode_carried", "encode_carried"]

_PLAIN = (str, int, float, bool)


def _encode_sample(s: Sample) -> dict[str, Any]:
    return {
        "prompt_ids": torch.tensor(s.prompt_ids, dtype=torch.int64),
        "response_ids": torch.tensor(s.response_ids, dtype=torch.int64),
        "response_logprobs": s.response_logprobs.detach().float().cpu().clone(),
        "finish_reason": str(s.finish_reason),
        "policy_version": int(s.policy_version),
        "extra": {str(k): v for k, v in s.extra.items() if isinstance(v, _PLAIN)},
        "topk_ids": None if s.topk_ids is None else s.topk_ids.detach().cpu().clone(),
    }


def _decode_sample(d: dict[str, Any]) -> Sample:
    return Sample(
        prompt_ids=d["prompt_ids"].tolist(),
        response_ids=d["response_ids"].tolist(),
        response_logprobs=d["response_logprobs"],
        finish_reason=d["finish_reason"],
        policy_version=int(d["policy_version"]),
        extra=dict(d["extra"]),
        topk_ids=d["topk_ids"],
    )


def encode_carried(carried: Sequence[Carried]) -> list[dict[str, Any]]:
    """Each carried batch whose answers are samples (the trainer's batches always are)."""
    out = []
    for c in carried:
        if isinstance(c.result, list) and all(isinstance(s, Sample) for s in c.result):
            samples = [_encode_sample(s) for s in c.result]
            out.append({"batch": int(c.batch), "min_version": int(c.min_version), "samples": samples})
    return out


def decode_carried(saved: Sequence[dict[str, Any]] | None) -> list[Carried]:
    """Inverse of :func:`encode_carried` (None, from a checkpoint without carried batches: none)."""
    return [
        Carried(int(d["batch"]), int(d["min_version"]), [_decode_sample(s) for s in d["samples"]])
        for d in saved or ()
    ]
