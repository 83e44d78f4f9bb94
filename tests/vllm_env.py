"""The vLLM engine tests' module preamble: vLLM's in-process CPU settings, and a module-level skip where
vllm is not importable -- a failure instead under ``GKD_REQUIRE_VLLM=1`` (set by ``scripts/ci_vllm.sh``),
so that the vLLM CI stage cannot pass by skipping."""

import importlib.util
import os

import pytest


def require_vllm() -> None:
    """Call at the top of a test module, before anything imports vllm."""
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    if importlib.util.find_spec("vllm") is None:
        if os.environ.get("GKD_REQUIRE_VLLM") == "1":
            raise ImportError("GKD_REQUIRE_VLLM=1 but vllm is not importable in this environment")
        pytest.skip("vllm is not installed (run scripts/ci_vllm.sh)", allow_module_level=True)
