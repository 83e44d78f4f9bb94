"""A stand-in ``vllm`` module for CPU tests of the vLLM engines' plumbing (no vLLM installed): ``LLM``
records its keyword arguments and runs ``collective_rpc`` functions against a fake worker (methods
named by a string: on every one of ``tensor_parallel_size`` fake workers, which carry the
``worker_extension_cls`` mixin as vLLM's do, and only with plain arguments: no tensor), so the
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
        self.logits_processor = SimpleNamespace(scale=1.0)

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
    model_factory = None  # a callable: each worker gets a model of its own (default: one shared FakeModel)

    def __init__(self, model: str, **kwargs):
        self.model, self.kwargs = model, kwargs
        self.events: list = []
        self.reset_ok: bool | None = True
        config = SimpleNamespace(
            get_vocab_size=lambda: 320, max_model_len=kwargs.get("max_model_len", 128), quantization=None
        )
        self.llm_engine = SimpleNamespace(model_config=config)
        model_obj = FakeModel(self.events, self.device)
        extension = kwargs.get("worker_extension_cls")
        bases = (resolve(extension),) if extension else ()
        worker_class = type("FakeWorker", bases, {})
        self.workers = []
        for rank in range(int(kwargs.get("tensor_parallel_size", 1))):
            worker = worker_class()
            own = model_obj if FakeLLM.model_factory is None else FakeLLM.model_factory()
            worker.rank, worker.model_runner = rank, SimpleNamespace(get_model=lambda own=own: own)
            self.workers.append(worker)
        self.worker = self.workers[0]
        self.rpcs: list = []  # (method name, args) of every call by name
        FakeLLM.created.append(self)

    def collective_rpc(self, fn, args=()):
        if isinstance(fn, str):  # vLLM's worker processes: the name and plain arguments cross a process
            _check_plain(args)
            self.rpcs.append((fn, args))
            return [getattr(w, fn)(*args) for w in self.workers]
        return [fn(self.worker, *args)]

    def reset_prefix_cache(self):
        self.events.append("reset")
        return self.reset_ok


def resolve(qualname: str):
    """vLLM's ``resolve_obj_by_qualname``: ``package.module.Name``."""
    import importlib

    module, _, name = qualname.rpartition(".")
    return getattr(importlib.import_module(module), name)


def _check_plain(value) -> None:
    """What vLLM's multiprocess path sends cheaply: no tensor anywhere in the arguments."""
    if isinstance(value, torch.Tensor):
        raise TypeError("a tensor in collective_rpc arguments would be pickled with its whole storage")
    if isinstance(value, dict):
        for item in value.values():
            _check_plain(item)
    elif isinstance(value, list | tuple):
        for item in value:
            _check_plain(item)
    elif not isinstance(value, str | int | float | bool | type(None)):
        raise TypeError(f"collective_rpc argument of type {type(value).__name__} is not plain")


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
