"""``gkd train`` stopped and resumed end to end on the CPU tiny models (two trainer ranks under torchrun).

- SIGTERM to ``gkd train`` mid-run (k = 2): the launcher stops the trainer first; rank 0 finishes its step,
  writes ``step_<n>`` with the two batches already generated for steps n and n + 1, and every process
  exits non-zero. ``resume=auto`` then trains n..end once each, and the first two batches after the
  resume are the carried ones, on versions n - 2 and n - 1 as in an uninterrupted run (without them both
  would use version n). The uninterrupted reference run gives the batch -> version map to match.
- A 10 s rollout stall (its worker SIGSTOPped) with ``trainer.collective_timeout_s=5``: the rank waiting
  for rank 0's next command polls the store and is not torn down by the group's timeout.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.test_chaos import _workers
from tests.tiny_run import tiny_fixture, train_argv
from tests.transport.helpers import free_port

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
RUN_TIMEOUT_S = 400
STEPS = 16
COMMON = (
    "teacher.top_k=8", "rollout.max_new_tokens=8", "optim.lr=5e-3", "logging.progress_bar=false",
    "trainer.nproc_per_node=2", f"trainer.total_steps={STEPS}", "trainer.save_freq=0",
)  # fmt: skip

tiny = tiny_fixture()


def _argv(tiny, out: Path, *overrides: str) -> tuple[list[str], list[int]]:
    ports = [free_port() for _ in range(5)]
    return train_argv(tiny, out, ports, *COMMON, *overrides), ports


def _records(out: Path) -> list[dict]:
    path = out / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _wait_for(cond, proc: subprocess.Popen, what: str, timeout_s: float = RUN_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert proc.poll() is None, f"gkd train exited with {proc.returncode} before {what}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def _run(tiny, out: Path, *overrides: str) -> subprocess.CompletedProcess:
    argv, _ = _argv(tiny, out, *overrides)
    proc = subprocess.run(argv, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    assert proc.returncode == 0, proc.stderr[-6000:]
    return proc


def _versions(records: list[dict]) -> dict[int, float]:
    return {r["step"]: r["rollout/policy_version"] for r in records}


@pytest.mark.slow
def test_sigterm_saves_the_last_step_with_its_carried_batches_and_resume_is_exact(tiny, tmp_path):
    k2 = "trainer.scheduler=two_step_off"
    _run(tiny, tmp_path / "reference", k2)
    want = _versions(_records(tmp_path / "reference"))

    out = tmp_path / "stopped"
    argv, _ = _argv(tiny, out, k2)
    log = open(tmp_path / "stopped.log", "w")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(argv, cwd=ROOT, env=ENV, stdout=log, stderr=subprocess.STDOUT)
    try:
        _wait_for(lambda: len(_records(out)) >= 5, proc, "step 5")
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(RUN_TIMEOUT_S)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        log.close()
    text = (tmp_path / "stopped.log").read_text()
    assert code != 0, text[-4000:]
    done = len(_records(out))
    assert 5 <= done < STEPS, text[-4000:]
    saved = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert saved == [f"step_{done:06d}"], (saved, done, text[-4000:])  # the last trained step, no other
    trainer_log = (out / "logs" / "trainer.log").read_text()
    assert "SIGTERM received: finishing the current step" in trainer_log, trainer_log[-4000:]
    assert f"the run stopped before batch {done}" in trainer_log

    resumed = _run(tiny, out, k2)
    records = _records(out)
    assert [r["step"] for r in records] == list(range(STEPS))  # no batch repeated or skipped
    assert [r["data/batch"] for r in records] == list(range(STEPS))
    assert f"at step {done}" in resumed.stderr
    got = _versions(records)
    # the carried batches: generated before the stop on versions done - 2 and done - 1, not regenerated
    assert [got[done], got[done + 1]] == [done - 2, done - 1], got
    # every batch on the version the uninterrupted run used (a loaded machine may let one batch of
    # either run see its version early: gkd.trainer.scheduler's pipelined gate, assumption (d))
    differ = [b for b in range(STEPS) if got[b] != want[b]]
    assert len(differ) <= 2, (differ, got, want)
    assert (out / "final" / "model.safetensors").is_file()


@pytest.mark.slow
def test_a_rollout_stall_longer_than_the_collective_timeout_does_not_tear_the_ranks_down(tiny, tmp_path):
    out = tmp_path / "stall"
    argv, ports = _argv(tiny, out, "trainer.scheduler=sync", "trainer.collective_timeout_s=5")
    log = open(tmp_path / "stall.log", "w")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(argv, cwd=ROOT, env=ENV, stdout=log, stderr=subprocess.STDOUT)
    stopped: list[int] = []
    try:
        _wait_for(lambda: len(_records(out)) >= 3, proc, "step 3")
        stopped = _workers(ports[3])  # the rollout worker (its broker's backend port)
        assert len(stopped) == 1, stopped
        os.kill(stopped[0], signal.SIGSTOP)
        time.sleep(10)  # the other rank waits for rank 0's next command twice the group's timeout
        os.kill(stopped[0], signal.SIGCONT)
        code = proc.wait(RUN_TIMEOUT_S)
    finally:
        for pid in stopped:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        log.close()
    text = (tmp_path / "stall.log").read_text()
    assert code == 0, text[-6000:]
    records = _records(out)
    assert [r["step"] for r in records] == list(range(STEPS))
    assert max(r["timing/step"] for r in records) >= 8.0  # one step waited out the stall
