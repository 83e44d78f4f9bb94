"""The GPUs of one service's workers, and its GPU engine's knobs: the pieces a teacher or rollout service
uses when it starts (the launcher's whole-node plan, built on these, is :mod:`gkd.launch.placement`).

:class:`VLLMOptions` carries the vLLM engine knobs of one service (CLI flags <-> spec <-> ``vllm.LLM``
keyword arguments); :func:`worker_gpus` cuts a service's GPU list into one slice per worker;
:func:`weight_backend` picks the weight channel's torch.distributed backend from the config.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from gkd.config import Config

VISIBLE_ENV = "CUDA_VISIBLE_DEVICES"


class PlacementError(ValueError):
    """The GPUs asked for cannot be placed on this node; the message names the keys and counts."""


def _ids(devices: Sequence[str]) -> str:
    return ",".join(devices)


def weight_backend(cfg: Config) -> str:
    """The weight channel's torch.distributed backend: NCCL only when trainer and rollout are both on GPUs
    and may not share them (NCCL refuses two ranks on one GPU); gloo otherwise. ``rollout.weight_backend``
    other than auto decides."""
    if cfg.rollout.weight_backend != "auto":
        return cfg.rollout.weight_backend
    gpu = cfg.trainer.n_gpus_per_node > 0 and cfg.rollout.n_gpus_per_node > 0
    return "nccl" if gpu and not cfg.trainer.allow_shared_gpu else "gloo"


def parse_gpus(text: str | None) -> list[str]:
    """``"4,5"`` -> ``["4", "5"]``; ``None`` or ``""`` -> ``[]``."""
    return [d.strip() for d in (text or "").split(",") if d.strip()]


def worker_gpus(
    gpus: str | None, workers: int, tp: int, *, env: Mapping[str, str] | None = None
) -> list[list[str]] | None:
    """One ``tp``-sized slice per worker, from ``--gpus`` (exactly ``workers * tp`` ids) or else from an
    inherited ``CUDA_VISIBLE_DEVICES`` (its first ``workers * tp`` ids); None when neither is given (the
    workers inherit the environment as is). Raises :class:`PlacementError` naming the flag and counts."""
    env = os.environ if env is None else env
    need = workers * tp
    given = parse_gpus(gpus)
    if given:
        if len(given) != need or len(set(given)) != len(given):
            raise PlacementError(
                f"--gpus {gpus}: expected {need} distinct GPU ids (--workers {workers} x "
                f"--tensor-parallel-size {tp}), got {len(given)}"
            )
    else:
        given = parse_gpus(env.get(VISIBLE_ENV))
        if not given:
            return None
        if len(given) < need:
            raise PlacementError(
                f"{VISIBLE_ENV}={env.get(VISIBLE_ENV)} holds {len(given)} GPU(s); --workers {workers} x "
                f"--tensor-parallel-size {tp} need {need} (pass --gpus, or fewer workers)"
            )
    return [given[i * tp : (i + 1) * tp] for i in range(workers)]


_VLLM_KNOBS = (
    "tensor_parallel_size",
    "gpu_memory_utilization",
    "max_model_len",
    "max_num_batched_tokens",
    "enforce_eager",
)


@dataclass(frozen=True)
class VLLMOptions:
    """vLLM engine knobs of one service (``None`` = vLLM's default); the hf engines ignore them except
    ``tensor_parallel_size``, which must be 1 there."""

    tensor_parallel_size: int = 1
    gpu_memory_utilization: float | None = None
    max_model_len: int | None = None  # prompt + response tokens
    max_num_batched_tokens: int | None = None
    enforce_eager: bool = False

    def __post_init__(self):
        if self.tensor_parallel_size < 1:
            raise PlacementError(f"--tensor-parallel-size {self.tensor_parallel_size} must be >= 1")
        u = self.gpu_memory_utilization
        if u is not None and not 0 < u <= 1:
            raise PlacementError(f"--gpu-memory-utilization {u} must lie in (0, 1]")

    def llm_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``vllm.LLM`` (only the knobs that are set)."""
        out: dict[str, Any] = {}
        for name in _VLLM_KNOBS:
            value = getattr(self, name)
            if value is not None and (name != "enforce_eager" or value):
                out[name] = value
        return out

    def describe(self) -> str:
        return " ".join(f"{name}={getattr(self, name)}" for name in _VLLM_KNOBS)

    def to_argv(self) -> list[str]:
        argv = []
        for name, value in self.llm_kwargs().items():
            flag = "--" + name.replace("_", "-")
            argv += [flag] if value is True else [flag, str(value)]
        return argv

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> VLLMOptions:
        return cls(
            tensor_parallel_size=args.tensor_parallel_size,
            gpu_memory_utilization=args.gpu_memory_utilization,
            max_model_len=args.max_model_len,
            max_num_batched_tokens=args.max_num_batched_tokens,
            enforce_eager=args.enforce_eager,
        )

    @staticmethod
    def add_args(p: argparse.ArgumentParser, *, memory_default: float | None) -> None:
        """The GPU flags of ``gkd teacher|rollout serve|join``."""
        g = p.add_argument_group("GPUs and vLLM engine")
        g.add_argument(
            "--gpus",
            default=None,
            metavar="4,5",
            help="GPU ids for the workers, tensor-parallel-size per worker, in order (default: the "
            "inherited CUDA_VISIBLE_DEVICES, sliced the same way)",
        )
        g.add_argument("--tensor-parallel-size", type=int, default=1, help="GPUs per engine (vllm)")
        g.add_argument(
            "--gpu-memory-utilization",
            type=float,
            default=memory_default,
            help=f"vllm: fraction of each GPU the engine may reserve (default {memory_default or 'vLLM'})",
        )
        g.add_argument("--max-model-len", type=int, default=None, help="vllm: prompt + response tokens")
        g.add_argument(
            "--max-num-batched-tokens", type=int, default=None, help="vllm: scheduler token budget"
        )
        g.add_argument("--enforce-eager", action="store_true", help="vllm: no CUDA graphs")


def apply_worker_gpus(slices: list[list[str]] | None, log) -> None:
    """In a single worker process: narrow ``CUDA_VISIBLE_DEVICES`` to its slice before CUDA starts."""
    if slices is not None:
        os.environ[VISIBLE_ENV] = _ids(slices[0])
        log.info("worker %d: %s=%s", os.getpid(), VISIBLE_ENV, os.environ[VISIBLE_ENV])


def worker_env(slices: list[list[str]] | None, i: int) -> dict[str, str]:
    """The environment additions of worker ``i``: its own ``CUDA_VISIBLE_DEVICES`` slice."""
    return {} if slices is None else {VISIBLE_ENV: _ids(slices[i])}


def engine_on_gpu(backend: str, device: str) -> bool:
    """A vLLM engine always runs on GPUs here; an hf engine when its device is CUDA."""
    return backend == "vllm" or device.startswith("cuda")


def engine_slices(spec, gpus: str | None, workers: int) -> list[list[str]] | None:
    """Each worker's GPUs for a teacher or rollout ``spec`` (``backend``, ``device``, ``vllm``): from
    ``--gpus`` or the inherited ``CUDA_VISIBLE_DEVICES`` (:func:`worker_gpus`); None for CPU engines."""
    if not engine_on_gpu(spec.backend, spec.device):
        return None
    return worker_gpus(gpus, workers, spec.vllm.tensor_parallel_size)


def describe_engine(backend: str, model: str, dtype: str, device: str, vllm: VLLMOptions) -> str:
    """The engine settings a worker logs when it starts."""
    where = f"device={device}" if backend == "hf" else vllm.describe()
    return f"{backend} engine for {model}: dtype={dtype} {where}"


def run_service(command: str, make_spec: Callable[[], Any], start: Callable[[Any], int]) -> int:
    """``start(make_spec())`` for ``gkd teacher|rollout serve|join``: a bad flag (the spec's ``ValueError``,
    or the GPU slicing's :class:`PlacementError`, raised before anything starts) is one line, exit 2."""
    try:
        spec = make_spec()
    except ValueError as e:
        print(f"{command}: error: {e}", file=sys.stderr)
        return 2
    try:
        return start(spec)
    except PlacementError as e:
        print(f"{command}: error: {e}", file=sys.stderr)
        return 2
