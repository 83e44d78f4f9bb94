"""Scheduler invariants and step times on a discrete-event fake (fake clock, fake futures, no sleeps).

The fake rollout is one serial worker: requests in submission order, a synced version is staged while it
generates and applied at the next batch boundary (or at once when idle), ``min_version`` makes it wait.
The fake teacher is one serial worker; ``update`` advances the clock by U; ``sync`` lands after S.
"""

from __future__ import annotations

import heapq
import threading
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from gkd.trainer.scheduler import PhaseFailed, Scheduler, SchedulerState, parse_staleness


class Sim:
    """Event queue on a fake clock; equal times run in scheduling order."""

    def __init__(self):
        self.now, self._q, self._seq = 0.0, [], 0

    def at(self, delay, fn):
        heapq.heappush(self._q, (self.now + delay, self._seq, fn))
        self._seq += 1

    def step(self):  # the scheduler's ``idle``: run the next event
        assert self._q, "deadlock: the scheduler waits but nothing is pending"
        self.now, _, fn = heapq.heappop(self._q)
        fn()

    def advance(self, dt):  # the trainer thread is busy for dt; everything else goes on
        end = self.now + dt
        while self._q and self._q[0][0] <= end:
            self.step()
        self.now = end


@dataclass
class FakeSample:
    policy_version: int


class FakeRollout:
    """One serial worker. ``chunks`` > 1 splits each batch into that many requests (micro-requests)."""

    def __init__(self, sim, duration, fails=(), version=0, chunks=1):
        self.sim, self.duration, self.fails, self.chunks = sim, duration, set(fails), chunks
        self.version, self.staged, self.busy = version, None, False
        self.queue, self.attempts = deque(), {}
        self.log = []  # (batch, attempt, start, version, min_version)

    def submit(self, b, min_version):
        attempt = self.attempts.get(b, 0)
        self.attempts[b] = attempt + 1
        fut, parts = Future(), []
        for i in range(self.chunks):
            self.queue.append((b, attempt, min_version, i, parts, fut))
        self._kick()
        return fut

    def stage(self, v):
        assert self.staged is None or v > self.staged
        assert v > self.version, f"version {v} pushed to a worker holding {self.version}"
        self.staged = v
        if not self.busy:
            self._kick()

    def _kick(self):
        if self.busy:
            return
        if self.staged is not None:  # the batch boundary: swap in the staged version
            self.version, self.staged = self.staged, None
        if not self.queue or self.version < self.queue[0][2]:
            return  # idle, or waiting for min_version
        b, attempt, min_version, i, parts, fut = self.queue.popleft()
        self.busy = True
        self.log.append((b, attempt, self.sim.now, self.version, min_version))
        self.sim.at(self.duration(b) / self.chunks, lambda: self._finish(b, attempt, i, parts, fut))

    def _finish(self, b, attempt, i, parts, fut):
        parts.append(FakeSample(self.version))
        self.busy = False
        self._kick()  # the next request starts at the boundary, before the reply reaches the scheduler
        if len(parts) < self.chunks:
            return
        if (b, attempt) in self.fails:
            fut.set_exception(ConnectionError(f"rollout worker lost batch {b}"))
        else:
            fut.set_result(list(parts))


class FakeTeacher:
    def __init__(self, sim, duration, fails=()):
        self.sim, self.duration, self.fails = sim, duration, set(fails)
        self.free_at, self.attempts = 0.0, {}

    def submit(self, b, rollout):
        attempt = self.attempts.get(b, 0)
        self.attempts[b] = attempt + 1
        fut = Future()
        start = max(self.sim.now, self.free_at)
        self.free_at = start + self.duration(b)

        def done():
            if (b, attempt) in self.fails:
                fut.set_exception(TimeoutError(f"teacher timed out on batch {b}"))
            else:
                fut.set_result(("topk", b))

        self.sim.at(self.free_at - self.sim.now, done)
        return fut


class Harness:
    """Fakes wired to a scheduler; records the trained batches and update times."""

    def __init__(
        self,
        k,
        G=1.0,
        T=1.0,
        U=1.0,
        S=0.0,
        *,
        gen_fails=(),
        score_fails=(),
        blocking_sync=False,
        rollout_version=0,
        chunks=1,
        **kw,
    ):
        self.sim = sim = Sim()
        dur = lambda x: x if callable(x) else (lambda b: x)
        self.rollout = FakeRollout(sim, dur(G), gen_fails, rollout_version, chunks)
        self.teacher = FakeTeacher(sim, dur(T), score_fails)
        self.U, self.S, self.blocking = dur(U), dur(S), blocking_sync
        self.trained, self.update_end, self.synced, self.failures = [], [], [], []
        self.sched = Scheduler(
            k,
            self.rollout.submit,
            self.teacher.submit,
            self.update,
            self.sync,
            clock=lambda: sim.now,
            idle=sim.step,
            on_failure=self._on_failure,
            **kw,
        )

    def update(self, b, rollout, scored):
        assert scored == ("topk", b) and len(rollout) == self.rollout.chunks
        self.trained.append(b)
        self.sim.advance(self.U(b))
        self.update_end.append(self.sim.now)
        return {"actor/kl_loss": 1.0 / (b + 1)}

    def sync(self, v):
        self.synced.append(v)
        if self.blocking:
            self.sim.advance(self.S(v))
            self.rollout.stage(v)
            return {"seconds": self.S(v)}
        fut = Future()
        self.sim.at(self.S(v), lambda: (self.rollout.stage(v), fut.set_result(None)))
        return fut

    def _on_failure(self, state, err):
        self.failures.append((state, err, list(self.trained)))

    def run(self, end, state=None):
        return list(self.sched.run(end, state))


def test_parse_staleness():
    assert [parse_staleness(x) for x in ("sync", "one_step_off", "two_step_off", 3, "5")] == [0, 1, 2, 3, 5]
    for bad in ("three_step_off", -1, 1.5, True, ""):
        with pytest.raises(ValueError, match="sync"):
            parse_staleness(bad)


@pytest.mark.parametrize("k", [0, 1, 2, 3])
def test_every_batch_once_in_order_with_exact_staleness(k):
    h = Harness(k, G=2, T=1.5, U=1, S=0.25)
    steps = h.run(12)
    assert h.trained == [s.batch for s in steps] == list(range(12))
    stale = [s.metrics["staleness"] for s in steps]
    assert stale == [min(b, k) for b in range(12)]  # warm-up 0..k-1, then exactly k
    for b, _, _, version, min_version in h.rollout.log:
        assert min_version == max(0, b - k) and version == max(0, b - k)
    assert h.synced == list(range(1, 12 - k))  # only versions some batch is generated on
    assert [s.state for s in steps] == [SchedulerState(b + 1, b + 1) for b in range(12)]
    assert steps[-1].metrics["actor/kl_loss"] == 1 / 12
    named = {
        "timing/step",
        "timing/wait_prev_gen",
        "timing/wait_prev_teacher",
        "timing/sync_rollout_weights",
        "timing/get_teacher_knowledge",
        "timing/update_actor",
        "rollout/policy_version",
        "staleness/mean",
        "staleness/max",
    }
    assert named <= set(steps[-1].metrics)
    assert ("timing/wait_prev_prev_teacher" in steps[-1].metrics) == (k >= 2)
    lanes = {(sp.name, sp.lane) for s in steps for sp in s.spans}
    assert {("generate", "rollout"), ("score", "teacher"), ("update", "trainer")} <= lanes
    for s in steps:
        assert all(sp.start <= sp.end for sp in s.spans)


def _bound(k, G, T, U, S):
    return max(G, T, U, S, (G + T + U + S) / (k + 1))


RATIOS = [(1, 1, 1), (1, 3, 1), (3, 1, 1), (1, 1, 3)]


@pytest.mark.parametrize("k", [0, 1, 2])
@pytest.mark.parametrize("gtu", RATIOS)
@pytest.mark.parametrize("S", [0.0, 0.1])
def test_steady_step_time_is_ideal(k, gtu, S):
    G, T, U = gtu
    h = Harness(k, G, T, U, S)
    h.run(60)
    step = (h.update_end[-1] - h.update_end[23]) / 36  # 36 steps: whole periods of any cycle up to 4
    assert step == pytest.approx(_bound(k, G, T, U, S), rel=1e-9)
    if k == 0:
        assert step == pytest.approx(G + T + U + S)
    if k == 1:
        assert step <= max(U, G + T) + S  # DESIGN.md's one-step-off figure (plus the sync it leaves out)
    if k == 2 and S == 0:
        assert step == pytest.approx(max(G, T, U))


def test_blocking_sync_runs_on_the_trainer_thread():
    h = Harness(2, G=1, T=1, U=1, S=0.5, blocking_sync=True)
    steps = h.run(30)
    assert [s.metrics["staleness"] for s in steps][2:] == [2] * 28
    assert steps[-5].metrics["timing/sync_rollout_weights"] == pytest.approx(0.5)
    assert (h.update_end[25] - h.update_end[5]) / 20 == pytest.approx(1.5)  # U + S on one thread


@pytest.mark.parametrize("k,gate", [(0, "strict"), (1, "strict"), (1, "pipelined"), (2, "pipelined")])
def test_a_generation_is_submitted_only_once_its_version_was_sent(k, gate):
    # A request for a version not yet sent would hold a rollout worker until the sync; with that worker
    # the only live one, the gate before the sync would wait for it forever.
    h = Harness(k, G=1, T=1, U=1, S=0.25, sync_gate=gate)
    submitted, submit = [], h.rollout.submit
    h.sched._generate = lambda b, v: (submitted.append((b, v, list(h.synced))), submit(b, v))[1]
    h.run(10)
    assert [b for b, _, _ in submitted] == list(range(10))
    for b, v, synced in submitted:
        assert v == 0 or v in synced, f"batch {b} (min_version {v}) submitted before sync({v})"


def test_micro_requests_need_the_strict_gate():
    # Two requests per batch: a version can land between them, so the pipelined gate mixes versions
    # (the documented condition (c)); the strict gate keeps every sample exactly k behind.
    loose = Harness(2, G=2, T=1, U=1, S=0.1, chunks=2).run(12)
    assert min(s.metrics["staleness/mean"] for s in loose[2:]) < 2
    strict = Harness(2, G=2, T=1, U=1, S=0.1, chunks=2, sync_gate="strict").run(12)
    assert all(s.metrics["staleness/max"] == s.metrics["staleness/mean"] == 2 for s in strict[2:])


def test_teacher_failure_is_retried_then_stops_with_checkpoint():
    h = Harness(1, score_fails=[(3, 0), (3, 1)], max_retries=2)
    steps = h.run(6)
    assert h.trained == list(range(6)) and steps[3].metrics["scheduler/retries"] == 2
    assert h.teacher.attempts[3] == 3 and not h.failures

    h = Harness(1, score_fails=[(3, 0), (3, 1), (3, 2)], max_retries=2)
    with pytest.raises(PhaseFailed, match=r"score of batch 3 failed after 3 attempt\(s\): TimeoutError") as e:
        h.run(6)
    assert (e.value.phase, e.value.batch, e.value.attempts) == ("score", 3, 3)
    assert isinstance(e.value.cause, TimeoutError)
    [(state, err, trained)] = h.failures  # the checkpoint callback ran first, at the resume point
    assert err is e.value and trained == [0, 1, 2] and state == SchedulerState(3, 3)
    assert h.sched.state == state


def test_rollout_failure_is_retried_then_stops():
    h = Harness(2, gen_fails=[(4, 0)], max_retries=1)
    h.run(8)
    assert h.trained == list(range(8)) and h.rollout.attempts[4] == 2
    h = Harness(2, gen_fails=[(4, 0), (4, 1)], max_retries=1)
    with pytest.raises(PhaseFailed, match="generate of batch 4 .*ConnectionError: rollout worker lost"):
        h.run(8)
    assert h.failures[0][0].next_batch == len(h.trained) <= 4


def test_a_failing_failure_checkpoint_does_not_replace_the_phase_failure():
    h = Harness(1, score_fails=[(3, 0), (3, 1), (3, 2)], max_retries=2)

    def save_collides(state, err):
        raise RuntimeError("checkpoints/step_000003 already exists")

    h.sched.on_failure = save_collides
    with pytest.raises(PhaseFailed, match="score of batch 3 failed") as e:
        h.run(6)
    assert isinstance(e.value.cause, TimeoutError)
    assert any("already exists" in note for note in e.value.__notes__)


def test_stale_rollout_is_an_error_not_retried():
    h = Harness(1, G=1, T=1, U=1)
    real = h.rollout.submit
    h.sched._generate = lambda b, v: real(b, 0)  # a service that ignores min_version
    with pytest.raises(PhaseFailed, match=r"versions \[0\], older than min_version=1") as e:
        h.run(6)
    assert e.value.attempts == 1 and e.value.batch == 2 and h.trained == [0, 1]


def test_update_and_sync_failures_stop_the_run():
    h = Harness(1)
    h.sched._update = lambda b, r, s: {"x": 1 / (b - 2)}
    with pytest.raises(PhaseFailed, match="update of batch 2 failed .*ZeroDivisionError"):
        h.run(6)
    assert h.failures[0][0] == SchedulerState(2, 2)

    h = Harness(1, S=0.5)
    bad = Future()
    bad.set_exception(OSError("weight channel broken"))
    h.sched._sync = lambda v: bad if v == 3 else h.sync(v)
    with pytest.raises(PhaseFailed, match="sync of version 3 failed .*weight channel broken"):
        h.run(8)
    assert h.failures[0][0].next_batch == 3  # version 3 was never trained on


def test_resume_continues_without_gap_or_repeat():
    h = Harness(2, G=1, T=2, U=1, S=0.2)
    first = h.run(5)
    # A fresh rollout (version 0) and a fresh scheduler: version 5 is synced first, then the run goes on.
    h2 = Harness(2, G=1, T=2, U=1, S=0.2)
    second = h2.run(11, first[-1].state)
    assert h.trained + h2.trained == list(range(11))
    assert h2.synced[0] == 5 and all(v >= 5 for *_, v, _ in h2.rollout.log)
    assert [s.metrics["staleness"] for s in second] == [0, 1, 2, 2, 2, 2]
    with pytest.raises(ValueError, match="inconsistent"):
        h2.run(12, SchedulerState(3, 4))


def test_abandoned_run_is_ignored_by_the_next():
    # Batch 4's teacher fails 3 times: once for the abandoned run (ignored, no retry), twice for the new one.
    h = Harness(2, G=1, T=2, U=1, S=0.5, score_fails=[(4, 0), (4, 1), (4, 2)], max_retries=2)
    it = h.sched.run(10)
    first = [next(it) for _ in range(3)]
    it.close()  # the trainer stopped iterating; its requests are still in flight
    second = list(h.sched.run(10, first[-1].state))
    assert h.trained == list(range(10)) and [s.batch for s in second] == list(range(3, 10))
    assert all(s.metrics["staleness"] <= 2 for s in second) and second[1].metrics["scheduler/retries"] == 2


def test_real_threads():
    # The default idle (a condition variable) with futures completed by other threads.
    pool = ThreadPoolExecutor(4)
    lock, versions, trained = threading.Lock(), {"v": 0}, []

    def generate(b, v):
        def work():
            with lock:
                return [FakeSample(max(versions["v"], v))]

        return pool.submit(work)

    def sync(v):
        with lock:
            versions["v"] = v

    sched = Scheduler(
        "two_step_off",
        generate,
        lambda b, r: pool.submit(lambda: b),
        lambda b, r, s: trained.append((b, s)),
        sync,
    )
    steps = list(sched.run(20))
    pool.shutdown()
    assert trained == [(b, b) for b in range(20)] and all(s.metrics["staleness"] <= 2 for s in steps)


phase = st.integers(1, 6).map(float)


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    k=st.integers(0, 3),
    start=st.integers(0, 3),
    n=st.integers(1, 10),
    retries=st.integers(0, 2),
    G=st.lists(phase, min_size=16, max_size=16),
    T=st.lists(phase, min_size=16, max_size=16),
    U=st.lists(phase, min_size=16, max_size=16),
    S=st.lists(st.integers(0, 4).map(float), min_size=16, max_size=16),
    gen_fails=st.sets(st.tuples(st.integers(0, 13), st.integers(0, 2)), max_size=6),
    score_fails=st.sets(st.tuples(st.integers(0, 13), st.integers(0, 2)), max_size=6),
    blocking=st.booleans(),
    strict=st.booleans(),
)
@example(  # batch 4 queues behind batch 2's retry on the serial worker: it starts on a newer version
    k=3, start=0, n=6, retries=1, G=[1.0] * 16, T=[1.0] * 16, U=[1.0] * 16, S=[0.0] * 16,
    gen_fails={(2, 0)}, score_fails=set(), blocking=False, strict=False,
)  # fmt: skip
def test_property_random_durations_and_failures(
    k, start, n, retries, G, T, U, S, gen_fails, score_fails, blocking, strict
):
    end = start + n
    kw = dict(
        G=lambda b: G[b],
        T=lambda b: T[b],
        U=lambda b: U[b],
        S=lambda v: S[v],
        blocking_sync=blocking,
        max_retries=retries,
        sync_gate="strict" if strict else "pipelined",
    )
    h = Harness(k, gen_fails=gen_fails, score_fails=score_fails, **kw)
    state = SchedulerState(start, start)
    exhausted = {
        (ph, b)
        for ph, fails in (("generate", gen_fails), ("score", score_fails))
        for b in range(start, end)
        if all((b, a) in fails for a in range(retries + 1))
    }
    steps, error = [], None
    try:
        for s in h.sched.run(end, state):
            steps.append(s)
    except PhaseFailed as e:
        error = e
    # Trained exactly once, in order; a failure stops the run at a resume point, after the checkpoint.
    assert h.trained == list(range(start, start + len(h.trained)))
    if error is None:
        assert not exhausted and h.trained == list(range(start, end)) and not h.failures
    else:
        assert (error.phase, error.batch) in exhausted and error.batch >= start + len(h.trained)
        [(ck, err, trained)] = h.failures
        assert err is error and ck == SchedulerState(start + len(trained), start + len(trained))
        h2 = Harness(k, **kw)  # resume on fresh services, nothing failing
        h2.run(end, ck)
        assert h.trained + h2.trained == list(range(start, end))
    # Generation never started on weights older than allowed; staleness <= k, and == k after warm-up.
    retried = {b for b, a, *_ in h.rollout.log if a > 0}
    first = {b: v for b, a, _, v, _ in h.rollout.log if a == 0}
    # a batch whose generation starts behind a retry on the serial worker may start on a newer version
    retry_starts = [t for _, a, t, _, _ in h.rollout.log if a > 0]
    delayed = {b for b, a, t, _, _ in h.rollout.log if a == 0 and any(r <= t for r in retry_starts)}
    for b, _, _, version, min_version in h.rollout.log:
        assert min_version == max(start, b - k) and version >= min_version
    for s in steps:
        assert 0 <= s.metrics["staleness"] <= k
        if s.batch not in retried | delayed:
            assert s.metrics["staleness"] == min(k, s.batch - start)
            assert first[s.batch] == max(start, s.batch - k)


class FakeTeacherAnswers:
    """The teacher's generate op: answers need no version; a serial worker of its own."""

    def __init__(self, sim, duration):
        self.sim, self.duration, self.free_at, self.submitted = sim, duration, 0.0, {}

    def submit(self, b, min_version):
        self.submitted[b] = self.sim.now
        fut = Future()
        start = max(self.sim.now, self.free_at)
        self.free_at = start + self.duration
        self.sim.at(self.free_at - self.sim.now, lambda: fut.set_result([FakeSample(-1)]))
        return fut


def _mixed(k, sources, **kw):
    h = Harness(k, G=2, T=1, U=1, S=0.5, source=lambda b: sources[b], **kw)
    answers = FakeTeacherAnswers(h.sim, 1.5)
    rollout_submit = h.rollout.submit
    h.sched._generate = lambda b, v: answers.submit(b, v) if sources[b] != "student" else rollout_submit(b, v)
    return h, answers


@pytest.mark.parametrize("k", [0, 1, 2, 3])
def test_teacher_batches_bypass_the_rollout_and_the_versions(k):
    sources = ["student", "teacher", "teacher", "student", "teacher", "student", "student", "teacher"] * 2
    h, answers = _mixed(k, sources)
    steps = h.run(len(sources))
    assert h.trained == list(range(len(sources)))
    student = [b for b, s in enumerate(sources) if s == "student"]
    assert sorted({b for b, *_ in h.rollout.log}) == student  # teacher batches never reach the rollout
    assert sorted(answers.submitted) == [b for b in range(len(sources)) if b not in student]
    for b, _, _, version, min_version in h.rollout.log:
        assert min_version == max(0, b - k) and version >= min_version  # staleness <= k still holds
    for s in steps:
        assert s.metrics["batch/student"] == float(sources[s.batch] == "student")
        assert ("staleness/max" in s.metrics) == (sources[s.batch] == "student")
        if "staleness/max" in s.metrics:
            assert s.metrics["staleness/max"] <= k
    # a version is sent only for the student batch generated on it
    assert h.synced == [t for t in range(1, len(sources) - k) if sources[t + k] == "student"]


def test_an_all_teacher_run_sends_no_weights():
    sources = ["teacher"] * 6
    h, answers = _mixed(1, sources)
    steps = h.run(6)
    assert h.trained == list(range(6)) and h.synced == [] and h.rollout.log == []
    assert all("staleness" not in s.metrics for s in steps)
