"""SIGTERM / SIGINT on a trainer rank (preemption, Ctrl-C, ``gkd train`` stopping the run): keep the last
trained step, then exit non-zero.

- Before training starts (loading, waiting for the services): nothing to keep; the signal interrupts
  whatever waits (:class:`StopBeforeTraining`).
- While the scheduler runs (rank 0): the update in progress finishes, the next wait ends the run
  (:meth:`gkd.trainer.scheduler.Scheduler.stop`), and the failure path writes the checkpoint of the last
  trained step, with the answers already generated for the next batches (exact resume), after waiting for a
  pending background save.
- Another rank: the signal is passed to rank 0 through the store (:meth:`gkd.trainer.ranks.Commands.
  ask_stop`), which stops as above and then tells every rank to stop; until then the rank obeys.
- After the last step (checkpoint, export): the run finishes.
- A second signal ends the process at once (``KeyboardInterrupt``).

The exit status is ``128 + signal number`` (143 for SIGTERM, 130 for SIGINT), as a shell reports it.
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Callable

log = logging.getLogger("gkd.trainer")

__all__ = ["StopBeforeTraining", "StopRequest"]

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopBeforeTraining(Exception):  # noqa: N818 - not an error: a requested stop
    """A stop signal arrived before the first step: nothing to save."""

    def __init__(self, signum: int):
        super().__init__(f"{signal.Signals(signum).name} received before training started")
        self.signum = signum


class StopRequest:
    """This rank's stop signals. ``on_stop(why)`` (set once the loop runs) is called on a new thread, so
    the handler itself never takes a lock the interrupted code may hold."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self.on_stop: Callable[[str], None] | None = None
        self.training = False  # True once rank 0's loop runs, or for a follower (it keeps obeying)
        self._previous: dict[int, object] = {}

    def install(self) -> None:
        """Handle SIGTERM and SIGINT (main thread only; elsewhere, e.g. in tests, nothing happens)."""
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    @property
    def requested(self) -> bool:
        return self.signum is not None

    @property
    def exit_status(self) -> int:
        return 128 + int(self.signum or signal.SIGTERM)

    @property
    def why(self) -> str:
        return f"{signal.Signals(self.signum or signal.SIGTERM).name} received"

    def _handle(self, signum: int, _frame) -> None:
        if self.signum is not None:  # the second one: no more patience
            raise KeyboardInterrupt
        self.signum = signum
        if not self.training:
            raise StopBeforeTraining(signum)
        log.warning("%s: finishing the current step, then saving a checkpoint and stopping", self.why)
        self.fire()

    def fire(self) -> None:
        """Call ``on_stop`` (if set) on its own thread."""
        if self.on_stop is not None:
            threading.Thread(target=self.on_stop, args=(self.why,), name="gkd-stop", daemon=True).start()
