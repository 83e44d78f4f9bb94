"""Scheduler overlap on synthetic, sleep-based phases: measured step time / ideal, for k = 0, 1, 2.

Run: ``.venv/bin/python -m pytest bench/bench_scheduler.py --benchmark-only -s``
(``GKD_BENCH_UNIT_MS`` scales the phases, default 50 ms; ``GKD_BENCH_SYNC_MS`` is S, default 5 ms;
``GKD_BENCH_BATCHES`` batches per run, default 30). Not part of CI. Ratios are printed at the end and
written to bench/results/scheduler.json.

Synthetic engines (no model anywhere): the rollout is one worker thread that sleeps G per batch, serves
requests in order, waits for ``min_version`` and swaps in a synced version at a batch boundary (as the
rollout service does); the teacher is one worker thread that sleeps T per batch; ``update`` sleeps U on the
trainer thread; ``sync`` returns a Future that lands the version in the rollout after S (a double-buffered
transfer). G:T:U ratios 1:1:1, 1:3:1 and 3:1:1 times the unit.

Two baselines, from the same phase durations: DESIGN.md's ideal (``max(G, T, U)`` for k=2,
``max(U, G + T)`` for k=1, ``G + T + U + S`` for k=0; the target is <= 1.05) and the exact lower bound
of this schedule, ``max(G, T, U, S, (G + T + U + S) / (k + 1))`` (see ``gkd.scheduler``): for k=1 it is
below DESIGN.md's figure, because generation of batch t+1 starts as soon as version t lands, not when
update t starts. Step time is the mean over the steady state (after warm-up, before the drain).
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

from gkd.scheduler import Scheduler

UNIT = float(os.environ.get("GKD_BENCH_UNIT_MS", "50")) / 1000
S = float(os.environ.get("GKD_BENCH_SYNC_MS", "5")) / 1000
BATCHES = int(os.environ.get("GKD_BENCH_BATCHES", "30"))
RATIOS = {"1:1:1": (1, 1, 1), "1:3:1": (1, 3, 1), "3:1:1": (3, 1, 1)}
RESULTS = Path(__file__).resolve().parent / "results" / "scheduler.json"
_ROWS: dict[str, dict[str, float]] = {}  # "k=2 1:3:1" -> figures, filled by the benchmarks


@dataclass
class _Sample:
    policy_version: int


class SyntheticRollout:
    """One serial worker thread: sleeps ``G`` per batch; versions change only between batches."""

    def __init__(self, G: float):
        self.G, self.version, self.staged = G, 0, None
        self._queue: deque[tuple[int, Future]] = deque()
        self._cond, self._closed = threading.Condition(), False
        self._thread = threading.Thread(target=self._loop, name="synthetic-rollout", daemon=True)
        self._thread.start()

    def submit(self, batch: int, min_version: int) -> Future:
        fut: Future = Future()
        with self._cond:
            self._queue.append((min_version, fut))
            self._cond.notify_all()
        return fut

    def stage(self, version: int) -> None:
        with self._cond:
            self.staged = version
            self._cond.notify_all()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join(5)

    def _next(self):
        """At a batch boundary: swap in a staged version, then take the head request if it may start."""
        if self.staged is not None:
            self.version, self.staged = self.staged, None
        if self._queue and self.version >= self._queue[0][0]:
            return self._queue.popleft()[1], self.version
        return None

    def _loop(self) -> None:
        job = None
        while True:
            with self._cond:
                while job is None:
                    job = self._next()
                    if job is None:
                        if self._closed:
                            return
                        self._cond.wait()
            fut, version = job
            time.sleep(self.G)
            with self._cond:  # the next request starts at the boundary, before this reply is delivered
                job = self._next()
            fut.set_result([_Sample(version)])


def _run(k: int, G: float, T: float, U: float, n: int) -> dict[str, float]:
    rollout = SyntheticRollout(G)
    teacher = ThreadPoolExecutor(1, thread_name_prefix="synthetic-teacher")
    weights = ThreadPoolExecutor(1, thread_name_prefix="synthetic-weights")

    def score(batch, samples):
        return teacher.submit(time.sleep, T)

    def sync(version):
        return weights.submit(lambda: (time.sleep(S), rollout.stage(version)))

    def update(batch, samples, scored):
        time.sleep(U)
        return {}

    sched = Scheduler(k, rollout.submit, score, update, sync, clock=time.perf_counter)
    try:
        steps = list(sched.run(n))
    finally:
        rollout.close()
        teacher.shutdown()
        weights.shutdown()
    ends = [next(sp.end for sp in s.spans if sp.name == "update") for s in steps]
    first, last = k + 3, n - 1 - k  # steady state: after warm-up, before the last k (drain)
    step = (ends[last] - ends[first]) / (last - first)
    stale = [s.metrics["staleness"] for s in steps]
    assert stale == [min(b, k) for b in range(n)], stale
    design = {0: G + T + U + S, 1: max(U, G + T), 2: max(G, T, U)}[k]
    bound = max(G, T, U, S, (G + T + U + S) / (k + 1))
    return {
        "step_ms": step * 1e3,
        "design_ideal_ms": design * 1e3,
        "bound_ms": bound * 1e3,
        "step/design_ideal": step / design,
        "step/bound": step / bound,
    }


@pytest.mark.parametrize("ratio", list(RATIOS))
@pytest.mark.parametrize("k", [0, 1, 2])
def test_synthetic_step_time(benchmark, k, ratio):
    G, T, U = (UNIT * x for x in RATIOS[ratio])
    row = benchmark.pedantic(_run, args=(k, G, T, U, BATCHES), rounds=1, iterations=1)
    benchmark.extra_info.update(row)
    _ROWS[f"k={k} {ratio}"] = row


@pytest.fixture(scope="module", autouse=True)
def report():
    """After the module's benchmarks: print the table and write RESULTS (a fixture, so that
    ``--benchmark-only`` does not skip it)."""
    yield
    if not _ROWS:
        return
    print(f"\nscheduler, synthetic phases: unit {UNIT * 1e3:g} ms, S {S * 1e3:g} ms, {BATCHES} batches")
    print(f"  {'':12s} {'step ms':>8s} {'ideal ms':>9s} {'/ideal':>7s} {'bound ms':>9s} {'/bound':>7s}")
    for name, r in _ROWS.items():
        print(
            f"  {name:12s} {r['step_ms']:8.1f} {r['design_ideal_ms']:9.1f} {r['step/design_ideal']:7.3f} "
            f"{r['bound_ms']:9.1f} {r['step/bound']:7.3f}"
        )
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(
        json.dumps({"unit_ms": UNIT * 1e3, "sync_ms": S * 1e3, "batches": BATCHES, "rows": _ROWS}, indent=2)
    )
