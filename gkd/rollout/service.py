"""Rollout service: broker + worker processes, each an engine behind the transport and a member of the
weight channel; entry points behind ``gkd rollout serve|join``.

A worker (``make_worker``) wraps its engine in a :class:`VersionedEngine`:

- A background thread joins the weight channel (rank ``1..N``; trainer rank 0 sends), waits in the
  channel's store (not in a collective) for each new version's announcement, receives it into the
  ``WeightReceiver``'s staging buffers (``--weight-staging``: host memory, pinned with CUDA, or a GPU copy)
  while requests keep generating with the current weights, and then applies it at the next batch
  boundary: it takes the engine lock, which a request holds from its first token to its last. A request
  therefore never sees half-loaded or mixed weights, and every sample reports the single version that
  produced it.
- The receiver has one set of staging buffers, so the worker stages at most one version ahead: the
  trainer's ``sync(v + 2)`` waits until ``v + 1`` has been applied (at most one request's duration).
- A request with ``min_version`` waits (at most ``wait_s``, capped by the worker's ``--max-wait``) until
  the worker holds that version; on timeout it gets an error reply saying which version it has and the
  channel's state.
- A worker that left the weight channel (its group was re-formed: another member died) and waits to
  rejoin is not listed at the broker: a request waiting for a version it lacks is handed back
  (``HandBack``: the broker gives it to another worker), and it takes requests again once it is back in
  the channel. A restarted worker registers only once it holds the version the trainer last sent.

``serve`` runs the broker in this process and N ``join`` children with consecutive weight ranks; SIGINT or
SIGTERM stops the children (SIGTERM, then SIGKILL after a grace period) and the broker.
"""

from __future__ import annotations

import argparse
import logging
import os
import threading
import time
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from gkd import service
from gkd.channel import ChannelMember
from gkd.dtypes import DTYPE_NAMES
from gkd.placement import VLLMOptions, describe_engine, engine_on_gpu
from gkd.rollout.types import check_prompts
from gkd.rollout.wire import LIMITS, OPS, pack_reply, unpack_request
from gkd.service import BACKENDS, ServiceKind
from gkd.transport import Auth, Broker, HandBack, Worker
from gkd.transport.process import auth_from_file

log = logging.getLogger("gkd.rollout")
ROLLOUT = ServiceKind("rollout", OPS, LIMITS, port=15557, backend_port=15558, log=log)


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
            self.model, dtype=self.dtype, device=self.device, max_batch_size=self.max_batch_size
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


@dataclass(frozen=True)
class WeightChannel:
    """This worker's place in the weight channel (``gkd.weights``): trainer rank 0 hosts the TCPStore on
    ``host:port``; rollout workers are ranks ``1..world_size-1``."""

    host: str
    port: int
    rank: int
    world_size: int
    backend: str | None = None  # gloo | nccl; default: NCCL when CUDA is available
    timeout_s: float = 600.0  # rendezvous and every collective (posted only once both sides are ready)
    idle_timeout_s: float = 86400.0  # the wait for the next version's announcement in the store
    staging: str = "host"  # where a received version waits: host (pinned with CUDA) | device (GPU copy)

    def __post_init__(self):
        if not 1 <= self.rank < self.world_size:
            raise ValueError(f"weight rank {self.rank} must lie in [1, {self.world_size}) (0 is the trainer)")

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"


def parse_host_port(address: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"expected HOST:PORT, got {address!r}")
    return host, int(port)


class _AtVersion:
    """Hands ``WeightReceiver.apply`` an engine whose ``load_weights`` also sets the policy version."""

    def __init__(self, engine, version: int):
        self.engine, self.version = engine, version

    def load_weights(self, named):
        return self.engine.load_weights(named, version=self.version)


class VersionedEngine:
    """An engine whose weights change only between requests; see the module docstring."""

    def __init__(self, engine, channel: WeightChannel | None = None, *, pin: bool | None = None):
        self.engine, self.channel, self.pin = engine, channel, pin  # pin None: when CUDA is available
        self._batch = threading.Lock()  # held for a whole request: weights change only between requests
        self._changed = threading.Condition()
        self.state = "off" if channel is None else "connecting"  # -> ready -> closed | failed
        self.error: str | None = None
        self.receiver = None  # the WeightReceiver, once the handshake is done
        self._thread: threading.Thread | None = None

    @property
    def version(self) -> int:
        return int(self.engine.policy_version)

    def start(self) -> VersionedEngine:
        if self.channel is not None and self._thread is None:
            self._thread = threading.Thread(target=self._receive_loop, name="gkd-weights", daemon=True)
            self._thread.start()
        return self

    @property
    def available(self) -> bool:
        """False while this worker waits to rejoin the weight channel: it takes no requests then."""
        return self.state != "rejoining"

    def wait_for(self, min_version: int, timeout_s: float, *, hand_back: bool = True) -> int:
        """Block until the engine holds at least ``min_version``; ``TimeoutError`` after ``timeout_s`` or
        once the channel failed. ``hand_back``: raise ``HandBack`` while the worker waits to rejoin the
        channel (the version comes no sooner than the trainer's next sync, which may be waiting for this
        very request: another worker takes it)."""
        stops = ("failed", "rejoining") if hand_back else ("failed",)
        with self._changed:
            self._changed.wait_for(lambda: self.version >= min_version or self.state in stops, timeout_s)
            if self.version >= min_version:
                return self.version
            if self.state == "rejoining" and hand_back:
                raise HandBack(
                    f"version {min_version} not here (holds {self.version}); rejoining the channel"
                )
        why = f"; weight channel {self.state}" + (f": {self.error}" if self.error else "")
        if self.channel is None:
            why = "; this worker has no weight channel (--weight-channel)"
        raise TimeoutError(
            f"policy version {min_version} did not arrive within {timeout_s:g}s (this worker holds "
            f"version {self.version}{why})"
        )

    def generate(self, prompts, sampling, *, seed_offset: int = 0):
        """``(samples, version)``; the staged next version cannot be applied until this returns."""
        with self._batch:
            version = self.version
            samples = self.engine.generate(prompts, sampling, seed_offset=seed_offset) if prompts else []
        if any(s.policy_version != version for s in samples):  # the engine broke the contract; never ship it
            raise RuntimeError(
                f"engine reported versions {sorted({s.policy_version for s in samples})} "
                f"for a batch generated with version {version}"
            )
        return samples, version

    def _notify(self, **state: Any) -> None:
        with self._changed:
            for k, v in state.items():
                setattr(self, k, v)
            self._changed.notify_all()

    def _receive_loop(self) -> None:
        from gkd.channel import ChannelMember, member_id
        from gkd.weights import ChannelReform, WeightReceiver, WeightSyncError

        ch = self.channel
        member = None
        try:
            member = ChannelMember(
                ch.host,
                ch.port,
                member_id(ch.rank),
                backend=ch.backend,
                timeout=timedelta(seconds=ch.timeout_s),
                idle_timeout=timedelta(seconds=ch.idle_timeout_s),
            )
            while True:  # one generation of the channel per pass; a member's death re-forms it
                group, _ = member.join()
                receiver = WeightReceiver(
                    group,
                    self.engine.parameters_spec(),
                    staging=ch.staging,
                    pin=self.pin,
                    idle_timeout=timedelta(seconds=ch.idle_timeout_s),
                )
                try:
                    receiver.handshake()
                    self.receiver = receiver  # for inspection (tests, logs)
                    self._notify(state="ready")
                    log.info(
                        "weight channel %s generation %d: rank %d of %d ready (%s, staging in %s memory%s, "
                        "weights arrive as %s)",
                        ch.address,
                        member.generation,
                        group.rank,
                        group.world_size,
                        group.device.type,
                        ch.staging,
                        ", pinned" if receiver.pin and receiver.staging_device.type == "cpu" else "",
                        receiver.sender_dtype or "sent",
                    )
                    if self._receive_versions(receiver):
                        return
                except ChannelReform as e:
                    log.warning("weight channel generation %d ends: %s; rejoining", member.generation, e)
                except WeightSyncError as e:
                    if "store is gone" in str(e):
                        raise
                    log.warning("weight channel generation %d failed: %s; rejoining", member.generation, e)
                finally:
                    receiver.close()
                self._notify(state="rejoining")
        except Exception as e:  # the worker keeps serving its current version; min_version waits report this
            log.exception("weight channel %s failed; no further updates", ch.address)
            self._notify(state="failed", error=f"{type(e).__name__}: {e}")
        finally:
            if member is not None:
                member.close()  # its heartbeat thread ends with the channel

    def _receive_versions(self, receiver) -> bool:
        """Stage and apply versions until the sender closes (-> True) or the group fails (raises)."""
        while True:
            # waits in the store (not in a collective) for the next version, then stages it here
            # while requests keep generating with the old weights
            version = receiver.receive()
            if version is None:
                self._notify(state="closed")
                log.info("weight channel closed by the sender; keeping version %d", self.version)
                return True
            if version < self.version:  # versions never go back on a worker
                log.warning("ignoring version %d: this worker holds %d", version, self.version)
                continue
            start = time.perf_counter()
            with self._batch:  # the batch boundary
                receiver.apply(_AtVersion(self.engine, version))
                self._notify()
            log.info("applied policy version %d in %.3fs", version, time.perf_counter() - start)


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
        "weight_channel": None if channel is None else f"{channel.address} rank {channel.rank}",
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
        **kwargs,
    )
    worker.versioned = versioned
    return worker


def make_broker(*, host: str, port: int, backend_port: int, auth: Auth | None = None, **kwargs) -> Broker:
    return service.make_broker(ROLLOUT, host=host, port=port, backend_port=backend_port, auth=auth, **kwargs)


# ------------------------------------------------------------------------------------ processes


def _channel_argv(
    address: str | None, rank: int, world_size: int, backend: str | None, timeout_s: float, **opts
):
    """``join`` options for one worker's channel; ``opts``: ``idle_timeout_s``, ``staging``."""
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
    host: str = "127.0.0.1",
    port: int = 15557,
    backend_port: int = 15558,
    workers: int = 1,
    weight_channel: str | None = None,
    weight_backend: str | None = None,
    weight_timeout_s: float = 600.0,
    weight_idle_timeout_s: float = 86400.0,
    weight_staging: str = "host",
    auth_secret_file: str | None = None,
    gpus: str | None = None,
    max_restarts: int = 5,
    restart_window_s: float = 600.0,
) -> int:
    """Run a broker and ``workers`` worker processes (weight slots 1..workers of a channel of
    ``workers + 1``) until SIGINT/SIGTERM; returns the exit status. ``gpus`` (``"4,5"``): worker i gets
    the i-th ``tensor_parallel_size`` ids as ``CUDA_VISIBLE_DEVICES``. A worker that exits is restarted
    (at most ``max_restarts`` times within ``restart_window_s``; then status 1 with the reason); the
    restarted worker joins the weight channel's next generation before it takes requests."""
    if weight_channel is not None:
        parse_host_port(weight_channel)
    return service.serve(
        ROLLOUT,
        spec,
        host=host,
        port=port,
        backend_port=backend_port,
        workers=workers,
        auth_secret_file=auth_secret_file,
        gpus=gpus,
        max_restarts=max_restarts,
        restart_window_s=restart_window_s,
        worker_argv=lambda i: _channel_argv(
            weight_channel,
            i + 1,
            workers + 1,
            weight_backend,
            weight_timeout_s,
            idle_timeout_s=weight_idle_timeout_s,
            staging=weight_staging,
        ),
        detail=f"weight channel {weight_channel or 'off'}",
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
    """Serve ``spec`` behind ``broker``'s backend with ``workers`` engines (weight ranks ``weight_rank``,
    ``weight_rank + 1``, ...) until stopped (``gpus`` as for :func:`serve`)."""
    if workers < 1:
        raise ValueError("--workers must be >= 1")
    world = weight_world_size if weight_world_size is not None else weight_rank + workers
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
                weight_rank + i,
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
    g.add_argument("--dtype", choices=DTYPE_NAMES, default="float32")
    g.add_argument("--device", default="cpu", help="hf engine: torch device (default cpu)")
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
    w.add_argument("--weight-backend", choices=("gloo", "nccl"), default=None, help="default: nccl with CUDA")
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
    j.add_argument("--weight-rank", type=int, default=1, help="weight rank of the first worker (default 1)")
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
