"""Process plumbing shared by the services: signals, supervised worker processes, orphan detection.

A supervisor (``gkd teacher serve`` / ``gkd rollout serve``) starts its workers as child processes and
passes its pid in ``GKD_PARENT_PID``; a child whose parent is gone exits by itself, so a SIGKILLed
supervisor does not leave engines holding memory. ``gkd train`` starts its children with a parent-death
signal (``with_parent_death_signal``: an exec wrapper, no Python in the forked copy) and the trainer's
ranks watch their torchrun agent (``exit_with_parent``), so ``kill -9`` of the launcher leaves nothing
running.
"""

from __future__ import annotations

import contextlib
import faulthandler
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable

from gkd.services.transport.auth import Auth

log = logging.getLogger("gkd.service")

PARENT_ENV = "GKD_PARENT_PID"
STOP_GRACE_S = 10.0


def stop_on_signals() -> threading.Event:
    """An event set by SIGINT/SIGTERM (installed in the main thread)."""
    stop = threading.Event()

    def handle(signum, _frame):
        log.info("received %s, shutting down", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGINT, handle)
    signal.signal(signal.SIGTERM, handle)
    return stop


def orphaned() -> bool:
    parent = os.environ.get(PARENT_ENV)
    return parent is not None and os.getppid() != int(parent)


_PR_SET_PDEATHSIG = 1


def _find_prctl() -> Callable[..., int] | None:
    """libc's ``prctl``, looked up once at import, in the parent: a child forked from a process with
    threads runs ``preexec_fn`` before exec, where loading a library (``dlopen``) may find the loader's
    lock held by a thread that did not survive the fork and crash or hang."""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    try:
        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None


_PRCTL = _find_prctl()


def set_parent_death_signal(sig: int = signal.SIGTERM) -> bool:
    """Ask the kernel to send ``sig`` to this process when the thread that started it exits (Linux
    ``prctl(PR_SET_PDEATHSIG)``, kept across exec). Safe as a ``Popen(preexec_fn=...)``: it only calls
    the function looked up at import; returns False where there is no prctl."""
    if _PRCTL is None:
        return False
    return _PRCTL(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0) == 0


#: Run by a fresh interpreter between fork and the child's own program: set the parent-death signal,
#: give up if the parent is already gone, then exec the real command (the signal survives exec).
_PDEATH_EXEC = (
    "import ctypes, os, sys\n"
    f"ctypes.CDLL(None, use_errno=True).prctl({_PR_SET_PDEATHSIG}, int(sys.argv[1]), 0, 0, 0)\n"
    "if os.getppid() != int(sys.argv[2]):\n"
    "    sys.exit(1)\n"
    "os.execvp(sys.argv[3], sys.argv[3:])\n"
)


def with_parent_death_signal(argv: list[str], sig: int = signal.SIGTERM) -> list[str]:
    """``argv`` behind a small exec wrapper that asks for ``sig`` when this process's starting thread
    exits (Linux ``PR_SET_PDEATHSIG``). Unlike ``Popen(preexec_fn=...)``, no Python runs in the forked
    copy of a process with threads (at-fork handlers there have crashed children); the wrapper is a new
    interpreter (``-I``: no site packages, no environment variables read) that execs ``argv`` in place,
    so the child keeps its pid. Elsewhere than Linux ``argv`` is returned unchanged."""
    if _PRCTL is None:
        return list(argv)
    return [sys.executable, "-I", "-c", _PDEATH_EXEC, str(int(sig)), str(os.getpid()), *argv]


def exit_with_parent(poll_s: float = 0.5) -> None:
    """Exit when the parent process goes (a SIGKILLed torchrun agent must not leave its ranks running):
    a daemon thread watches the parent pid, sends this process SIGTERM when it changes, and ends it
    outright ``STOP_GRACE_S`` later if that did not. A watch rather than ``PR_SET_PDEATHSIG``, which fires
    when the parent *thread* that spawned us exits, and a process may be spawned from any thread."""
    parent = os.getppid()
    if parent == 1:  # already orphaned before the watch began
        log.error("parent process is gone; exiting")
        raise SystemExit(1)

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(poll_s)
        log.error("parent process %d is gone; exiting", parent)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(STOP_GRACE_S)
        os._exit(1)

    threading.Thread(target=watch, name="gkd-parent-watch", daemon=True).start()


def _describe_exit(code: int) -> str:
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"status {code}"


def supervise(
    children: list[subprocess.Popen],
    stop: threading.Event,
    respawn: Callable[[int], subprocess.Popen] | None = None,
    *,
    max_restarts: int = 5,
    window_s: float = 600.0,
    on_restart: Callable[[], None] | None = None,
) -> int:
    """Wait for a stop signal (-> 0); restart a child that exits with ``respawn(slot)``, at most
    ``max_restarts`` times within ``window_s`` seconds over all slots; past that (or without ``respawn``,
    once every child has exited) the service is unhealthy (-> 1, with the reason). Then stop the rest.
    ``on_restart()`` is called right after each restart (the broker then holds requests for it)."""
    restarts: list[float] = []  # when each restart happened (monotonic)
    reported: set[int] = set()
    children = list(children)
    try:
        while not stop.wait(0.5):
            for slot, child in enumerate(children):
                if child.poll() is None or child.pid in reported:
                    continue
                reported.add(child.pid)
                how = _describe_exit(child.returncode)
                if respawn is None:
                    log.error("worker process %d exited (%s)", child.pid, how)
                    continue
                now = time.monotonic()
                restarts = [t for t in restarts if now - t < window_s]
                if len(restarts) >= max_restarts:
                    log.error(
                        "unhealthy: worker %d (process %d) exited (%s) after %d restarts within %.0f s; "
                        "stopping the service (raise --max-restarts or fix the cause in the worker's log)",
                        slot,
                        child.pid,
                        how,
                        len(restarts),
                        window_s,
                    )
                    return 1
                restarts.append(now)
                children[slot] = respawn(slot)
                if on_restart is not None:
                    on_restart()
                log.warning(
                    "worker %d (process %d) exited (%s); restarted as process %d (restart %d of %d within "
                    "%.0f s)",
                    slot,
                    child.pid,
                    how,
                    children[slot].pid,
                    len(restarts),
                    max_restarts,
                    window_s,
                )
            if respawn is None and len(reported) == len(children):
                log.error("all worker processes have exited")
                return 1
            if orphaned():
                log.error("supervisor is gone; exiting")
                return 1
        return 0
    finally:
        stop_children(children)


def stop_children(children: list[subprocess.Popen]) -> None:
    for child in children:
        if child.poll() is None:
            child.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + STOP_GRACE_S
    for child in children:
        try:
            child.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            log.warning("worker process %d ignored SIGTERM for %.0fs; killing it", child.pid, STOP_GRACE_S)
            child.kill()
            child.wait()


def auth_from_file(auth_secret_file: str | None) -> Auth | None:
    return Auth.from_file(auth_secret_file) if auth_secret_file else None


def run_until_stopped(worker, stop: threading.Event, poll_s: float = 0.5) -> int:
    """Run a started-to-be transport worker until ``stop`` is set (-> 0), the supervisor is gone or the
    worker's ``failure()`` names a reason (-> 1: its supervisor restarts it)."""
    worker.start()
    try:
        while not stop.wait(poll_s):
            if orphaned():
                log.error("worker %d: supervisor is gone; exiting", os.getpid())
                return 1
            why = worker.failure() if hasattr(worker, "failure") else None
            if why:
                log.error(
                    "worker %d: cannot serve any longer (%s); exiting to be restarted", os.getpid(), why
                )
                return 1
        return 0
    finally:
        worker.stop()


def serve_broker(
    name: str,
    broker,
    workers: int,
    spawn: Callable[[str, int], subprocess.Popen],
    stop: threading.Event,
    *,
    what: str,
    detail: str,
    svc_log: logging.Logger,
    max_restarts: int = 5,
    restart_window_s: float = 600.0,
) -> int:
    """Start ``broker``, spawn ``workers`` children with ``spawn(backend_address, i)`` and supervise them
    until ``stop``, restarting a child that exits (:func:`supervise`'s bound); the broker stops last.
    ``detail`` goes in the "broker up" line, e.g. ``auth on``."""
    broker.start()
    # Children reach the backend on loopback even when it is bound to 0.0.0.0.
    backend_local = "tcp://127.0.0.1:" + broker.backend_address.rsplit(":", 1)[1]
    svc_log.info(
        "%s broker up: clients %s, workers %s (%s); starting %d %s",
        name,
        broker.frontend_address,
        broker.backend_address,
        detail,
        workers,
        what,
    )
    children = [spawn(backend_local, i) for i in range(workers)]
    broker.note_restart()  # requests wait for the first load as for a reload
    try:
        return supervise(
            children,
            stop,
            lambda i: spawn(backend_local, i),
            max_restarts=max_restarts,
            window_s=restart_window_s,
            on_restart=broker.note_restart,
        )
    finally:
        broker.stop()
        svc_log.info("%s service stopped", name)


def dump_stacks_on_sigusr1() -> None:
    """``kill -USR1 <pid>`` writes every thread's stack to stderr (the process's log): what a stalled
    process waits for, without stopping it."""
    if not hasattr(signal, "SIGUSR1"):
        return
    # stderr without a file descriptor (captured, embedded): no dumps, nothing else changes
    with contextlib.suppress(AttributeError, ValueError, OSError):
        faulthandler.register(signal.SIGUSR1, all_threads=True)


def add_restart_args(p) -> None:
    """``--max-restarts`` / ``--restart-window`` of ``gkd teacher serve`` and ``gkd rollout serve``
    (:func:`supervise`'s bound; ``teacher.*`` / ``rollout.max_worker_restarts``, ``restart_window_s``) and
    ``--restart-grace`` (the broker's ``worker_restart_grace_s``; ``*.worker_restart_grace_s``)."""
    p.add_argument(
        "--max-restarts",
        type=int,
        default=5,
        help="worker restarts allowed within --restart-window (default 5)",
    )
    p.add_argument("--restart-window", type=float, default=600.0, help="seconds (default 600)")
    p.add_argument(
        "--restart-grace",
        type=float,
        default=600.0,
        help="seconds requests wait at the broker for a restarting worker when none is up (a large engine "
        "reloads for minutes; default 600; otherwise they fail after 30 s without workers)",
    )


def configure_logging(level: str = "INFO") -> None:
    dump_stacks_on_sigusr1()
    logging.basicConfig(
        level=level, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s[%(process)d] %(message)s"
    )
