"""How ``gkd train`` stops a run (``gkd.launch.stop``): when a service dies, the trainer is stopped first
and gracefully (SIGTERM, then up to ``trainer.stop_grace_s`` to save its last step), the services last;
a trainer that ignores SIGTERM is killed once the grace is over. The children are small Python
programs that record when each got SIGTERM and when the trainer finished its "checkpoint"."""

from __future__ import annotations

import sys
import time
from pathlib import Path

from gkd.launch.run import Command, _run_children

# a child that records (in FILE) the time it got SIGTERM; as a trainer it then "saves" for SAVE_S seconds
_CHILD = """
import signal, sys, time
path, save_s, exit_after = sys.argv[1], float(sys.argv[2]), float(sys.argv[3])
def stop(signum, frame):
    with open(path, "a") as f:
        f.write(f"sigterm {time.time()}\\n")
    if save_s < 0:
        return  # ignores it
    time.sleep(save_s)
    with open(path, "a") as f:
        f.write(f"saved {time.time()}\\n")
    sys.exit(128 + signum)
signal.signal(signal.SIGTERM, stop)
t0 = time.time()
while exit_after <= 0 or time.time() - t0 < exit_after:
    time.sleep(0.05)
sys.exit(3)
"""


def _command(name: str, record: Path, save_s: float = 0.0, exit_after: float = 0.0) -> Command:
    return Command(name, [sys.executable, "-c", _CHILD, str(record), str(save_s), str(exit_after)])


def _events(path: Path) -> dict[str, float]:
    return {k: float(v) for k, v in (line.split() for line in path.read_text().splitlines())}


def test_a_dying_service_stops_the_trainer_first_and_waits_for_its_checkpoint(tmp_path):
    rec = {name: tmp_path / f"{name}.events" for name in ("teacher", "rollout", "trainer")}
    cmds = [
        _command("teacher", rec["teacher"]),
        _command("rollout", rec["rollout"], exit_after=3.0),  # dies by itself: exit status 3
        _command("trainer", rec["trainer"], save_s=2.0),  # needs 2 s to write its checkpoint
    ]
    assert _run_children(cmds, tmp_path, {}, {}, None, stop_grace_s=30.0) == 1
    trainer, teacher = _events(rec["trainer"]), _events(rec["teacher"])
    assert not rec["rollout"].exists()  # it had died: no signal
    assert trainer["saved"] - trainer["sigterm"] >= 2.0  # not killed while saving
    assert teacher["sigterm"] >= trainer["saved"]  # the services only after the trainer's checkpoint


def test_a_trainer_that_ignores_sigterm_is_killed_after_the_grace(tmp_path):
    rec = {name: tmp_path / f"{name}.events" for name in ("teacher", "trainer")}
    cmds = [
        _command("teacher", rec["teacher"], exit_after=2.0),
        _command("trainer", rec["trainer"], save_s=-1),  # never stops by itself
    ]
    t0 = time.monotonic()
    assert _run_children(cmds, tmp_path, {}, {}, None, stop_grace_s=2.0) == 1
    assert time.monotonic() - t0 < 30
    trainer = _events(rec["trainer"])
    assert "sigterm" in trainer and "saved" not in trainer
