"""Rollout service: broker + worker processes, each an engine behind the transport and a member of the
weight channel; entry points behind ``gkd rollout serve|join``.

A worker (``make_worker``) wraps its engine in a :class:`gkd.rollout.versioned.VersionedEngine`, which
takes new weight versions from the trainer's weight channel between requests.

``serve`` runs the broker in this process and N ``join`` children with consecutive weight ranks; SIGINT or
SIGTERM stops the children (SIGTERM, then SIGKILL after a grace period) and the broker.
"""

from __future__ import annotations

import argparse
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any

from gkd.config.dtypes import DTYPE_NAMES
from gkd.rollout.types import check_prompts
from gkd.rollout.versioned import VersionedEngine, WeightChannel, parse_host_port
from gkd.rollout.wire import LIMITS, OPS, REPLY_LIMITS, pack_reply, unpack_request
from gkd.services import host as service
from gkd.services.gpus import VLLMOptions, describe_engine, engine_on_gpu
from gkd.services.host import BACKENDS, ServiceKind
from gkd.services.transport import Auth, Broker, Worker
from gkd.services.transport.process import auth_from_file
from gkd.weights.channel import ChannelMember
from gkd.weights.membership import TOKEN_ENV, read_token_file

log = logging.getLogger("gkd.rollout")
ROLLOUT = ServiceKind("rollout", OPS, LIMITS, 15557, 15558, log, reply_limits=REPLY_LIMITS)


@dataclass(frozen=True)
class RolloutSpec:
    """How to build one rollout engine."""

    model: str
    backend: str = "hf"
    dtype: str = "float32"
    device: str = "cpu"
    max_batch_size: int = 64
    vllm: VLLMOptions = field(default_factory=VLLMOptions)

    def __post_init__(self):
        if self.backend not in BACKENDS:
            raise ValueError(f"backend {self.backend!r} is not one of {BACKENDS}")
        if self.vllm.tensor_parallel_size > 1 and self.backend != "vllm":
            raise ValueError(f"--tensor-parallel-size {self.vllm.tensor_parallel_size} needs --backend vllm")

    @property
    def on_gpu(self) -> bool:
        return engine_on_gpu(self.backend, self.device)

    def describe(self) -> str:
        return describe_engine(self.backend, self.model, self.dtype, self.device, self.vllm)

    def build(self):
        """Load the engine (slow: reads the weights)."""
        if self.backend == "vllm":
            from gkd.rollout import vllm_engine  # imports vllm lazily, with an install hint

            return vllm_engine.VLLMRolloutEngine(self.model, dtype=self.dtype, **self.vllm.llm_kwargs())
        from gkd.rollout.hf_engine import HFRolloutEngine

        return HFRolloutEngine.from_pretrained(
            self.model,
            dtype=self.dtype,
            device=self.device,
            max_batch_size=self.max_batch_size,
            max_len=self.vllm.max_model_len,  # --max-model-len bounds the hf engine's requests too
        )

    def to_argv(self) -> list[str]:
        """The ``join`` options that rebuild this spec in a child process."""
        argv = ["--model", self.model, "--backend", self.backend, "--dtype", self.dtype]
        return argv + [
            "--device",
            self.device,
            "--max-batch-size",
            str(self.max_batch_size),
            *self.vllm.to_argv(),
        ]


def make_handler(engine: VersionedEngine, *, max_wait_s: float = 600.0):
    """The worker handler: validate, wait for ``min_version`` if asked, generate one batch."""
    inner = engine.engine
    max_len = int(getattr(inner, "max_len", 1 << 31))

    def handle(header: dict[str, Any], tensors: dict[str, Any]):
        prompts, sampling, extra = unpack_request(header, tensors)
        check_prompts(
            prompts,
            vocab_size=int(inner.vocab_size),
            max_len=max_len,
            max_new_tokens=sampling.max_new_tokens,
            offset=extra["offset"],
        )
        if extra["min_version"] is not None:
            wait_s = max_wait_s if extra["wait_s"] is None else min(max(extra["wait_s"], 0.0), max_wait_s)
            engine.wait_for(extra["min_version"], wait_s)
        start = time.perf_counter()
        samples, version = engine.generate(prompts, sampling, seed_offset=extra["seed_offset"])
        return pack_reply(samples, version, service_s=time.perf_counter() - start)

    return handle


def make_worker(
    spec: RolloutSpec,
    broker: str,
    *,
    channel: WeightChannel | None = None,
    auth: Auth | None = None,
    engine=None,
    max_wait_s: float = 600.0,
    **kwargs,
) -> Worker:
    """A ``Worker`` serving ``spec``'s engine (built here unless given) behind ``broker``'s backend. The
    weight channel thread starts here; the ``VersionedEngine`` is ``worker.versioned``."""
    engine = engine if engine is not None else spec.build()
    versioned = VersionedEngine(engine, channel).start()
    info = {
        "model": spec.model,
        "engine": spec.backend,
        "vocab_size": int(engine.vocab_size),
        "max_len": int(getattr(engine, "max_len", 0)) or None,
        "weight_channel": None
        if channel is None
        else f"{channel.address} rank {channel.rank}"
        + (f"..{channel.rank + channel.ranks - 1}" if channel.ranks > 1 else ""),
    }
    handler = make_handler(versioned, max_wait_s=max_wait_s)
    worker = Worker(
        broker,
        handler,
        ops=OPS,
        info=info,
        limits=LIMITS,
        auth=auth,
        available=lambda: versioned.available,
        failure=versioned.failure,
        # an engine that batches concurrent calls itself (vLLM) takes several requests at once
        **{"max_in_flight": int(getattr(engine, "max_in_flight", 1)), **kwargs},
    )
    worker.versioned = versioned
    return worker


def make_broker(*, host: str, port: int, backend_port: int, auth: Auth | None = None, **kwargs) -> Broker:
    return service.make_broker(ROLLOUT, host=host, port=port, backend_port=backend_port, auth=auth, **kwargs)


# ------------------------------------------------------------------------------------ processes


def _channel_argv(
    address: str | None, rank: int, world_size: int, backend: str | None, timeout_s: float, **opts
):
    """``join`` options for one worker's channel (its first weight rank ``rank``); ``opts``:
    ``idle_timeout_s``, ``staging``."""
    if address is None:
        return []
    argv = ["--weight-channel", address, "--weight-rank", str(rank), "--weight-world-size", str(world_size)]
    argv += ["--weight-timeout", repr(timeout_s)] + (["--weight-backend", backend] if backend else [])
    if "idle_timeout_s" in opts:
        argv += ["--weight-idle-timeout", repr(opts["idle_timeout_s"])]
    return argv + (["--weight-staging", opts["staging"]] if "staging" in opts else [])


def serve(
    spec: RolloutSpec,
    *,
    workers: int = 1,
    weight_channel: str | None = None,
    weight_backend: str | None = None,
    weight_timeout_s: float = 600.0,
    weight_idle_timeout_s: float = 86400.0,
    weight_staging: str = "host",
    **options: Any,
) -> int:
    """``gkd rollout serve``: :func:`gkd.services.host.serve` with the rollout's ports (15557, 15558) by
    default (``options``: host, port, backend_port, auth_secret_file, gpus, max_restarts, restart_window_s);
    the ``workers`` take weight ranks 1..workers x tp of a channel of ``workers x tp + 1`` (tp: the vLLM
    engines' ``tensor_parallel_size``, each of whose workers is a member; worker i's block starts at ``1 + i x
    tp``), and a restarted worker joins the weight channel's next generation before it takes requests."""
    if weight_channel is not None:
        parse_host_port(weight_channel)
    tp = spec.vllm.tensor_parallel_size
    return service.serve(
        ROLLOUT,
        spec,
        workers=workers,
        worker_argv=lambda i: _channel_argv(
            weight_channel,
            1 + i * tp,
            1 + workers * tp,
            weight_backend,
            weight_timeout_s,
            idle_timeout_s=weight_idle_timeout_s,
            staging=weight_staging,
        ),
        detail=f"weight channel {weight_channel or 'off'}",
        **options,
    )


def join(
    spec: RolloutSpec,
    broker: str,
    *,
    workers: int = 1,
    weight_channel: str | None = None,
    weight_rank: int = 1,
    weight_world_size: int | None = None,
    weight_backend: str | None = None,
    weight_timeout_s: float = 600.0,
    weight_idle_timeout_s: float = 86400.0,
    weight_staging: str = "host",
    max_wait_s: float = 600.0,
    auth_secret_file: str | None = None,
    gpus: str | None = None,
) -> int:
    """Serve ``spec`` behind ``broker``'s backend with ``workers`` engines (first weight ranks
    ``weight_rank``, ``weight_rank + tp``, ...; tp: ``tensor_parallel_size``) until stopped (``gpus`` as
    for :func:`serve`)."""
    if workers < 1:
        raise ValueError("--workers must be >= 1")
    tp = spec.vllm.tensor_parallel_size
    world = weight_world_size if weight_world_size is not None else weight_rank + workers * tp
    if workers > 1:
        return service.join_supervised(
            ROLLOUT,
            spec,
            broker,
            workers,
            auth_secret_file,
            gpus,
            lambda i: _channel_argv(
                weight_channel,
                weight_rank + i * tp,
                world,
                weight_backend,
                weight_timeout_s,
                idle_timeout_s=weight_idle_timeout_s,
                staging=weight_staging,
            ),
        )
    channel = None
    if weight_channel is not None:
        host, port = parse_host_port(weight_channel)
        channel = WeightChannel(
            host,
            port,
            weight_rank,
            world,
            weight_backend,
            weight_timeout_s,
            weight_idle_timeout_s,
            weight_staging,
            bucket_macs=auth_secret_file is not None,  # a secret: the weights' bytes are MACed too
            ranks=tp,
        )
    # a worker that starts after the trainer sent a version (a restart) serves only once it holds it
    sent = None if channel is None else ChannelMember.sent_version(channel.host, channel.port)

    def holds_sent_version(worker) -> bool:
        if sent is None:
            return True
        # the trainer takes it into the channel at its next sync (a step or so)
        log.info(
            "worker %d: the trainer has sent version %d; serving once this worker holds it", os.getpid(), sent
        )
        try:
            worker.versioned.wait_for(sent, weight_idle_timeout_s, hand_back=False)
        except TimeoutError as e:
            log.error("worker %d: %s", os.getpid(), e)
            return False
        return True

    return service.join_one(
        ROLLOUT,
        spec,
        gpus,
        lambda: make_worker(
            spec, broker, channel=channel, auth=auth_from_file(auth_secret_file), max_wait_s=max_wait_s
        ),
        holds_sent_version,
    )


# ------------------------------------------------------------------------------------ command line


def _add_common(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("rollout engine")
    g.add_argument("--model", required=True, help="student model folder (transformers layout)")
    g.add_argument("--backend", choices=BACKENDS, default="hf", help="engine (default: hf)")
    g.add_argument(
        "--dtype",
        choices=(*DTYPE_NAMES, "auto"),
        default="auto",
        help="engine precision (default auto: bfloat16 on CUDA, float32 on CPU)",
    )
    g.add_argument("--device", default="auto", help="hf engine: torch device (default auto: cuda if present)")
    g.add_argument("--max-batch-size", type=int, default=64, help="hf engine: prompts per decoding batch")
    g.add_argument("--workers", type=int, default=1, help="engine processes to start (default 1)")
    g.add_argument("--auth-secret-file", default=None, help="shared secret; clients need the same file")
    VLLMOptions.add_args(p, memory_default=None)
    w = p.add_argument_group("weight channel")
    w.add_argument(
        "--weight-channel",
        default=None,
        metavar="HOST:PORT",
        help="the trainer's weight-channel store (trainer rank 0 is rank 0); off when omitted",
    )
    w.add_argument(
        "--weight-backend",
        choices=("gloo", "nccl"),
        default=None,
        help="default: the one the trainer announces (rollout.weight_backend); another one fails at once",
    )
    w.add_argument(
        "--channel-token-file",
        default=None,
        metavar="FILE",
        help="the run's weight-channel token (`gkd train` writes <output_dir>/channel.token; its own "
        f"workers get it in {TOKEN_ENV})",
    )
    w.add_argument(
        "--weight-timeout",
        type=float,
        default=600.0,
        help="seconds for the rendezvous and for each collective once both sides are ready (default 600)",
    )
    w.add_argument(
        "--weight-idle-timeout",
        type=float,
        default=86400.0,
        help="longest wait for the next version's announcement, seconds (a log line every minute meanwhile)",
    )
    w.add_argument(
        "--weight-staging",
        choices=("host", "device"),
        default="host",
        help="where a received version waits for the swap: host memory (pinned with CUDA; default) or a "
        "second copy on the GPU",
    )


def _spec(args: argparse.Namespace) -> RolloutSpec:
    if args.channel_token_file:  # the workers this process starts inherit it
        os.environ[TOKEN_ENV] = read_token_file(args.channel_token_file)
    vllm = VLLMOptions.from_args(args)
    return RolloutSpec(args.model, args.backend, args.dtype, args.device, args.max_batch_size, vllm)


def _channel_options(args: argparse.Namespace) -> dict[str, Any]:
    return dict(
        weight_channel=args.weight_channel,
        weight_backend=args.weight_backend,
        weight_timeout_s=args.weight_timeout,
        weight_idle_timeout_s=args.weight_idle_timeout,
        weight_staging=args.weight_staging,
    )


def _serve(spec: RolloutSpec, args: argparse.Namespace) -> int:
    return serve(spec, **service.serve_options(args), **_channel_options(args))


def _join(spec: RolloutSpec, args: argparse.Namespace) -> int:
    return join(
        spec,
        args.broker,
        **service.join_options(args),
        **_channel_options(args),
        weight_rank=args.weight_rank,
        weight_world_size=args.weight_world_size,
        max_wait_s=args.max_wait,
    )


def _add_join_args(j: argparse.ArgumentParser) -> None:
    j.add_argument(
        "--weight-rank",
        type=int,
        default=1,
        help="weight rank of the first worker (default 1); a vLLM engine with --tensor-parallel-size N "
        "takes N ranks",
    )
    j.add_argument(
        "--weight-world-size",
        type=int,
        default=None,
        help="trainer rank 0 + all rollout workers (default: weight-rank + workers)",
    )
    j.add_argument("--max-wait", type=float, default=600.0, help="longest min_version wait, seconds")


def add_rollout_cli(subparsers: argparse._SubParsersAction) -> None:
    """Register ``gkd rollout serve|join`` (the top-level parser must define ``--log-level``)."""
    service.add_service_cli(
        subparsers,
        ROLLOUT,
        help="the student rollout (generation) service",
        add_engine_args=_add_common,
        spec_from_args=_spec,
        serve=_serve,
        join=_join,
        add_join_args=_add_join_args,
    )


def main(argv: list[str] | None = None) -> int:
    """``python -m gkd.rollout.service rollout serve ...``: the same commands without ``gkd.cli``."""
    parser = argparse.ArgumentParser(prog="gkd")
    parser.add_argument("--log-level", default="INFO", choices=("DEBUG", "INFO", "WARNING", "ERROR"))
    add_rollout_cli(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
