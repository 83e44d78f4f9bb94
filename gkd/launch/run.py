"""``gkd train --config configs/X.yaml [key=value ...]``: one command for a whole run on one node, or
for this node's share of a run on several (``--nnodes N --node-rank R --rdzv-endpoint HOST:PORT``, or
Slurm's environment: ``gkd.launch.nodes``).

1. Load and check the config (a bad key fails here, before anything starts); plan this node's GPUs
   (``gkd.launch.placement``: disjoint device sets per role, refusals in one line) and print the plan (every
   node's, with several). ``--dry-run`` stops here after printing this node's commands with their
   environment.
2. Several nodes: meet the other nodes' ``gkd train`` (``gkd.launch.roster``: node 0 listens on the rendezvous
   endpoint; every node learns every node's address) before starting anything.
3. With ``teacher.launch`` / ``rollout.launch`` (on several nodes: on node ``*.node_rank``): start ``gkd
   teacher serve`` / ``gkd rollout serve --weight-channel <node 0>:rollout.weight_port`` as child
   processes, bound to this node's address (``--host``; 127.0.0.1 on one node). A service on GPUs gets
   ``--gpus`` (its pool; it hands each worker one tensor-parallel slice as ``CUDA_VISIBLE_DEVICES``),
   ``--device cuda``, its dtype and, for vLLM, the engine knobs of its section.
4. At the same time, start the trainer with its ``CUDA_VISIBLE_DEVICES``: the torchrun command (``python
   -m torch.distributed.run --standalone --nproc-per-node N -m gkd.trainer --config ... overrides``; on
   several nodes torchrun's static rendezvous, ``gkd.launch.multinode``), or, for one DDP process on one node,
   ``python -m gkd.trainer`` itself (torchrun's agent would only add an interpreter start and a torch
   import before it). The trainer loads the student while the services load their models, then waits
   (``GKD_SERVICE_WAIT_S``) until every configured worker has registered with its broker;
   ``GKD_LAUNCH_T0`` lets it report its start-up from this launcher's start (``gkd.services.startup``).
5. Watch every child and the other nodes: a service or the trainer exiting, or another node lost or
   failing, stops the rest, and the console gets one line per failure (what died, its exit status, its
   last error line, where its log is; or which node was lost). Each child's full output goes to
   ``trainer.output_dir/logs/<name>.log`` (``logs/node<R>/`` on several nodes); the trainer's also
   streams here, without tracebacks and torchrun's failure report (they stay in the log).
6. On exit, error, Ctrl-C or SIGTERM: tell the other nodes (done, or failed and why), stop the trainer
   first and gracefully (it saves its last trained step, within ``trainer.stop_grace_s``), then the
   services (``gkd.launch.stop``). The children get a parent-death signal (``prctl``), so
   ``kill -9`` of this launcher stops them too (and the other nodes notice its closed connection); the
   trainer's ranks watch their torchrun agent.
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

from gkd.config import Config, RolloutConfig, TeacherConfig, load_config, rollout_dtype, teacher_dtype
from gkd.data.hub import localize as localize_hub_ids
from gkd.launch.console import console_stream, last_error_line, pump
from gkd.launch.multinode import check_nodes, dry_run_hosts, node_report, trainer_node_argv, trainer_overrides
from gkd.launch.nodes import DEFAULT_RDZV_PORT, NodeError, NodeSpec, node_spec
from gkd.launch.placement import (
    FAKE_GPUS_ENV,
    Found,
    PlacementError,
    Plan,
    VLLMOptions,
    detect_gpus,
    launched_here,
    weight_backend,
)
from gkd.launch.placement import plan as place
from gkd.launch.preflight import check_launch
from gkd.launch.roster import Event, Roster, RosterError, config_digest, form_roster
from gkd.launch.stop import check_output_dir, stop_run, trainer_stop_env, why_stopped
from gkd.services.startup import LAUNCH_T0_ENV, SERVICE_WAIT_ENV, process_start_time
from gkd.services.transport.process import (
    PARENT_ENV,
    _describe_exit,
    configure_logging,
    with_parent_death_signal,
)
from gkd.weights.membership import ChannelAuthError, shared_token_env, token_env

log = logging.getLogger("gkd.launch")

HEALTH_TIMEOUT_S = 600.0
WATCH_INTERVAL_S = 0.5
NODE_GRACE_S = 3.0  # a failed trainer waits this long for word of a lost node (the likelier cause)
LOOPBACK = "127.0.0.1"


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


def teacher_command(cfg: Config, pool: Sequence[str] = (), host: str = LOOPBACK) -> list[str]:
    """``gkd teacher serve`` for the config; ``pool``: the plan's teacher GPUs (all workers, in order);
    ``host``: the address it binds."""
    t = cfg.teacher
    argv = _gkd("teacher", "serve", "--model", t.model_path, "--backend", t.backend, "--workers", t.workers)
    argv += ["--dtype", teacher_dtype(cfg), "--host", host]
    argv += ["--port", str(t.server_port), "--backend-port", str(t.backend_port)]
    argv += ["--top-k", str(t.top_k), "--temperature", repr(t.temperature)]
    argv += _gpu_argv(pool, t.backend, _vllm_options(cfg, t)) + _restart_argv(t)
    return argv + (["--auth-secret-file", t.auth_secret_file] if t.auth_secret_file else [])


def rollout_command(
    cfg: Config, pool: Sequence[str] = (), host: str = LOOPBACK, trainer_host: str = LOOPBACK
) -> list[str]:
    """``gkd rollout serve`` for the config; ``pool``: the plan's rollout GPUs (all workers, in order);
    ``host``: the address it binds; ``trainer_host``: trainer rank 0's (the weight channel's store)."""
    r = cfg.rollout
    argv = _gkd("rollout", "serve", "--model", cfg.model.student_path, "--backend", r.backend)
    argv += ["--dtype", rollout_dtype(cfg), "--host", host]  # the dtype the trainer's weights arrive in
    argv += ["--workers", str(r.workers), "--port", str(r.server_port), "--backend-port", str(r.backend_port)]
    argv += ["--weight-channel", f"{trainer_host}:{r.weight_port}", "--weight-backend", weight_backend(cfg)]
    argv += [
        "--weight-timeout",
        repr(r.weight_timeout_s),
        "--weight-idle-timeout",
        repr(r.weight_idle_timeout_s),
    ]
    argv += ["--weight-staging", r.weight_staging]
    argv += _gpu_argv(pool, r.backend, _vllm_options(cfg, r)) + _restart_argv(r)
    return argv + (["--auth-secret-file", r.auth_secret_file] if r.auth_secret_file else [])


def _train_args(config_paths: Sequence[str], overrides: Sequence[str]) -> list[str]:
    """``gkd.trainer``'s arguments: every ``--config`` file, then the overrides."""
    return [a for path in config_paths for a in ("--config", str(path))] + list(overrides)


def torchrun_command(cfg: Config, config_paths: Sequence[str], overrides: Sequence[str]) -> list[str]:
    argv = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    argv += ["--nproc-per-node", str(cfg.trainer.procs_per_node), "-m", "gkd.trainer"]
    return argv + _train_args(config_paths, overrides)


def trainer_command(
    cfg: Config,
    config_paths: Sequence[str],
    overrides: Sequence[str],
    node: NodeSpec | None = None,
    hosts: Sequence[str] = (LOOPBACK,),
) -> list[str]:
    """:func:`torchrun_command`, or ``python -u -m gkd.trainer`` for one DDP process on one node (no process
    group is needed; FSDP2 needs one even alone); on several nodes (``node``, every node's address in
    ``hosts``), torchrun with this node's static-rendezvous flags (``gkd.launch.multinode``)."""
    tr = cfg.trainer
    if node is not None and node.multi:
        argv = trainer_node_argv(cfg, node, hosts) + ["-m", "gkd.trainer"]
        return argv + _train_args(config_paths, [*overrides, *trainer_overrides(cfg, hosts)])
    if tr.procs_per_node == 1 and tr.nnodes == 1 and tr.strategy == "ddp":
        argv = [sys.executable, "-u", "-m", "gkd.trainer"]  # -u: its output reaches the log as it comes
        return argv + _train_args(config_paths, overrides)
    return torchrun_command(cfg, config_paths, overrides)


def commands(
    cfg: Config,
    plan: Plan,
    config_paths: Sequence[str],
    overrides: Sequence[str],
    node: NodeSpec | None = None,
    hosts: Sequence[str] = (LOOPBACK,),
) -> list[Command]:
    """Every child of node ``plan.node_rank`` (``node``; every node's address in ``hosts``), in start
    order (the services launched there, then the trainer), with its GPUs and thread counts."""
    here = hosts[plan.node_rank]
    out = []
    if launched_here(cfg.teacher, plan.node_rank):
        pool = Plan.pool(plan.teacher)
        out.append(Command("teacher", teacher_command(cfg, pool, here), plan.child_env("teacher", pool)))
    if launched_here(cfg.rollout, plan.node_rank):
        pool = Plan.pool(plan.rollout)
        argv = rollout_command(cfg, pool, here, hosts[0])
        out.append(Command("rollout", argv, plan.child_env("rollout", pool)))
    trainer = trainer_command(cfg, config_paths, overrides, node, hosts)
    out.append(Command("trainer", trainer, plan.child_env("trainer", plan.trainer)))
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
    node: NodeSpec | None = None,
    health_timeout_s: float = HEALTH_TIMEOUT_S,
    dry_run: bool = False,
    started_at: float | None = None,
    env: Mapping[str, str] | None = None,
) -> int:
    """Plan the GPUs, start the configured services and the trainer together; stop every child at the end.
    Returns the trainer's status (0 for ``dry_run``, which prints the plan and the commands and starts
    nothing). ``node``: this node of a multi-node run (default: the only one); ``health_timeout_s``: how
    long the trainer waits for the services' workers (and the nodes for each other); ``started_at``:
    ``time.time()`` when this run started (the trainer's start-up is measured from it; default now);
    ``env``: added to every child's environment (the plan's devices and thread counts win)."""
    started_at = time.time() if started_at is None else started_at
    cfg = load_config(config_paths, overrides)
    node = node or single_node(cfg)
    check_nodes(cfg, node.nnodes)
    digest = config_digest(cfg)  # before hub ids become this node's cache folders (which may differ by node)
    cfg, overrides = localize_hub_ids(cfg, overrides, dry_run=dry_run)  # fetched once, children get folders
    found = _probe_gpus(cfg)
    plan = place(cfg, found, node.node_rank)
    if dry_run:
        hosts = dry_run_hosts(node) if node.multi else [LOOPBACK]
        print(node_report(cfg, found, node, hosts) if node.multi else plan.table(), flush=True)
        for c in commands(cfg, plan, config_paths, overrides, node, hosts):
            print(f"{c.name}: {c.shell()}", flush=True)
        return 0
    if found.source == FAKE_GPUS_ENV and (plan.trainer or plan.rollout or plan.teacher):
        raise LaunchError(
            f"{FAKE_GPUS_ENV}={found.count} only plans (the GPUs are not there): add --dry-run, or unset it"
        )
    # models, data, output folder, ports: one line each (a dry run plans for any machine)
    check_launch(cfg, node.node_rank, node.host, torch_port=node.torch_port if node.multi else None)
    if node.node_rank == 0:  # another run's checkpoints, a resume that changes the data
        check_output_dir(cfg)
    # the weight channel's token: made by node 0 before the others can meet it, read by them after
    token = token_env(cfg.trainer.output_dir) if node.node_rank == 0 else {}
    roster = form_roster(node, digest, join_timeout_s=health_timeout_s) if node.multi else None
    try:
        token = token or shared_token_env(cfg.trainer.output_dir)
        hosts = roster.hosts if roster else [LOOPBACK]
        cmds = commands(cfg, plan, config_paths, overrides, node, hosts)
        print(node_report(cfg, found, node, hosts) if roster else plan.table(), flush=True)
        log_dir = Path(cfg.trainer.output_dir) / "logs"
        if node.multi:
            log_dir = log_dir / f"node{node.node_rank}"  # one folder per node (a shared file system)
        log_dir.mkdir(parents=True, exist_ok=True)
        env = {**token, **(env or {})}  # the weight channel's token, for every child
        trainer_env = {**env, LAUNCH_T0_ENV: repr(started_at), **trainer_stop_env(cfg.trainer.stop_grace_s)}
        if cfg.teacher.launch or cfg.rollout.launch:
            trainer_env[SERVICE_WAIT_ENV] = repr(health_timeout_s)
        return _run_children(cmds, log_dir, env, trainer_env, roster, cfg.trainer.stop_grace_s)
    finally:
        if roster is not None:
            roster.close()


def single_node(cfg: Config) -> NodeSpec:
    """The node of a one-node run: everything on loopback."""
    if cfg.trainer.nnodes > 1:
        raise LaunchError(
            f"trainer.nnodes={cfg.trainer.nnodes}: give this node's place, `gkd train --node-rank R "
            "--rdzv-endpoint NODE0:PORT` (or run under Slurm: docs/guide.md, Multi-node)"
        )
    return NodeSpec(1, 0, LOOPBACK, DEFAULT_RDZV_PORT, LOOPBACK, "config")


def _run_children(
    cmds: Sequence[Command],
    log_dir: Path,
    env: dict[str, str],
    trainer_env: dict[str, str],
    roster: Roster | None,
    stop_grace_s: float = 120.0,
) -> int:
    """Start ``cmds`` (services, then the trainer), watch them (and the other nodes), stop them all (the
    trainer first, given ``stop_grace_s`` to save its last step: ``gkd.launch.stop``)."""
    children: list[_Child] = []

    def terminate(signum, _frame):  # SIGTERM: unwind like Ctrl-C so the finally stops the children
        raise KeyboardInterrupt

    main = threading.current_thread() is threading.main_thread()  # gkd.distill may run in another thread
    previous = signal.signal(signal.SIGTERM, terminate) if main else None
    # Everything starts at once: the trainer's imports and student load overlap the services' model loads;
    # it then waits for their workers itself (a service that exits meanwhile ends the run in ``watch``).
    status = 1
    try:
        for c in cmds[:-1]:
            child = _start(c, log_dir, {**env, PARENT_ENV: str(os.getpid())})  # its workers watch this pid
            log.info("started the %s service (log: %s): %s", c.name, child.log_path, c.shell())
            children.append(child)
        child = _start(cmds[-1], log_dir, trainer_env, console=console_stream())
        log.info("started the trainer (log: %s): %s", child.log_path, cmds[-1].shell())
        children.append(child)
        status = watch(children, roster=roster)
        return status
    except KeyboardInterrupt:
        log.warning("interrupted; stopping every child process")
        status = 130
        return status
    finally:
        if roster is not None:
            roster.announce("done" if status == 0 else "failed", why_stopped(children, status))
        trainer = [c.proc for c in children if c.name == "trainer"]
        services = [c.proc for c in children if c.name != "trainer"]
        stop_run(services, trainer[0] if trainer else None, stop_grace_s)  # the trainer first
        for c in children:
            c.close()
        if main:
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
            with_parent_death_signal(c.argv),  # the same pid, running c.argv once the signal is set
            env={**os.environ, **env, **c.env},
            stdout=subprocess.PIPE if console is not None else log_file,
            stderr=subprocess.STDOUT,
        )
    child = _Child(c.name, proc, path)
    if console is not None:
        child.pump = threading.Thread(
            target=pump, args=(proc.stdout, path, console), name=f"gkd-{c.name}-output", daemon=True
        )
        child.pump.start()
    return child


def watch(
    children: Sequence[_Child], interval_s: float = WATCH_INTERVAL_S, roster: Roster | None = None
) -> int:
    """Wait until the trainer (the last child) exits, any service does, or (``roster``) another node is
    lost or fails: 0 when the trainer finished cleanly, else one console line for what failed and its
    status (1 for a service or another node). The caller stops the rest."""
    trainer = children[-1]
    while True:
        event = _node_event(roster)
        if event is not None:
            print(_node_line(roster, event), file=sys.stderr, flush=True)
            return 1
        for child in children:
            code = child.proc.poll()
            if code is None:
                continue
            if child is trainer and code == 0:
                log.info("trainer finished")
                return 0
            if child is trainer:
                trainer.close()  # its last output reaches the log before the line that points there
                # a lost node makes the ranks here fail too: name the node (the cause) when it is one
                event = _node_event(roster, NODE_GRACE_S)
                if event is not None:
                    print(_node_line(roster, event), file=sys.stderr, flush=True)
                    return 1
            print(child.failure_line(), file=sys.stderr, flush=True)
            if child is not trainer:
                print("gkd train: stopping the trainer and the other services", file=sys.stderr, flush=True)
            return code if child is trainer else 1
        time.sleep(interval_s)


def _node_event(roster: Roster | None, wait_s: float = 0.0) -> Event | None:
    """The next loss or failure of another node (``done`` events are skipped), waiting up to ``wait_s``."""
    deadline = time.monotonic() + wait_s
    while roster is not None:
        event = roster.next_event(max(0.0, deadline - time.monotonic()))
        if event is None or event.kind != "done":
            return event
    return None


def _node_line(roster: Roster, event: Event) -> str:
    what = roster.describe(event.node)
    if event.kind == "lost":
        return f"gkd train: lost {what}: {event.why}; stopping this node"
    return f"gkd train: {what} stopped ({event.why}); stopping this node"


def _train(args: argparse.Namespace) -> int:
    from gkd.config import ConfigError

    configure_logging(args.log_level)
    try:
        cfg = load_config(args.config, args.overrides)
        node = node_spec(
            nnodes=args.nnodes,
            node_rank=args.node_rank,
            rdzv_endpoint=args.rdzv_endpoint,
            host=args.host,
            config_nnodes=cfg.trainer.nnodes,
            env=os.environ,
        )
        return run(
            args.config, args.overrides, node=node, dry_run=args.dry_run, started_at=process_start_time()
        )
    except (ConfigError, LaunchError, PlacementError, NodeError, RosterError, ChannelAuthError) as e:
        print(f"gkd train: error: {e}", file=sys.stderr)
        return 2


def add_train_cli(subparsers: argparse._SubParsersAction) -> None:
    """Register ``gkd train`` (the top-level parser defines ``--log-level``)."""
    p = subparsers.add_parser("train", help="run distillation: local services (if configured) + torchrun")
    p.add_argument("--config", action="append", required=True, help="YAML config file (repeatable)")
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="print the GPU plan (every node's) and this node's commands with their environment; "
        "start nothing",
    )
    g = p.add_argument_group(
        "several nodes (default: Slurm's SLURM_NNODES, SLURM_NODEID, SLURM_JOB_NODELIST)"
    )
    g.add_argument("--nnodes", type=int, default=None, help="nodes in the run (default: trainer.nnodes)")
    g.add_argument(
        "--node-rank", type=int, default=None, help="this node, 0..N-1 (node 0 hosts trainer rank 0)"
    )
    g.add_argument(
        "--rdzv-endpoint",
        default=None,
        metavar="HOST:PORT",
        help=f"node 0's address and a free port, the same on every node (torchrun's store uses PORT+1; "
        f"under Slurm default: the job's first host:{DEFAULT_RDZV_PORT})",
    )
    g.add_argument(
        "--host",
        default=None,
        help="address this node's services bind and the other nodes reach (default: 127.0.0.1 on one node; "
        "on several, this machine's address toward the rendezvous host)",
    )
    p.add_argument("overrides", nargs="*", help="key=value config overrides, e.g. trainer.total_steps=10")
    p.set_defaults(func=_train)
