"""How ``gkd train`` ends a run it started: the output folder checked before anything starts (another
run's checkpoints, a resume that changes the data: one line, exit 2), and the children stopped in order.

Stopping (the run is over, a service died, another node failed, Ctrl-C or SIGTERM to ``gkd train``): the
trainer first, *gracefully*: SIGTERM, then up to ``trainer.stop_grace_s`` for it to save the last trained
step and exit (``gkd.trainer.stop``; torchrun passes the signal on to its ranks and waits as long:
``TORCH_ELASTIC_SHUTDOWN_TIMEOUT``), SIGKILL after that; the services last (the trainer may still be
waiting on them while it finishes its step), each SIGTERM then SIGKILL after a short grace.
"""

from __future__ import annotations

import logging
import math
import signal
import subprocess
from collections.abc import Sequence

from gkd.services.transport.process import _describe_exit, stop_children

log = logging.getLogger("gkd.launch")

__all__ = ["SHUTDOWN_TIMEOUT_ENV", "check_output_dir", "stop_run", "trainer_stop_env", "why_stopped"]

SHUTDOWN_TIMEOUT_ENV = "TORCH_ELASTIC_SHUTDOWN_TIMEOUT"  # torchrun's wait for its ranks after a signal


def check_output_dir(cfg) -> None:
    """Node 0, before anything starts: the checks trainer rank 0 makes on the output folder
    (``gkd.trainer.checkpoint.runs.check_resume``), raised as the launcher's one-line errors."""
    from gkd.launch.run import LaunchError
    from gkd.trainer.checkpoint.folders import CheckpointError
    from gkd.trainer.checkpoint.runs import check_resume

    try:
        warning = check_resume(cfg)
    except CheckpointError as e:
        raise LaunchError(str(e)) from None
    if warning:
        log.warning("%s", warning)


def trainer_stop_env(stop_grace_s: float) -> dict[str, str]:
    """The trainer's environment for a graceful stop: torchrun waits for its ranks as long as we do."""
    return {SHUTDOWN_TIMEOUT_ENV: str(max(1, math.ceil(stop_grace_s)))}


def stop_run(
    services: Sequence[subprocess.Popen], trainer: subprocess.Popen | None, stop_grace_s: float
) -> None:
    """Stop a run's children, the trainer first: SIGTERM, up to ``stop_grace_s`` for its checkpoint,
    SIGKILL; then the services, the last started first (:func:`stop_children`)."""
    if trainer is not None and trainer.poll() is None:
        log.info("stopping the trainer: it saves its last trained step (waiting up to %.0fs)", stop_grace_s)
        trainer.send_signal(signal.SIGTERM)
        try:
            trainer.wait(stop_grace_s)
        except subprocess.TimeoutExpired:
            log.warning(
                "the trainer did not stop within trainer.stop_grace_s=%gs; killing it (its last "
                "checkpoint may be older than its last step)", stop_grace_s,
            )  # fmt: skip
            trainer.kill()
            trainer.wait()
    stop_children(list(reversed(services)))


def why_stopped(children: Sequence, status: int) -> str:
    """Why this node stops, for the other nodes: the first child that failed, or an interruption."""
    for c in children:
        code = c.proc.poll()
        if code is not None and (code != 0 or c.name != "trainer"):
            return f"{c.what} {'was ' if code < 0 else 'exited with '}{_describe_exit(code)}"
    return "it was interrupted" if status == 130 else "it stopped after another node's loss or failure"
