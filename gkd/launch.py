"""``gkd train --config configs/X.yaml [key=value ...]``: one command for a whole run on one node.

1. Load and check the config (a bad key fails here, before anything starts); plan this node's GPUs
   (``gkd.placement``: disjoint device sets per role, refusals in one line) and print the plan.
   ``--dry-run`` stops here after printing every command with its environment.
2. With ``teacher.launch`` / ``rollout.launch``: start ``gkd teacher serve`` / ``gkd rollout serve
   --weight-channel 127.0.0.1:rollout.weight_port`` as child processes. A service on GPUs gets ``--gpus``
   (its pool; it hands each worker one tensor-parallel slice as ``CUDA_VISIBLE_DEVICES``), ``--device
   cuda``, its dtype and, for vLLM, the engine knobs of its section.
3. At the same time, start the trainer with its ``CUDA_VISIBLE_DEVICES``: the torchrun command (``python
   -m torch.distributed.run --standalone --nproc-per-node N -m gkd.train --config ... overrides``), or, for
   one DDP process, ``python -m gkd.train`` itself (torchrun's agent would only add an interpreter start
   and a torch import before it). The trainer loads the student while the services load their models,
   then waits (``GKD_SERVICE_WAIT_S``) until every configured worker has registered with its broker;
   ``GKD_LAUNCH_T0`` lets it report its start-up from this launcher's start (``gkd.startup``).
4. Watch every child: a service or the trainer exiting stops the rest, and the console gets one line per
   failure (what died, its exit status, its last error line, where its log is). Each child's full output
   goes to ``trainer.output_dir/logs/<name>.log``; the trainer's also streams here, without tracebacks
   and torchrun's failure report (they stay in the log).
5. On exit, error, Ctrl-C or SIGTERM: stop every child (SIGTERM, then SIGKILL after a grace period). The
   children get a parent-death signal (``prctl``), so ``kill -9`` of this launcher stops them too; the
   trainer's ranks watch their torchrun agent.

Multi-node trainers (``trainer.nnodes > 1``) run ``scripts/launch.sh`` (torchrun with a c10d rendezvous)
on each node themselves (README, "Multi-node").
"""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from gkd.channel_auth import token_env
from gkd.config import Config, RolloutConfig, TeacherConfig, load_config, rollout_dtype, teacher_dtype
from gkd.placement import (
    FAKE_GPUS_ENV,
    VISIBLE_ENV,
    Found,
    PlacementError,
    Plan,
    VLLMOptions,
    detect_gpus,
    weight_backend,
)
from gkd.placement import plan as place
from gkd.preflight import check_launch
from gkd.startup import LAUNCH_T0_ENV, SERVICE_WAIT_ENV, process_start_time
from gkd.transport.process import (
    PARENT_ENV,
    _describe_exit,
    configure_logging,
    set_parent_death_signal,
    stop_children,
)

log = logging.getLogger("gkd.launch")

HEALTH_TIMEOUT_S = 600.0
WATCH_INTERVAL_S = 0.5


class LaunchError(RuntimeError):
    """A service did not come up, or the config asks for something this launcher cannot start."""


def _gkd(*args: object) -> list[str]:
    return [sys.executable, "-m", "gkd.cli", *map(str, args)]


@dataclass(frozen=True)
class Command:
    """One child process: its argv and what it adds to the launcher's environment."""

    name: str  # teacher | rollout | trainer
    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)

    def shell(self) -> str:
        """The command as one shell line, environment first (``gkd train --dry-run`` prints these)."""
        return shlex.join([f"{k}={v}" for k, v in self.env.items()] + self.argv)


def _vllm_options(cfg: Config, section: TeacherConfig | RolloutConfig) -> VLLMOptions:
    """A service's vLLM knobs; ``max_model_len`` null = data.max_prompt_length + data.max_response_length."""
    return VLLMOptions(
        tensor_parallel_size=section.tensor_parallel_size,
        gpu_memory_utilization=section.gpu_memory_utilization,
        max_model_len=section.max_model_len or cfg.data.max_prompt_length + cfg.data.max_response_length,
        max_num_batched_tokens=section.max_num_batched_tokens,
        enforce_eager=section.enforce_eager,
    )


def _gpu_argv(pool: Sequence[str], backend: str, opts: VLLMOptions) -> list[str]:
    """``--device cuda --gpus ...`` for a service on GPUs, plus the vLLM knobs for a vLLM engine."""
    argv = ["--device", "cuda" if pool else "cpu"] + (["--gpus", ",".join(pool)] if pool else [])
    return argv + (opts.to_argv() if backend == "vllm" else [])


def _restart_argv(section) -> list[str]:
    """The service's bound on worker restarts (``*.max_worker_restarts`` within ``*.restart_window_s``)."""
    return [
        "--max-restarts",
        str(section.max_worker_restarts),
        "--restart-window",
        repr(section.restart_window_s),
        "--restart-grace",
        repr(section.worker_restart_grace_s),
    ]


def teacher_command(cfg: Config, pool: Sequence[str] = ()) -> list[str]:
    """``gkd teacher serve`` for the config; ``pool``: the plan's teacher GPUs (all workers, in order)."""
    t = cfg.teacher
    argv = _gkd("teacher", "serve", "--model", t.model_path, "--backend", t.backend, "--workers", t.workers)
    argv += ["--dtype", teacher_dtype(cfg)]
    argv += ["--port", str(t.server_port), "--backend-port", str(t.backend_port)]
    argv += ["--top-k", str(t.top_k), "--temperature", repr(t.temperature)]
    argv += _gpu_argv(pool, t.backend, _vllm_options(cfg, t)) + _restart_argv(t)
    return argv + (["--auth-secret-file", t.auth_secret_file] if t.auth_secret_file else [])


def rollout_command(cfg: Config, pool: Sequence[str] = ()) -> list[str]:
    """``gkd rollout serve`` for the config; ``pool``: the plan's rollout GPUs (all workers, in order)."""
    r = cfg.rollout
    argv = _gkd("rollout", "serve", "--model", cfg.model.student_path, "--backend", r.backend)
    argv += ["--dtype", rollout_dtype(cfg)]  # the dtype the trainer's weights arrive in
    argv += ["--workers", str(r.workers), "--port", str(r.server_port), "--backend-port", str(r.backend_port)]
    argv += ["--weight-channel", f"127.0.0.1:{r.weight_port}", "--weight-backend", weight_backend(cfg)]
    argv += [
        "--weight-timeout",
        repr(r.weight_timeout_s),
        "--weight-idle-timeout",
        repr(r.weight_idle_timeout_s),
    ]
    argv += ["--weight-staging", r.weight_staging]
    argv += _gpu_argv(pool, r.backend, _vllm_options(cfg, r)) + _restart_argv(r)
    return argv + (["--auth-secret-file", r.auth_secret_file] if r.auth_secret_file else [])


def torchrun_command(cfg: Config, config_paths: Sequence[str], overrides: Sequence[str]) -> list[str]:
    argv = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    argv += ["--nproc-per-node", str(cfg.trainer.procs_per_node), "-m", "gkd.train"]
    for path in config_paths:
        argv += ["--config", str(path)]
    return argv + list(overrides)


def trainer_command(cfg: Config, config_paths: Sequence[str], overrides: Sequence[str]) -> list[str]:
    """:func:`torchrun_command`, or ``python -u -m gkd.train`` for one DDP process on one node (no process
    group is needed; FSDP2 needs one even alone)."""
    tr = cfg.trainer
    if tr.procs_per_node == 1 and tr.nnodes == 1 and tr.strategy == "ddp":
        argv = [sys.executable, "-u", "-m", "gkd.train"]  # -u: its output reaches the log as it comes
        for path in config_paths:
            argv += ["--config", str(path)]
        return argv + list(overrides)
    return torchrun_command(cfg, config_paths, overrides)


def commands(cfg: Config, plan: Plan, config_paths: Sequence[str], overrides: Sequence[str]) -> list[Command]:
    """Every child of the run, in start order (services, then the trainer), with its GPUs."""

    def visible(pool: Sequence[str]) -> dict[str, str]:
        return {VISIBLE_ENV: ",".join(pool)} if pool else {}

    out = []
    if cfg.teacher.launch:
        pool = Plan.pool(plan.teacher)
        out.append(Command("teacher", teacher_command(cfg, pool), visible(pool)))
    if cfg.rollout.launch:
        pool = Plan.pool(plan.rollout)
        out.append(Command("rollout", rollout_command(cfg, pool), visible(pool)))
    trainer = trainer_command(cfg, config_paths, overrides)
    out.append(Command("trainer", trainer, visible(plan.trainer)))
    return out


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
    config_paths: Sequence[str],
    overrides: Sequence[str],
    *,
    health_timeout_s: float = HEALTH_TIMEOUT_S,
    dry_run: bool = False,
    started_at: float | None = None,
    env: Mapping[str, str] | None = None,
) -> int:
    """Plan the GPUs, start the configured services and the trainer together; stop every child at the end.
    Returns the trainer's status (0 for ``dry_run``, which prints the plan and the commands and starts
    nothing). ``health_timeout_s``: how long the trainer waits for the services' workers; ``started_at``:
    ``time.time()`` when this run started (the trainer's start-up is measured from it; default now);
    ``env``: added to every child's environment (e.g. thread counts)."""
    started_at = time.time() if started_at is None else started_at
    cfg = load_config(config_paths, overrides)
    if cfg.trainer.nnodes > 1:
        raise LaunchError(
            f"trainer.nnodes={cfg.trainer.nnodes}: `gkd train` starts one node; run `scripts/launch.sh "
            "--nnodes N --node-rank R --rdzv-endpoint HOST:PORT --config ...` (torchrun with those flags, "
            "-m gkd.train) on each trainer node, services started separately (README: Multi-node)"
        )
    found = _probe_gpus(cfg)
    plan = place(cfg, found)
    cmds = commands(cfg, plan, config_paths, overrides)
    if dry_run:
        print(plan.table(), flush=True)
        for c in cmds:
            print(f"{c.name}: {c.shell()}", flush=True)
        return 0
    if found.source == FAKE_GPUS_ENV and any(c.env for c in cmds):
        raise LaunchError(
            f"{FAKE_GPUS_ENV}={found.count} only plans (the GPUs are not there): add --dry-run, or unset it"
        )
    check_launch(cfg)  # models, data, output folder, ports: one line each (a dry run plans for any machine)
    print(plan.table(), flush=True)
    log_dir = Path(cfg.trainer.output_dir) / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    children: list[_Child] = []

    def terminate(signum, _frame):  # SIGTERM: unwind like Ctrl-C so the finally stops the children
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, terminate)
    # Everything starts at once: the trainer's imports and student load overlap the services' model loads;
    # it then waits for their workers itself (a service that exits meanwhile ends the run in ``watch``).
    env = {**token_env(log_dir.parent), **(env or {})}  # the weight channel's token, for every child
    trainer_env = {**env, LAUNCH_T0_ENV: repr(started_at)}
    if len(cmds) > 1:
        trainer_env[SERVICE_WAIT_ENV] = repr(health_timeout_s)
    try:
        for c in cmds[:-1]:
            child = _start(c, log_dir, {**env, PARENT_ENV: str(os.getpid())})  # its workers watch this pid
            log.info("started the %s service (log: %s): %s", c.name, child.log_path, c.shell())
            children.append(child)
        child = _start(cmds[-1], log_dir, trainer_env, console=sys.stderr.buffer)
        log.info("started the trainer (log: %s): %s", child.log_path, cmds[-1].shell())
        children.append(child)
        return watch(children)
    except KeyboardInterrupt:
        log.warning("interrupted; stopping every child process")
        return 130
    finally:
        stop_children([c.proc for c in reversed(children)])  # the trainer first, then the services
        for c in children:
            c.close()
        signal.signal(signal.SIGTERM, previous)


def _probe_gpus(cfg: Config) -> Found:
    """This node's GPUs, looked for only when a role asks for some (or ``GKD_FAKE_GPUS`` is set):
    ``detect_gpus`` imports torch, about a second before the first child could start."""
    sections = (cfg.teacher, cfg.rollout)
    asks = cfg.trainer.n_gpus_per_node != 0 or any(s.launch and s.n_gpus_per_node != 0 for s in sections)
    return detect_gpus() if asks or FAKE_GPUS_ENV in os.environ else Found((), "unprobed")


@dataclass
class _Child:
    """A started child: its process, its log file and, for the trainer, the thread copying its output."""

    name: str  # teacher | rollout | trainer
    proc: subprocess.Popen
    log_path: Path
    pump: threading.Thread | None = None

    @property
    def what(self) -> str:
        return "the trainer (torchrun)" if self.name == "trainer" else f"the {self.name} service"

    def log_hint(self) -> str:
        last = last_error_line(self.log_path)
        return (f"; last error: {last}" if last else "") + f"; its log: {self.log_path}"

    def failure_line(self) -> str:
        """One console line: what died, its exit status, its last error line, where its log is."""
        code = self.proc.returncode
        how = ("was " if code < 0 else "exited with ") + _describe_exit(code)
        return f"gkd train: {self.what} {how}{self.log_hint()}"

    def close(self) -> None:
        if self.pump is not None:
            self.pump.join(5)


def _start(c: Command, log_dir: Path, env: dict[str, str], console: IO[bytes] | None = None) -> _Child:
    """Start ``c`` with its output in ``log_dir/<name>.log`` (and, filtered, on ``console``) and a
    parent-death signal, so it does not outlive this launcher even after a ``kill -9``."""
    path = log_dir / f"{c.name}.log"
    with open(path, "ab") as log_file:  # the child keeps its own descriptor
        proc = subprocess.Popen(
            c.argv,
            env={**os.environ, **env, **c.env},
            stdout=subprocess.PIPE if console is not None else log_file,
            stderr=subprocess.STDOUT,
            preexec_fn=set_parent_death_signal,  # noqa: PLW1509 - only a prctl call, from the main thread
        )
    child = _Child(c.name, proc, path)
    if console is not None:
        child.pump = threading.Thread(
            target=_pump, args=(proc.stdout, path, console), name=f"gkd-{c.name}-output", daemon=True
        )
        child.pump.start()
    return child


def watch(children: Sequence[_Child], interval_s: float = WATCH_INTERVAL_S) -> int:
    """Wait until the trainer (the last child) exits or any service does: 0 when the trainer finished
    cleanly, else one console line for the child that failed and its status (1 for a service). The
    caller stops the rest."""
    trainer = children[-1]
    while True:
        for child in children:
            code = child.proc.poll()
            if code is None:
                continue
            if child is trainer and code == 0:
                log.info("trainer finished")
                return 0
            if child is trainer:
                trainer.close()  # its last output reaches the log before the line that points there
            print(child.failure_line(), file=sys.stderr, flush=True)
            if child is not trainer:
                print("gkd train: stopping the trainer and the other services", file=sys.stderr, flush=True)
            return code if child is trainer else 1
        time.sleep(interval_s)


def last_error_line(path: Path, tail_bytes: int = 65536) -> str:
    """The last line of a log that names an error (a logged ERROR or an exception), shortened."""
    try:
        with open(path, "rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - tail_bytes))
            lines = f.read().decode(errors="replace").splitlines()
    except OSError:
        return ""
    for line in reversed(lines):
        text = line.strip()
        if (" ERROR " in text or "Error:" in text or "Exception:" in text) and "ChildFailedError" not in text:
            return text if len(text) <= 300 else text[:297] + "..."
    return ""


class ConsoleFilter:
    """Decides which of the trainer's output lines reach the console: everything but Python tracebacks and
    torchrun's failure report (they stay in the log; the launcher prints one line instead)."""

    _TB_CONTINUE = ("Traceback (most recent call last)", "During handling of", "The above exception")

    def __init__(self) -> None:
        self.in_traceback = False
        self.muted = False  # torchrun reports a failure: the rest is its report and its teardown

    def keep(self, line: str) -> bool:
        text = line.rstrip("\r\n")
        if self.muted:
            return False
        if (
            "torch.distributed.elastic" in text
            or "torch/distributed/elastic" in text
            or text.startswith("=====")
        ):
            self.muted = True
            return False
        if text.startswith(self._TB_CONTINUE):
            self.in_traceback = True
            return False
        if self.in_traceback:
            if not text or text[0].isspace() or text.startswith("^"):
                return False
            self.in_traceback = False  # the exception line closes the traceback
            return False
        return True


def _pump(stream: IO[bytes], log_path: Path, console: IO[bytes]) -> None:
    """Copy a child's output into its log, and the lines ``ConsoleFilter`` keeps onto the console (a
    ``\r`` ends a line too, so progress bars keep moving)."""
    keep = ConsoleFilter()
    pending = b""
    with open(log_path, "ab") as log_file:
        while chunk := os.read(stream.fileno(), 65536):
            log_file.write(chunk)
            log_file.flush()
            pending += chunk
            *lines, pending = pending.replace(b"\r", b"\r\0").replace(b"\n", b"\n\0").split(b"\0")
            out = b"".join(line for line in lines if keep.keep(line.decode(errors="replace")))
            if out:
                console.write(out)
                console.flush()
        if pending and keep.keep(pending.decode(errors="replace")):
            console.write(pending)
            console.flush()
    stream.close()


def _train(args: argparse.Namespace) -> int:
    from gkd.config import ConfigError

    configure_logging(args.log_level)
    try:
        return run(args.config, args.overrides, dry_run=args.dry_run, started_at=process_start_time())
    except (ConfigError, LaunchError, PlacementError) as e:
        print(f"gkd train: error: {e}", file=sys.stderr)
        return 2


def add_train_cli(subparsers: argparse._SubParsersAction) -> None:
    """Register ``gkd train`` (the top-level parser defines ``--log-level``)."""
    p = subparsers.add_parser("train", help="run distillation: local services (if configured) + torchrun")
    p.add_argument("--config", action="append", required=True, help="YAML config file (repeatable)")
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="print the GPU plan and every command with its environment; start nothing",
    )
    p.add_argument("overrides", nargs="*", help="key=value config overrides, e.g. trainer.total_steps=10")
    p.set_defaults(func=_train)
