"""Student rollout: engines (CPU/transformers, vLLM), sampling types, the rollout service.

- ``types``: ``Sample``, ``SamplingConfig`` (the engine contract).
- ``hf_engine.HFRolloutEngine`` / ``vllm_engine.VLLMRolloutEngine`` (vllm imported there only, lazily).
- ``wire``: the ``generate`` op's request/reply layout.
- ``client.RolloutClient``: ``submit(prompts, sampling) -> Future[list[Sample]]``.
- ``service``: ``serve``/``join`` and the weight receiver (behind ``gkd rollout ...``).

May import: ``gkd.config``, ``gkd.weights`` (the receiver), ``gkd.data`` (tokenizers), ``gkd.services``.
"""

from gkd.rollout.types import Sample, SamplingConfig

__all__ = ["RolloutClient", "Sample", "SamplingConfig"]


def __getattr__(name: str):
    # The client (and with it ZeroMQ) loads on first use: code that needs only the types stays light.
    if name == "RolloutClient":
        from gkd.rollout.client import RolloutClient

        return RolloutClient
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
