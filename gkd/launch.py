"""``gkd train --config configs/X.yaml [key=value ...]``: one command for a whole run on one node.

1. Load and check the config (a bad key fails here, before anything starts).
2. With ``teacher.launch`` / ``rollout.launch``: start ``gkd teacher serve`` / ``gkd rollout serve
   --weight-channel 127.0.0.1:rollout.weight_port`` as child processes and wait until every configured
   worker has registered with its broker (each child's exit or a timeout is an error naming the service).
3. Build and run the torchrun command (``python -m torch.distributed.run --standalone --nproc-per-node N
   -m gkd.train --config ... overrides``); children share this terminal, so their logs stream here.
4. On exit, error, Ctrl-C or SIGTERM: stop every child (SIGTERM, then SIGKILL after a grace period).

Multi-node trainers (``trainer.nnodes > 1``) run ``scripts/launch.sh`` (torchrun with a c10d rendezvous)
on each node themselves (README, "Multi-node").
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence

from gkd.config import Config, load_config
from gkd.transport.process import PARENT_ENV, configure_logging, stop_children

log = logging.getLogger("gkd.launch")

HEALTH_TIMEOUT_S = 600.0


class LaunchError(RuntimeError):
    """A service did not come up, or the config asks for something this launcher cannot start."""


def _gkd(*args: object) -> list[str]:
    return [sys.executable, "-m", "gkd.cli", *map(str, args)]


def teacher_command(cfg: Config) -> list[str]:
    t = cfg.teacher
    argv = _gkd("teacher", "serve", "--model", t.model_path, "--backend", t.backend, "--workers", t.workers)
    argv += ["--port", str(t.server_port), "--backend-port", str(t.backend_port)]
    argv += ["--top-k", str(t.top_k), "--temperature", repr(t.temperature)]
    return argv + (["--auth-secret-file", t.auth_secret_file] if t.auth_secret_file else [])


def rollout_command(cfg: Config) -> list[str]:
    from gkd.trainer import param_dtype, weight_backend

    r = cfg.rollout
    argv = _gkd("rollout", "serve", "--model", cfg.model.student_path, "--backend", r.backend)
    argv += ["--dtype", param_dtype(cfg)]  # the dtype the trainer's weights arrive in
    argv += ["--workers", str(r.workers), "--port", str(r.server_port), "--backend-port", str(r.backend_port)]
    argv += ["--device", "cuda" if r.n_gpus_per_node > 0 else "cpu"]
    argv += ["--weight-channel", f"127.0.0.1:{r.weight_port}", "--weight-backend", weight_backend(cfg)]
    return argv + (["--auth-secret-file", r.auth_secret_file] if r.auth_secret_file else [])


def torchrun_command(cfg: Config, config_paths: Sequence[str], overrides: Sequence[str]) -> list[str]:
    argv = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    argv += ["--nproc-per-node", str(cfg.trainer.procs_per_node), "-m", "gkd.train"]
    for path in config_paths:
        argv += ["--config", str(path)]
    return argv + list(overrides)


def wait_healthy(
    name: str, proc: subprocess.Popen, info: Callable[[], dict], workers: int, timeout_s: float
) -> None:
    """Poll ``info()`` until ``workers`` workers are registered; raise if ``proc`` exits or time runs out."""
    deadline = time.monotonic() + timeout_s
    seen = 0
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise LaunchError(f"the {name} service exited with status {proc.returncode} while starting")
        try:
            seen = len(info().get("workers", []))
        except (TimeoutError, OSError, RuntimeError):
            seen = 0
        if seen >= workers:
            log.info("%s service healthy: %d worker(s)", name, seen)
            return
        time.sleep(0.5)
    raise LaunchError(f"the {name} service has {seen} of {workers} workers after {timeout_s:.0f}s")


def run(
    config_paths: Sequence[str], overrides: Sequence[str], *, health_timeout_s: float = HEALTH_TIMEOUT_S
) -> int:
    """Start the configured services and torchrun; stop every child at the end. Returns torchrun's status."""
    cfg = load_config(config_paths, overrides)
    if cfg.trainer.nnodes > 1:
        raise LaunchError(
            f"trainer.nnodes={cfg.trainer.nnodes}: `gkd train` starts one node; run `scripts/launch.sh "
            "--nnodes N --node-rank R --rdzv-endpoint HOST:PORT --config ...` (torchrun with those flags, "
            "-m gkd.train) on each trainer node, services started separately (README: Multi-node)"
        )
    children: list[subprocess.Popen] = []
    env = {**os.environ, PARENT_ENV: str(os.getpid())}  # services exit if this launcher dies

    def terminate(signum, _frame):  # SIGTERM: unwind like Ctrl-C so the finally stops the children
        raise KeyboardInterrupt

    from gkd.trainer import StartupError, secret_auth

    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        services = []
        if cfg.teacher.launch:
            from gkd.teacher.client import TeacherClient

            argv = teacher_command(cfg)
            log.info("starting the teacher service: %s", " ".join(argv))
            children.append(subprocess.Popen(argv, env=env))
            auth = secret_auth("teacher.auth_secret_file", cfg.teacher.auth_secret_file)
            client = TeacherClient(f"127.0.0.1:{cfg.teacher.server_port}", timeout_s=5, retries=0, auth=auth)
            services.append(("teacher", children[-1], client, cfg.teacher.workers))
        if cfg.rollout.launch:
            from gkd.rollout.client import RolloutClient

            argv = rollout_command(cfg)
            log.info("starting the rollout service: %s", " ".join(argv))
            children.append(subprocess.Popen(argv, env=env))
            auth = secret_auth("rollout.auth_secret_file", cfg.rollout.auth_secret_file)
            client = RolloutClient(f"127.0.0.1:{cfg.rollout.server_port}", timeout_s=5, retries=0, auth=auth)
            services.append(("rollout", children[-1], client, cfg.rollout.workers))
        for name, proc, client, workers in services:
            try:
                wait_healthy(name, proc, lambda c=client: c.info(timeout_s=2), workers, health_timeout_s)
            finally:
                client.close()
        argv = torchrun_command(cfg, config_paths, overrides)
        log.info("starting the trainer: %s", " ".join(argv))
        trainer = subprocess.Popen(argv, env=os.environ.copy())
        children.append(trainer)
        status = trainer.wait()
        log.info("trainer exited with status %d", status)
        return status
    except KeyboardInterrupt:
        log.warning("interrupted; stopping every child process")
        return 130
    except StartupError as e:  # an unreadable secret file
        raise LaunchError(str(e)) from e
    finally:
        stop_children(list(reversed(children)))  # the trainer first, then the services
        signal.signal(signal.SIGTERM, previous)


def _train(args: argparse.Namespace) -> int:
    from gkd.config import ConfigError

    configure_logging(args.log_level)
    try:
        return run(args.config, args.overrides)
    except (ConfigError, LaunchError) as e:
        print(f"gkd train: error: {e}", file=sys.stderr)
        return 2


def add_train_cli(subparsers: argparse._SubParsersAction) -> None:
    """Register ``gkd train`` (the top-level parser defines ``--log-level``)."""
    p = subparsers.add_parser("train", help="run distillation: local services (if configured) + torchrun")
    p.add_argument("--config", action="append", required=True, help="YAML config file (repeatable)")
    p.add_argument("overrides", nargs="*", help="key=value config overrides, e.g. trainer.total_steps=10")
    p.set_defaults(func=_train)
