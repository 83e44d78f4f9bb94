"""Teacher service entry points behind ``gkd teacher serve|join|ping``.

- ``serve``: a broker (frontend ``--port`` for clients, backend ``--backend-port`` for workers) in this
  process, plus N worker processes (each ``gkd teacher join --workers 1`` holding one engine). SIGINT or
  SIGTERM stops the children (SIGTERM, then SIGKILL after a grace period) and the broker.
- ``join``: worker processes that connect to a broker's backend, possibly from another machine.
- ``ping``: asks the broker for its info and prints model, vocab size, tokenizer fingerprint, max top-k,
  protocol version and live workers; exit status 0 when healthy, 1 with the reason otherwise.

A child worker is told its supervisor's pid (``GKD_PARENT_PID``) and exits when it is orphaned, so a
SIGKILLed ``serve`` does not leave engines holding memory.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gkd.config.dtypes import DTYPE_NAMES
from gkd.services import host as service
from gkd.services.gpus import VLLMOptions, describe_engine, engine_on_gpu
from gkd.services.host import BACKENDS, ServiceKind
from gkd.services.transport import PROTOCOL_VERSION, Auth, Broker, Client, ProtocolError, RemoteError, Worker
from gkd.services.transport.process import auth_from_file
from gkd.teacher.wire import LIMITS, OPS, REPLY_LIMITS, make_handler

log = logging.getLogger("gkd.teacher")
TEACHER = ServiceKind("teacher", OPS, LIMITS, 15555, 15556, log, reply_limits=REPLY_LIMITS)
# vLLM's prompt-logprobs path allocates [tokens, vocab] logits plus an fp32 log-softmax outside what its
# memory profiler counts (~7.5 GiB at 8192 tokens x 152k vocab), so the teacher leaves more headroom
# than vLLM's own 0.9.
GPU_MEMORY_UTILIZATION = 0.8
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")


@dataclass(frozen=True)
class EngineSpec:
    """How to build one teacher engine; also what a worker announces (``info``)."""

    model: str
    backend: str = "hf"
    gguf_file: str | None = None
    dtype: str = "float32"
    top_k: int = 64  # the maximum top-k served, and the default when a request gives none
    temperature: float = 1.0  # the default when a request gives none
    logprob_dtype: str = "float32"
    max_batch_tokens: int = 8192
    device: str = "cpu"  # hf engine: torch device (cuda = the first GPU the worker sees)
    vllm: VLLMOptions = field(
        default_factory=lambda: VLLMOptions(gpu_memory_utilization=GPU_MEMORY_UTILIZATION)
    )

    def __post_init__(self):
        if self.backend not in BACKENDS:
            raise ValueError(f"backend {self.backend!r} is not one of {BACKENDS}")
        if self.vllm.tensor_parallel_size > 1 and self.backend != "vllm":
            raise ValueError(f"--tensor-parallel-size {self.vllm.tensor_parallel_size} needs --backend vllm")
        if self.top_k < 1 or not self.temperature > 0:
            raise ValueError(f"top_k={self.top_k} must be >= 1 and temperature={self.temperature} > 0")

    def build(self):
        """Load the engine (slow: reads the weights)."""
        common = {"dtype": self.dtype, "max_top_k": self.top_k, "logprob_dtype": self.logprob_dtype}
        if self.backend == "vllm":
            from gkd.teacher.vllm_engine import VLLMTeacherEngine

            knobs = self.vllm.llm_kwargs()
            # the engine adds the one position vLLM must generate to max_len
            max_len = knobs.pop("max_model_len", None)
            return VLLMTeacherEngine(self.model, gguf_file=self.gguf_file, max_len=max_len, **common, **knobs)
        from gkd.teacher.hf_engine import HFTeacherEngine

        return HFTeacherEngine.from_pretrained(
            self.model,
            gguf_file=self.gguf_file,
            max_batch_tokens=self.max_batch_tokens,
            device=self.device,
            **common,
        )

    @property
    def on_gpu(self) -> bool:
        return engine_on_gpu(self.backend, self.device)

    def describe(self) -> str:
        return describe_engine(self.backend, self.model, self.dtype, self.device, self.vllm)

    def to_argv(self) -> list[str]:
        """The ``gkd teacher join`` options that rebuild this spec in a child process."""
        argv = ["--model", self.model, "--backend", self.backend, "--dtype", self.dtype]
        argv += ["--top-k", str(self.top_k), "--temperature", repr(self.temperature)]
        argv += ["--logprob-dtype", self.logprob_dtype, "--max-batch-tokens", str(self.max_batch_tokens)]
        argv += ["--device", self.device, *self.vllm.to_argv()]
        return argv + (["--gguf-file", self.gguf_file] if self.gguf_file else [])


def tokenizer_fingerprint(model: str, gguf_file: str | None = None, tokenizer=None) -> str:
    """``sha256:<16 hex>`` of the tokenizer's vocabulary (sorted token -> id pairs), or ``none`` when the
    model folder has no tokenizer. Two services with equal fingerprints map text to the same ids.
    ``tokenizer``: the folder's tokenizer when the caller has loaded it already (not loaded again)."""
    folder = Path(model)
    if not folder.is_dir() or not (gguf_file or any((folder / f).exists() for f in _TOKENIZER_FILES)):
        return "none"
    from transformers import AutoTokenizer

    try:
        kwargs = {"gguf_file": gguf_file} if gguf_file else {}
        if tokenizer is None:
            tokenizer = AutoTokenizer.from_pretrained(folder, **kwargs)
    except (OSError, ValueError, KeyError) as e:  # shown by `ping`; scoring needs ids, not the tokenizer
        log.warning("could not load the tokenizer in %s: %s", folder, e)
        return f"unreadable ({type(e).__name__})"
    pairs = sorted(tokenizer.get_vocab().items())
    return "sha256:" + hashlib.sha256(json.dumps(pairs, ensure_ascii=False).encode()).hexdigest()[:16]


def worker_info(spec: EngineSpec, engine) -> dict[str, Any]:
    return {
        **engine.info(),
        "tokenizer": tokenizer_fingerprint(spec.model, spec.gguf_file),
        "default_temperature": spec.temperature,
        "logprob_dtype": spec.logprob_dtype,
    }


def make_worker(spec: EngineSpec, broker: str, *, auth: Auth | None = None, engine=None, **kwargs) -> Worker:
    """A ``Worker`` serving ``spec``'s engine (built here unless given) behind ``broker``'s backend."""
    engine = engine if engine is not None else spec.build()
    handler = make_handler(
        engine,
        default_top_k=spec.top_k,
        default_temperature=spec.temperature,
        logprob_dtype=spec.logprob_dtype,
    )
    info = worker_info(spec, engine)
    # an engine that batches concurrent calls itself (vLLM) takes several requests at once
    kwargs.setdefault("max_in_flight", int(getattr(engine, "max_in_flight", 1)))
    return Worker(broker, handler, ops=OPS, info=info, limits=LIMITS, auth=auth, **kwargs)


def make_broker(*, host: str, port: int, backend_port: int, auth: Auth | None = None, **kwargs) -> Broker:
    return service.make_broker(TEACHER, host=host, port=port, backend_port=backend_port, auth=auth, **kwargs)


def serve(spec: EngineSpec, **options: Any) -> int:
    """``gkd teacher serve``: :func:`gkd.services.host.serve` with the teacher's ports (15555, 15556) by
    default; ``options``: host, port, backend_port, workers, auth_secret_file, gpus, max_restarts,
    restart_window_s."""
    return service.serve(TEACHER, spec, **options)


def join(
    spec: EngineSpec,
    broker: str,
    *,
    workers: int = 1,
    auth_secret_file: str | None = None,
    gpus: str | None = None,
) -> int:
    """Serve ``spec`` behind ``broker``'s backend (HOST:PORT) with ``workers`` engines until stopped
    (``gpus`` as for :func:`serve`)."""
    if workers < 1:
        raise ValueError("--workers must be >= 1")
    if workers > 1:
        return service.join_supervised(TEACHER, spec, broker, workers, auth_secret_file, gpus)
    return service.join_one(
        TEACHER, spec, gpus, lambda: make_worker(spec, broker, auth=auth_from_file(auth_secret_file))
    )


def ping(address: str, *, timeout_s: float = 5.0, auth_secret_file: str | None = None, out=None) -> int:
    """Print the service's state; return 0 when healthy, 1 (reason on stderr) otherwise."""
    out = out or sys.stdout
    try:
        with Client(address, timeout_s=timeout_s, retries=0, auth=auth_from_file(auth_secret_file)) as client:
            info = client.info(timeout_s=timeout_s)
    except TimeoutError:
        hint = "is `gkd teacher serve` running there"
        hint += "" if auth_secret_file else ", and does it require --auth-secret-file"
        return _unhealthy(f"no reply from {address} within {timeout_s}s ({hint}?)")
    except (RemoteError, ProtocolError, ValueError) as e:
        return _unhealthy(f"bad reply from {address}: {e}")
    workers = info.get("workers", [])
    print(f"address: {address}", file=out)
    print(f"protocol: {info.get('protocol')} (this client: {PROTOCOL_VERSION})", file=out)
    busy = sum(bool(w.get("busy")) for w in workers)
    print(f"workers: {len(workers)} live ({busy} busy), queue {info.get('queue')}", file=out)
    infos = [w.get("info", {}) for w in workers]
    keys = ("model", "engine", "vocab_size", "tokenizer", "max_top_k", "max_len", "logprob_dtype")
    for key in keys:
        values = sorted({str(i.get(key)) for i in infos})
        print(f"{key}: {', '.join(values) if values else '-'}", file=out)
    for w, i in zip(workers, infos, strict=True):
        print(
            f"  worker {i.get('host')}:{i.get('pid')} busy={w.get('busy')} served={w.get('served')}", file=out
        )
    if info.get("protocol") != PROTOCOL_VERSION:
        return _unhealthy(f"protocol {info.get('protocol')} differs from this client's {PROTOCOL_VERSION}")
    if not workers:
        return _unhealthy("no live workers connected to the broker")
    for key in ("model", "vocab_size", "tokenizer", "max_top_k"):
        if len({str(i.get(key)) for i in infos}) > 1:
            return _unhealthy(f"workers disagree on {key}")
    print("healthy", file=out)
    return 0


def _unhealthy(reason: str) -> int:
    print(f"unhealthy: {reason}", file=sys.stderr)
    return 1


# ------------------------------------------------------------------------------------ command line


def _add_engine_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("teacher engine")
    g.add_argument(
        "--model", required=True, help="local model folder (transformers layout; never downloaded)"
    )
    g.add_argument("--gguf-file", default=None, help="GGUF file inside --model to load instead")
    g.add_argument("--backend", choices=BACKENDS, default="hf", help="engine (default: hf)")
    g.add_argument(
        "--dtype",
        choices=(*DTYPE_NAMES, "auto"),
        default="auto",
        help="engine precision (default auto: bfloat16 on CUDA, float32 on CPU)",
    )
    g.add_argument("--top-k", type=int, default=64, help="maximum (and default) top-k served (default 64)")
    g.add_argument("--temperature", type=float, default=1.0, help="default teacher temperature")
    g.add_argument(
        "--logprob-dtype",
        choices=("float16", "float32"),
        default="float32",
        help="top-k log-probs on the wire (token log-probs are always float32)",
    )
    g.add_argument("--max-batch-tokens", type=int, default=8192, help="hf engine: padded tokens per batch")
    g.add_argument("--device", default="auto", help="hf engine: torch device (default auto: cuda if present)")
    g.add_argument("--workers", type=int, default=1, help="engine processes to start (default 1)")
    g.add_argument("--auth-secret-file", default=None, help="shared secret; clients need the same file")
    VLLMOptions.add_args(p, memory_default=GPU_MEMORY_UTILIZATION)


def engine_spec(args: argparse.Namespace) -> EngineSpec:
    """The ``EngineSpec`` that ``gkd teacher serve|join``'s engine options describe."""
    return EngineSpec(
        model=args.model,
        backend=args.backend,
        gguf_file=args.gguf_file,
        dtype=args.dtype,
        top_k=args.top_k,
        temperature=args.temperature,
        logprob_dtype=args.logprob_dtype,
        max_batch_tokens=args.max_batch_tokens,
        device=args.device,
        vllm=VLLMOptions.from_args(args),
    )


def _ping(args: argparse.Namespace) -> int:
    return ping(args.address, timeout_s=args.timeout, auth_secret_file=args.auth_secret_file)


def add_teacher_cli(sub: argparse._SubParsersAction) -> None:
    """Register ``gkd teacher serve|join|ping`` (the top-level parser must define ``--log-level``)."""
    tsub = service.add_service_cli(
        sub,
        TEACHER,
        help="the teacher scoring service",
        add_engine_args=_add_engine_args,
        spec_from_args=engine_spec,
        serve=lambda spec, args: serve(spec, **service.serve_options(args)),
        join=lambda spec, args: join(spec, args.broker, **service.join_options(args)),
        extra=("ping",),
    )
    p = tsub.add_parser("ping", help="print a teacher service's state; exit 0 if healthy, 1 if not")
    p.add_argument("address", help="the broker's client port, HOST:PORT (default port 15555)")
    p.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for the reply")
    p.add_argument("--auth-secret-file", default=None)
    p.set_defaults(func=_ping)
