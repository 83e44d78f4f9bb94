"""Chaos, bad numbers: ``gkd train`` (tiny models, ``one_step_off``, one teacher worker, checkpoints every 2
steps) runs a few healthy steps; then the teacher's weights on disk turn NaN (its final norm weight) and
the test SIGKILLs the teacher worker. The service restarts it, the new worker loads the broken weights and
refuses every score (an error reply naming itself rather than NaN log-probs), and the run must stop with
one line naming that worker: exit non-zero, no ``final/``, every checkpoint it kept with finite weights,
and no step trained after the breakage.

``pytest -s tests/test_chaos_values.py`` prints the timeline: when the worker was killed, when its
replacement was listed, when the run stopped, and the line it stopped with.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from gkd.trainer.checkpoint import list_checkpoints, read_meta
from tests.test_chaos import _records, _steps_done, _wait, _workers
from tests.test_chaos import _start as start_chaos_run
from tests.test_train_values import nan_norm_copy
from tests.tiny_run import tiny_fixture

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
STEPS, BREAK_AT = 40, 5
RUN_TIMEOUT_S = 240

tiny = tiny_fixture()


def _start(tiny: dict[str, str], teacher: Path, out: Path) -> tuple[subprocess.Popen, dict[str, int]]:
    """The chaos run (``tests.test_chaos._start``) with one worker per service, the given teacher folder
    and checkpoints every 2 steps written in the foreground."""
    return start_chaos_run(
        {**tiny, "teacher": str(teacher)},
        out,
        "teacher.workers=1",
        "rollout.workers=1",
        f"trainer.total_steps={STEPS}",
        "trainer.save_freq=2",
        "trainer.keep_last=2",
        "trainer.async_save=false",
        env=ENV,
    )


@pytest.mark.slow
def test_a_teacher_that_turns_nan_stops_the_run_naming_it(tiny, tmp_path):
    teacher = tmp_path / "teacher"
    shutil.copytree(tiny["teacher"], teacher)  # healthy at first
    broken = nan_norm_copy(tiny["teacher"], tmp_path / "broken") / "model.safetensors"
    out = tmp_path / "run"
    proc, ports = _start(tiny, teacher, out)
    start, timeline = time.monotonic(), {}
    try:
        victim = _wait(lambda: _workers(ports["teacher_backend"]), 120, "the teacher worker", proc)[0]
        _wait(lambda: _steps_done(out) >= BREAK_AT, 150, f"step {BREAK_AT}", proc)
        os.replace(broken, teacher / "model.safetensors")  # atomic (one file system): NaN weights
        timeline["killed_at_s"], timeline["at_step"] = round(time.monotonic() - start, 1), _steps_done(out)
        os.kill(victim, signal.SIGKILL)
        replacement = _wait(
            lambda: [p for p in _workers(ports["teacher_backend"]) if p != victim], 60, "a restart", proc
        )[0]
        timeline["replacement"] = replacement
        timeline["restarted_after_s"] = round(time.monotonic() - start - timeline["killed_at_s"], 1)
        code = proc.wait(RUN_TIMEOUT_S)
        timeline["stopped_at_s"] = round(time.monotonic() - start, 1)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        proc.log.close()
    text = (out.parent / f"{out.name}.log").read_text()
    assert code != 0, text[-8000:]
    lines = [line for line in text.splitlines() if "PhaseFailed: score of batch" in line]
    assert lines, text[-8000:]
    line = lines[0]
    assert f"teacher worker {socket.gethostname()} pid {replacement} refuses to send its reply" in line, line
    assert not (out / "final").exists()
    steps = [r["step"] for r in _records(out)]
    timeline["steps_trained"] = len(steps)
    assert steps == list(range(len(steps))) and timeline["at_step"] <= len(steps) < STEPS
    assert len(steps) <= timeline["at_step"] + 3  # at most the batches scored around the kill (k = 1)
    kept = list_checkpoints(out)
    assert kept and all(read_meta(path)["weights_finite"] for _, path in kept), kept
    timeline["checkpoints"] = [s for s, _ in kept]
    print("\nNaN-teacher chaos timeline (seconds from the launcher's start):")
    for key, value in timeline.items():
        print(f"   {key}: {value}")
    print(f"   stopped with: {line.split('ERROR', 1)[-1].strip()}")
