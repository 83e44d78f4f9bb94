"""Student rollout: engines (CPU/transformers, vLLM), sampling types, the rollout service."""

from gkd.rollout.types import Sample, SamplingConfig

__all__ = ["Sample", "SamplingConfig"]
