"""The trainer's end of a step (``Trainer.finish_step``) and its stop signals, with fakes around a bare
:class:`gkd.trainer.recipe.Trainer`: after the last step the checkpoint and the export come before the final
evaluation, and a failed evaluation is logged, never fatal; the peak-TFLOP/s measurement leaves the
restored RNG streams alone; a stop signal before training ends the rank with 128 + signum."""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from gkd.config import load_config
from gkd.trainer.recipe import Trainer
from gkd.trainer.scheduler import SchedulerState, Step
from gkd.trainer.stop import StopBeforeTraining, StopRequest

TOTAL = 4
ROOT = Path(__file__).resolve().parents[1]


class FakeEvaluations:
    def __init__(self, events: list, fail_at: set[int]):
        self.events, self.fail_at, self.pending = events, fail_at, None

    def for_record(self, done, version):
        self.events.append(("evaluate", done))
        if done in self.fail_at:
            raise TimeoutError("validation request timed out")
        return {"val/kl": 0.5}


def _trainer(events: list, fail_at=()) -> Trainer:
    t = Trainer.__new__(Trainer)
    t.cfg = load_config(
        [str(ROOT / "configs" / "cpu_tiny.yaml")], ["trainer.save_freq=2", f"trainer.total_steps={TOTAL}"]
    )
    t.total, t.device, t.startup, t.commands = TOTAL, torch.device("cpu"), None, None
    t.saver = SimpleNamespace(poll=lambda: None)
    t.spans = SimpleNamespace(add=lambda *a, **k: None)
    t.logger = SimpleNamespace(log=lambda b, m: events.append(("log", b, "val/kl" in m)))
    t.evaluations = FakeEvaluations(events, set(fail_at))
    t.scheduler = SimpleNamespace(in_flight=lambda: ["carried"])
    t.save = lambda done, state, carried: events.append(("save", done, list(carried)))
    t.export = lambda: events.append(("export",))
    return t


def _step(b: int) -> Step:
    return Step(b, SchedulerState(b + 1, b + 1), {"timing/step": 1.0, "actor/total_tokens": 8}, [])


def test_the_final_checkpoint_and_export_come_before_the_final_evaluation():
    events: list = []
    t = _trainer(events)
    for b in range(TOTAL):
        t.finish_step(_step(b))
    assert events == [
        ("evaluate", 1), ("log", 0, True),
        ("evaluate", 2), ("log", 1, True), ("save", 2, ["carried"]),  # a periodic save carries in-flight
        ("evaluate", 3), ("log", 2, True),
        ("save", 4, []), ("export",), ("evaluate", 4), ("log", 3, True),  # nothing is in flight at the end
    ]  # fmt: skip


def test_a_failed_evaluation_is_logged_and_training_goes_on(caplog):
    events: list = []
    t = _trainer(events, fail_at={2, 4})
    with caplog.at_level(logging.ERROR, logger="gkd.trainer"):
        for b in range(TOTAL):
            t.finish_step(_step(b))
    assert ("log", 1, False) in events and ("log", 3, False) in events  # the records, without val/*
    assert ("export",) in events
    errors = [r.getMessage() for r in caplog.records]
    assert len(errors) == 2 and "the evaluation after step 4 failed (TimeoutError" in errors[1]


def test_a_measured_peak_leaves_the_restored_rng_streams_alone():
    from gkd.metrics.records import resolve_peak_tflops

    torch.manual_seed(1)
    before = torch.get_rng_state()
    resolve_peak_tflops(torch.device("cpu"), torch.float32, None)  # measures a GEMM on the CPU
    assert torch.equal(torch.get_rng_state(), before)


def _signal_self(signum: int) -> None:
    """Send this process ``signum``; its Python handler runs at the next bytecode of the main thread."""
    os.kill(os.getpid(), signum)
    time.sleep(0.05)


def test_a_stop_signal_before_training_interrupts_and_later_ones_call_back():
    stop = StopRequest()
    stop.install()
    try:
        with pytest.raises(StopBeforeTraining, match="SIGTERM received before training started"):
            _signal_self(signal.SIGTERM)
        assert stop.exit_status == 143
    finally:
        stop.uninstall()
    called = threading.Event()
    stop = StopRequest()
    stop.training, stop.on_stop = True, lambda why: called.set() if why == "SIGINT received" else None
    stop.install()
    try:
        _signal_self(signal.SIGINT)
        assert called.wait(10) and stop.exit_status == 130  # on its own thread, with the signal's name
        with pytest.raises(KeyboardInterrupt):  # a second signal: no more patience
            _signal_self(signal.SIGINT)
    finally:
        stop.uninstall()


def test_commands_travel_through_the_store_in_order_and_a_stop_request_reaches_rank_0():
    import torch.distributed as dist

    from gkd.trainer.ranks import OP_SAVE, OP_STOP, OP_TRAIN, Commands

    store = dist.TCPStore("127.0.0.1", 0, 1, True, timeout=__import__("datetime").timedelta(seconds=10))
    rank0, other = Commands(store), Commands(store)
    got: list = []

    def follow() -> None:
        while not got or got[-1][0] != OP_STOP:
            got.append(other.receive())

    reader = threading.Thread(target=follow)
    reader.start()
    time.sleep(0.3)  # the other rank polls: a wait between commands is no collective and has no timeout
    for n, (op, step) in enumerate(((OP_TRAIN, 0), (OP_TRAIN, 1), (OP_SAVE, 2), (OP_STOP, 0))):
        rank0.send(op, step)
        deadline = time.monotonic() + 10
        while len(got) <= n and time.monotonic() < deadline:  # in the trainer: the command's collective
            time.sleep(0.01)
    reader.join(10)
    assert got == [(OP_TRAIN, 0), (OP_TRAIN, 1), (OP_SAVE, 2), (OP_STOP, 0)]
    assert not store.check(["gkd/cmd/0"]) and store.check(["gkd/cmd/3"])  # read ones are deleted
    assert not rank0.stop_asked()
    other.ask_stop()
    assert rank0.stop_asked()


@pytest.mark.parametrize("key", ["trainer.stop_grace_s", "trainer.collective_timeout_s"])
def test_stop_grace_and_collective_timeout_must_be_positive(key):
    from gkd.config import ConfigError

    with pytest.raises(ConfigError, match=f"{key}=0.0: must be a positive number of seconds"):
        load_config([str(ROOT / "configs" / "cpu_tiny.yaml")], [f"{key}=0"])


def test_a_stop_asked_by_another_rank_stops_rank_0s_scheduler():
    events: list = []
    t = _trainer(events)
    asked: list = []
    t.stop = StopRequest()
    t.commands = SimpleNamespace(stop_asked=lambda: True, send=lambda *a: None)
    t.scheduler = SimpleNamespace(in_flight=lambda: [], stop=asked.append)
    t.finish_step(_step(0))
    assert asked == ["a stop signal on another trainer rank"] and t.stop.exit_status == 143
