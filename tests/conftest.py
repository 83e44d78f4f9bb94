"""Test setup: Triton runs in its interpreter when there is no CUDA device, RNGs are seeded, the hub is
offline.

TRITON_INTERPRET must be set before any ``@triton.jit`` function is defined, i.e. before gkd.kernels
is imported by a test module, which is why it happens here at import time of conftest.
"""

import os
import random

# Tests never reach the network: hub ids resolve from local caches only (set before huggingface_hub and
# datasets read it at import; subprocesses inherit it).
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"

import numpy as np
import pytest
import torch

try:
    from hypothesis import settings
except ImportError:  # the vLLM stage's environment (scripts/ci_vllm.sh) has no hypothesis
    settings = None

# CI runs property tests with a fixed seed (reproducible verdicts); local runs keep exploring.
if settings is not None:
    settings.register_profile("ci", derandomize=True, print_blob=True)
    if os.environ.get("CI"):
        settings.load_profile("ci")

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def _seed_everything():
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    yield
