"""A stand-in ``vllm`` module for CPU tests of the vLLM engines' plumbing (no vLLM installed): ``LLM``
records its keyword arguments and runs ``collective_rpc`` functions against a fake worker, so the
settings an engine passes and the order of a weight update's steps (load, device sync, prefix-cache
reset) can be checked. Install it with :func:`install` (``monkeypatch`` restores ``sys.modules``)."""

from __future__ import annotations

import sys
import types
from types import SimpleNamespace

import torch


class FakeModel:
    """``worker.model_runner.get_model()``: records loads; its parameters say they live on ``device``."""

    def __init__(self, events: list, device: torch.device):
        self.events, self.device = events, device

    def load_weights(self, weights):
        names = [name for name, _ in weights]
        self.events.append(("load", len(names)))
        return set(names)

    def parameters(self):
        yield SimpleNamespace(device=self.device)


class FakeLLM:
    """``vllm.LLM``: ``kwargs`` as given; ``reset_ok`` is what ``reset_prefix_cache`` returns."""

    created: list[FakeLLM] = []
    device = torch.device("cuda", 0)

    def __init__(self, model: str, **kwargs):
        self.model, self.kwargs = model, kwargs
        self.events: list = []
        self.reset_ok: bool | None = True
        config = SimpleNamespace(
            get_vocab_size=lambda: 320, max_model_len=kwargs.get("max_model_len", 128), quantization=None
        )
        self.llm_engine = SimpleNamespace(model_config=config)
        model_obj = FakeModel(self.events, self.device)
        self.worker = SimpleNamespace(model_runner=SimpleNamespace(get_model=lambda: model_obj))
        FakeLLM.created.append(self)

    def collective_rpc(self, fn, args=()):
        return [fn(self.worker, *args)]

    def reset_prefix_cache(self):
        self.events.append("reset")
        return self.reset_ok


def install(monkeypatch) -> type[FakeLLM]:
    """Put the fake ``vllm`` (with ``vllm.inputs`` and ``vllm.platforms``, a GPU platform) in
    ``sys.modules``; ``torch.cuda.current_stream(device).synchronize()`` is recorded in the engine's
    events instead of touching CUDA. Returns the ``LLM`` class (``.created`` lists the engines)."""
    FakeLLM.created = []
    vllm = types.ModuleType("vllm")
    vllm.LLM = FakeLLM
    vllm.SamplingParams = dict
    inputs = types.ModuleType("vllm.inputs")
    inputs.TokensPrompt = dict
    platforms = types.ModuleType("vllm.platforms")
    platforms.current_platform = SimpleNamespace(is_cpu=lambda: False)
    vllm.inputs, vllm.platforms = inputs, platforms
    for name, module in (("vllm", vllm), ("vllm.inputs", inputs), ("vllm.platforms", platforms)):
        monkeypatch.setitem(sys.modules, name, module)

    def current_stream(device=None):
        return SimpleNamespace(synchronize=lambda: FakeLLM.created[-1].events.append(("sync", str(device))))

    monkeypatch.setattr(torch.cuda, "current_stream", current_stream)
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    return FakeLLM
