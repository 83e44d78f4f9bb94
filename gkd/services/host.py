"""The service layer the teacher and the rollout services share: how a broker is made, how ``serve``
starts and supervises worker processes, how ``join`` runs one engine or supervises several, and how
``gkd <service> serve|join`` is registered on the command line.

A service is described once by a :class:`ServiceKind` (its name, ops, wire limits, default ports and
logger); what differs between the two services stays in their own modules: the engine spec
(``EngineSpec`` / ``RolloutSpec``), the worker (``make_worker``), the wire layout, the rollout's weight
channel (extra ``join`` options per worker).
"""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from gkd.services.gpus import apply_worker_gpus, engine_slices, run_service, worker_env
from gkd.services.transport import Auth, Broker, Limits, Worker
from gkd.services.transport.codec import DEFAULT_LIMITS
from gkd.services.transport.process import (
    PARENT_ENV,
    add_restart_args,
    auth_from_file,
    configure_logging,
    run_until_stopped,
    serve_broker,
    stop_on_signals,
    supervise,
)

BACKENDS = ("hf", "vllm")  # the engines both services build: transformers (any device) or vLLM (GPU)
# Fault injection for tests: a worker that ``serve`` restarted waits this many seconds before it loads
# its engine (a large engine's slow reload, without the engine). Inherited through the environment.
RELOAD_DELAY_ENV = "GKD_INJECT_RELOAD_DELAY_S"
RESTARTED_ENV = "GKD_WORKER_RESTARTED"  # set by serve for a worker it restarted


@dataclass(frozen=True)
class ServiceKind:
    name: str  # the CLI group and the role in log lines: teacher | rollout
    ops: tuple[str, ...]  # what the broker forwards to workers
    limits: Limits  # request bounds on the wire
    port: int  # default client (frontend) port
    backend_port: int  # default worker (backend) port
    log: logging.Logger
    reply_limits: Limits = DEFAULT_LIMITS  # reply bounds: the broker's backend refuses bigger messages


def make_broker(
    kind: ServiceKind, *, host: str, port: int, backend_port: int, auth: Auth | None = None, **kwargs: Any
) -> Broker:
    return Broker(
        kind.ops,
        host=host,
        frontend_port=port,
        backend_port=backend_port,
        limits=kind.limits,
        reply_limits=kind.reply_limits,
        auth=auth,
        **kwargs,
    )


def spawn_join(
    kind: ServiceKind,
    spec,
    broker: str,
    extra_argv: list[str],
    auth_secret_file: str | None,
    env: dict[str, str],
) -> subprocess.Popen:
    """``gkd <service> join --workers 1`` for ``spec`` (plus ``extra_argv``) with ``env`` added (its
    ``CUDA_VISIBLE_DEVICES`` slice); the child knows its supervisor's pid and exits when orphaned."""
    argv = [sys.executable, "-m", "gkd.cli", kind.name, "join", "--broker", broker, "--workers", "1"]
    argv += (
        spec.to_argv() + extra_argv + (["--auth-secret-file", auth_secret_file] if auth_secret_file else [])
    )
    return subprocess.Popen(argv, env={**os.environ, PARENT_ENV: str(os.getpid()), **env})


def serve(
    kind: ServiceKind,
    spec,
    *,
    host: str = "127.0.0.1",
    port: int | None = None,
    backend_port: int | None = None,
    workers: int = 1,
    auth_secret_file: str | None = None,
    gpus: str | None = None,
    max_restarts: int = 5,
    restart_window_s: float = 600.0,
    worker_restart_grace_s: float = 600.0,
    worker_argv: Callable[[int], list[str]] = lambda i: [],
    detail: str = "",
) -> int:
    """A broker in this process (``port``/``backend_port``: the kind's defaults when None) and ``workers``
    worker processes (worker i: ``worker_argv(i)`` added to its ``join``; its ``tensor_parallel_size``
    slice of ``gpus`` as ``CUDA_VISIBLE_DEVICES``) until SIGINT/SIGTERM; returns the exit status. A worker
    that exits is restarted (the broker re-queues its request), at most ``max_restarts`` times within
    ``restart_window_s``; past that the service stops with status 1 and says why. While a worker
    restarts and none is up, the broker holds requests for it up to ``worker_restart_grace_s``."""
    port = kind.port if port is None else port
    backend_port = kind.backend_port if backend_port is None else backend_port
    if workers < 1:
        raise ValueError("--workers must be >= 1")
    slices = engine_slices(spec, gpus, workers)
    stop = stop_on_signals()
    broker = make_broker(
        kind,
        host=host,
        port=port,
        backend_port=backend_port,
        auth=auth_from_file(auth_secret_file),
        worker_restart_grace_s=worker_restart_grace_s,
    )
    auth = f"auth {'on' if auth_secret_file else 'off'}"
    started: set[int] = set()

    def spawn(backend: str, i: int) -> subprocess.Popen:
        env = worker_env(slices, i) | ({RESTARTED_ENV: "1"} if i in started else {})
        started.add(i)
        return spawn_join(kind, spec, backend, worker_argv(i), auth_secret_file, env)

    return serve_broker(
        kind.name,
        broker,
        workers,
        spawn,
        stop,
        what=f"{spec.backend} worker(s) for {spec.model}",
        detail=f"{auth}, {detail}" if detail else auth,
        svc_log=kind.log,
        max_restarts=max_restarts,
        restart_window_s=restart_window_s,
    )


def join_supervised(
    kind: ServiceKind,
    spec,
    broker: str,
    workers: int,
    auth_secret_file: str | None,
    gpus: str | None,
    worker_argv: Callable[[int], list[str]] = lambda i: [],
) -> int:
    """``join --workers N`` with N > 1: one ``join --workers 1`` process per engine, supervised."""
    slices = engine_slices(spec, gpus, workers)
    stop = stop_on_signals()

    def spawn(i: int) -> subprocess.Popen:
        return spawn_join(kind, spec, broker, worker_argv(i), auth_secret_file, worker_env(slices, i))

    return supervise([spawn(i) for i in range(workers)], stop, spawn)


def join_one(
    kind: ServiceKind,
    spec,
    gpus: str | None,
    build: Callable[[], Worker],
    ready: Callable[[Worker], bool] | None = None,
) -> int:
    """``join --workers 1``: take this worker's GPU slice (before anything starts CUDA), ``build()`` the
    engine's worker, wait until ``ready(worker)`` (False: status 1), then serve until SIGINT/SIGTERM."""
    stop = stop_on_signals()
    apply_worker_gpus(engine_slices(spec, gpus, 1), kind.log)
    delay = float(os.environ.get(RELOAD_DELAY_ENV) or 0) if os.environ.get(RESTARTED_ENV) else 0.0
    if delay > 0:
        kind.log.warning(
            "worker %d: restarted; waiting %.0fs before loading (%s)", os.getpid(), delay, RELOAD_DELAY_ENV
        )
        if stop.wait(delay):
            return 0
    kind.log.info("worker %d: loading the %s", os.getpid(), spec.describe())
    start = time.monotonic()
    worker = build()
    if ready is not None and not ready(worker):
        return 1
    kind.log.info(
        "worker %d: %s engine for %s loaded in %.1fs; serving %s",
        os.getpid(),
        spec.backend,
        spec.model,
        time.monotonic() - start,
        worker.address,
    )
    return run_until_stopped(worker, stop)


_JOIN_OPTIONS = ("workers", "auth_secret_file", "gpus")
_SERVE_OPTIONS = (*_JOIN_OPTIONS, "host", "port", "backend_port", "max_restarts")


def serve_options(args: argparse.Namespace) -> dict[str, Any]:
    """``serve``'s keyword arguments from the options every ``gkd <service> serve`` has."""
    return {
        **{k: getattr(args, k) for k in _SERVE_OPTIONS},
        "restart_window_s": args.restart_window,
        "worker_restart_grace_s": args.restart_grace,
    }


def join_options(args: argparse.Namespace) -> dict[str, Any]:
    """``join``'s keyword arguments from the options every ``gkd <service> join`` has."""
    return {k: getattr(args, k) for k in _JOIN_OPTIONS}


AUTO = "auto"
VLLM_CHECK_TIMEOUT_S = 600.0


def resolve_auto(args: argparse.Namespace, cuda: bool | None = None) -> None:
    """``--device auto``: ``cuda`` when CUDA is present (``cuda``: None = ask torch), else ``cpu``;
    ``--dtype auto``: ``bfloat16`` on CUDA, ``float32`` on CPU. Set in ``args`` in place, before the
    engine spec is made (so ``join`` children get the resolved values)."""
    if AUTO not in (args.device, args.dtype):
        return
    device = args.device
    if device == AUTO:
        if cuda is None:
            import torch

            cuda = torch.cuda.is_available()
        device = args.device = "cuda" if cuda else "cpu"
    if args.dtype == AUTO:
        args.dtype = "bfloat16" if device.startswith("cuda") else "float32"


def check_vllm_imports(python: str = sys.executable, env: dict[str, str] | None = None) -> None:
    """``--backend vllm``: vLLM must import in this interpreter (tried in a child process, so this one
    stays light); raises :class:`~gkd.services.inputs.InputError` naming the ``vllm`` extra otherwise."""
    from gkd.services.inputs import InputError

    try:
        done = subprocess.run(
            [python, "-c", "import vllm"],
            capture_output=True,
            text=True,
            env=env,
            timeout=VLLM_CHECK_TIMEOUT_S,
        )
    except subprocess.TimeoutExpired:
        raise InputError(f"--backend vllm: `import vllm` took over {VLLM_CHECK_TIMEOUT_S:.0f}s") from None
    if done.returncode != 0:
        lines = [line.strip() for line in done.stderr.splitlines() if line.strip()]
        why = lines[-1] if lines else f"status {done.returncode}"
        raise InputError(
            f"--backend vllm: vLLM does not import here ({why}); install the `vllm` extra "
            "(pip install 'gkd[vllm]'), or use --backend hf"
        )


def _command(kind: ServiceKind, command: str, spec_from_args, fn) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        configure_logging(args.log_level)
        resolve_auto(args)
        # before any worker starts; a worker a supervisor spawned (PARENT_ENV) skips what it checked
        if args.backend == "vllm" and PARENT_ENV not in os.environ:
            check_vllm_imports()
        return run_service(
            f"gkd {kind.name} {command}", lambda: spec_from_args(args), lambda spec: fn(spec, args)
        )

    return run


def add_service_cli(
    sub: argparse._SubParsersAction,
    kind: ServiceKind,
    *,
    help: str,
    add_engine_args: Callable[[argparse.ArgumentParser], None],
    spec_from_args: Callable[[argparse.Namespace], Any],
    serve: Callable[[Any, argparse.Namespace], int],
    join: Callable[[Any, argparse.Namespace], int],
    add_join_args: Callable[[argparse.ArgumentParser], None] | None = None,
    extra: tuple[str, ...] = (),
) -> argparse._SubParsersAction:
    """Register ``gkd <service> serve|join`` the same way for every service: the engine options
    (``add_engine_args``, read back by ``spec_from_args``), the broker's address and restart bounds for
    ``serve``, ``--broker`` (and ``add_join_args``) for ``join``; ``serve(spec, args)`` / ``join(spec, args)``
    run after the inputs are checked (:func:`gkd.services.gpus.run_service`). Returns the group's subparsers
    (for extra commands named in ``extra``, e.g. ``ping``)."""
    group = sub.add_parser(kind.name, help=help)
    names = ",".join(("serve", "join", *extra))
    gsub = group.add_subparsers(dest=f"{kind.name}_command", required=True, metavar=f"{{{names}}}")

    s = gsub.add_parser("serve", help=f"start a broker and N {kind.name} worker processes")
    add_engine_args(s)
    s.add_argument("--host", default="127.0.0.1", help="interface to bind (default 127.0.0.1)")
    s.add_argument(
        "--port", type=int, default=kind.port, help=f"client (frontend) port (default {kind.port})"
    )
    s.add_argument(
        "--backend-port",
        type=int,
        default=kind.backend_port,
        help=f"worker (backend) port (default {kind.backend_port})",
    )
    add_restart_args(s)
    s.set_defaults(func=_command(kind, "serve", spec_from_args, serve))

    j = gsub.add_parser(
        "join", help=f"add {kind.name} workers to a running broker (e.g. from another machine)"
    )
    j.add_argument(
        "--broker", required=True, help=f"the broker's backend, HOST:PORT (default port {kind.backend_port})"
    )
    add_engine_args(j)
    if add_join_args is not None:
        add_join_args(j)
    j.set_defaults(func=_command(kind, "join", spec_from_args, join))
    return gsub
