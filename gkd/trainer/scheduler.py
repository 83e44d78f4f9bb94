"""Bounded-staleness scheduling of generate / score / update / sync, for any staleness ``k >= 0``.

Pure logic: standard library only, no I/O. The phases are injected callables, so the trainer plugs in the
real clients and the tests a discrete-event fake (``clock`` + ``idle``)::

    sched = Scheduler(
        k=parse_staleness(cfg.trainer.scheduler),  # sync | one_step_off | two_step_off | an int
        generate=lambda b, v: rollout.submit(prompts(b), sampling, min_version=v),  # Future[list[Sample]]
        score=lambda b, samples: teacher.submit(sequences(samples), top_k, temperature),  # -> Future
        update=lambda b, samples, scored: train_step(samples, scored),  # synchronous; returns metrics
        sync=lambda v: sender.sync(v),                                  # None/dict (blocking) or a Future
        on_failure=lambda state, err: save_checkpoint(state),
    )
    for step in sched.run(end=total_steps, state=resume_state):        # trains batches next_batch..end-1
        log(step.metrics, step.spans); maybe_checkpoint(step.state)

Versions. Policy version ``v`` = number of updates applied: update of batch ``t`` turns version ``t`` into
``t + 1``, so a run resumed at batch ``s`` holds version ``s``. Batch ``b`` is generated with
``min_version = max(s, b - k)`` and trained at update step ``b``; its staleness is ``b - policy_version``.

The loop, on the calling ("trainer") thread, for each batch ``t``:
  1. if some later batch needs version ``t`` (``s < t <= end - 1 - k``): wait for the *sync gate*, wait for
     the previous sync to finish, and call ``sync(t)``. This happens before ``update(t)`` because the
     model holds version ``t`` only until then (``sync`` may return a Future if it snapshots the weights);
  2. submit the generation of every batch ``b`` with ``b - k <= t``: its ``min_version`` has been sent.
     Never earlier: a request for a version not yet sent would occupy a rollout worker until the sync,
     and the sync gate may be waiting for a batch that only that worker could take (a deadlock when the
     other worker died, or left a re-forming weight channel);
  3. wait for batch ``t`` to be generated and scored, call ``update(t)``, yield a :class:`Step`.
Scoring of a batch is submitted from the generation future's callback, the moment it completes, so teacher
scoring overlaps the update of earlier batches. Failed generate/score requests are resubmitted from the
callbacks too (at most ``max_retries`` times); then the run stops: ``on_failure(state, error)`` is called,
and :class:`PhaseFailed` is raised. No batch is ever skipped: ``state`` resumes at the first untrained one.

Batches the student does not answer (``source(b) != "student"``: GKD's teacher or dataset answers,
``gkd.trainer.sources``) need no weight version: version ``t`` is sent (and the sync gate waited for) only
when batch ``t + k`` is a student batch (the next student batch needs a later version anyway), so a teacher
batch is submitted at its step without any wait on the gate, and the gate never waits for one; their staleness
is not measured (their records hold no ``staleness*`` metrics; ``batch/student`` is 0).

Staleness (``min_version`` makes ``staleness <= k`` hold always, whatever the rollout does). It is exactly
``k`` after warm-up (the first ``k`` batches of a run have ``b - s < k``: they all use version ``s``) when
version ``t`` reaches the rollout only after the generation of batch ``t + k - 1`` has *started*: then that
batch used version ``<= t - 1`` and, by ``min_version``, ``>= t - 1``. The sync gate enforces this:

- ``sync_gate="pipelined"`` (default): ``sync(t)`` waits until the first generation attempt of batch
  ``t + k - 2`` has ended (batch ``t + k - 1`` was submitted before, after ``sync(t - 1)``). It holds
  exactly with ONE rollout worker that
  (a) serves requests in submission order, (b) applies a received version only between requests (double
  buffering: received while it generates, swapped at the boundary), (c) gets each batch as ONE request
  (``RolloutClient.max_prompts_per_request >= batch size``; otherwise a version can land between two
  micro-requests of one batch, which then has mixed versions), and (d) receives a request submitted before
  ``sync(t)`` was called before that sync's transfer completes (a message is faster than a weight
  transfer). With (a)-(b), batch ``t + k - 1`` is queued behind ``t + k - 2`` and starts at the boundary
  where ``t + k - 2`` ends, before the scheduler even sees that reply; (d) covers the case where it was
  submitted to an idle worker. The transfer then overlaps the generation of ``t + k - 1``, so it costs no
  step time when ``S <= G``. For ``k <= 2`` the gate costs nothing either: ``update(t)`` needs batch
  ``t >= t + k - 2`` anyway.
- ``sync_gate="strict"``: ``sync(t)`` waits until the first generation attempt of batch ``t + k - 1`` has
  ended. Exact with any number of workers and micro-requests; the transfer then sits between two
  generations (``G + S`` per batch).
- A batch whose generation was retried may be fresher (staleness ``< k``): the gate waits for first
  attempts only, because a retry is queued behind later batches, which may need the very version the gate
  holds back (waiting for the retry would deadlock).

Resume and stop. A run resumed at batch ``s`` holds version ``s`` only, so batches ``s .. s + k - 1``
would all be generated on it; an uninterrupted run generated them on ``s - k .. s - 1``. A checkpoint
therefore carries the batches generated but not yet trained (:meth:`Scheduler.in_flight`,
:class:`Carried`), and ``run(end, state, carried)`` scores them instead of generating them again: every
batch trains on the version an uninterrupted run uses. :meth:`Scheduler.stop` (a stop signal) lets the
update in progress finish and ends the run at the next wait with :class:`Stopped` (``on_failure`` saves);
generations on their way get ``stop_grace_s`` to arrive, so the stop's checkpoint can carry them.

Steady-state step time (constant durations, async sync): ``max(G, T, U, S, (G + T + U + S) / (k + 1))``,
as every phase is started as soon as its inputs exist; ``k = 0``: ``G + T + U + S``; ``k = 2``:
``max(G, T, U)`` when ``S`` is small; ``k = 1``: at most ``max(U, G + T)`` (DESIGN.md's figure assumes the
generation of ``t + 1`` starts with ``update(t)``; here it starts as soon as version ``t`` arrives).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import CancelledError, Future
from dataclasses import dataclass, field
from typing import Any

from gkd.config import SCHEDULERS, parse_scheduler

__all__ = [
    "STALENESS_NAMES", "Carried", "PhaseFailed", "Scheduler", "SchedulerState", "Span", "Step", "Stopped",
    "parse_staleness",
]  # fmt: skip

log = logging.getLogger("gkd.scheduler")

STALENESS_NAMES = SCHEDULERS  # the names trainer.scheduler takes; gkd.config parses them (one home)
parse_staleness = parse_scheduler  # "sync" -> 0, "one_step_off" -> 1, "two_step_off" -> 2, "3" or 3 -> 3


class PhaseFailed(RuntimeError):
    """A phase of one batch failed for good (after its retries); the run stopped, nothing was skipped.

    ``phase``: generate | score | update | sync; ``batch``: the batch (for sync: the version, which is
    also the batch trained next); ``cause``: the last exception; ``attempts``: how many were made."""

    def __init__(self, phase: str, batch: int, cause: BaseException, attempts: int = 1):
        self.phase, self.batch, self.cause, self.attempts = phase, batch, cause, attempts
        what = f"sync of version {batch}" if phase == "sync" else f"{phase} of batch {batch}"
        super().__init__(
            f"{what} failed after {attempts} attempt(s): {type(cause).__name__}: {cause}. "
            "The run stopped without skipping any batch; resume from the last checkpoint."
        )


class Stopped(PhaseFailed):
    """The run was asked to stop (SIGTERM / SIGINT) before ``batch`` was trained; nothing failed."""

    def __init__(self, batch: int, why: str):
        RuntimeError.__init__(
            self, f"{why}: the run stopped before batch {batch}; resume from the checkpoint of step {batch}"
        )
        self.phase, self.batch, self.cause, self.attempts, self.why = "stop", batch, None, 0, why


@dataclass(frozen=True)
class Carried:
    """A batch generated before a checkpoint but not yet trained (``k >= 1``: the next ``k`` batches are in
    flight at every step): its answers and the ``min_version`` it was asked for. A checkpoint holds them
    so that a resumed run trains exactly the batches an uninterrupted one would, on the same versions."""

    batch: int
    min_version: int
    result: Any


@dataclass(frozen=True)
class SchedulerState:
    """What a checkpoint needs to resume: the next batch to train and the policy version (equal)."""

    next_batch: int = 0
    version: int = 0


@dataclass(frozen=True)
class Span:
    """One phase interval for the timeline. ``lane``: trainer | rollout | teacher | weights. For ``sync``
    and ``sync_transfer``, ``batch`` is the version sent (also the batch trained right after)."""

    name: str
    lane: str
    batch: int
    start: float
    end: float


@dataclass(frozen=True)
class Step:
    """One trained batch: ``state`` is the state after it (checkpoint this), ``metrics`` holds the
    scheduler's metrics and ``update``'s, ``spans`` the spans that ended since the previous step."""

    batch: int
    state: SchedulerState
    metrics: dict[str, float]
    spans: list[Span]


@dataclass
class _Batch:
    index: int
    min_version: int
    run: int  # which run() made it: callbacks of an abandoned run are ignored
    student: bool = True  # answered by the student's rollout (else: no version, no staleness)
    gen_attempts: int = 0
    gen_first: float = 0.0  # first submission (clock)
    gen_start: float = 0.0  # current attempt
    gen_end: float = 0.0
    rollout: Any = None
    versions: list[int] = field(default_factory=list)
    generated: bool = False
    given_up: bool = False  # its generation failed after the run began to stop: not retried
    tried: bool = False  # the first generation attempt ended, successfully or not
    score_attempts: int = 0
    score_first: float = 0.0
    score_start: float = 0.0
    score_end: float = 0.0
    scored: Any = None
    done: bool = False  # scored


def sample_versions(result: Sequence[Any]) -> list[int]:
    """Default ``versions``: the ``policy_version`` of every sample of a rollout result."""
    return [int(s.policy_version) for s in result]


class Scheduler:
    """Drives the phases for staleness ``k``; see the module docstring for the loop and the guarantees.

    - ``generate(batch, min_version) -> Future`` of the rollout result (e.g. ``list[Sample]``);
    - ``score(batch, rollout_result) -> Future`` of the teacher's result; called from the generation
      future's callback thread, so it must be thread-safe (the gkd clients are);
    - ``update(batch, rollout_result, scored) -> dict`` of metrics: the training step, on the run thread;
    - ``sync(version) -> Future | None | Any``: send the weights of ``version`` (the model holds exactly that
      version during the call); a Future means the transfer continues in the background, anything else
      means it is done. Called on the run thread;
    - ``clock``: seconds; ``idle``: called on the run thread when it must wait for a future (default: block
      until a callback arrives); a discrete-event simulation passes its "run the next event";
    - ``versions(rollout_result) -> list[int]``: the policy version of each sample;
    - ``source(batch) -> str``: who answers the batch (default: ``"student"`` for all); any other source
      is generated without a version (see the module docstring);
    - ``on_failure(state, error)``: called before :class:`PhaseFailed` is raised (checkpoint there; for an
      ``update`` failure the model may be partly updated);
    - ``initial_sync``: send version ``state.version`` before the first generation (default: when
      resuming, i.e. ``state.version > 0``; at version 0 the rollout loads the same initial weights);
    - ``stop_grace_s``: after :meth:`stop`, how long generations on their way may still complete (their
      answers go into the stop's checkpoint, :meth:`in_flight`).
    """

    def __init__(
        self,
        k: int | str,
        generate: Callable[[int, int], Future],
        score: Callable[[int, Any], Future],
        update: Callable[[int, Any, Any], dict[str, float] | None],
        sync: Callable[[int], Any],
        *,
        clock: Callable[[], float] = time.monotonic,
        max_retries: int = 2,
        on_failure: Callable[[SchedulerState, PhaseFailed], None] | None = None,
        idle: Callable[[], None] | None = None,
        versions: Callable[[Any], list[int]] = sample_versions,
        sync_gate: str = "pipelined",
        initial_sync: bool | None = None,
        source: Callable[[int], str] | None = None,
        stop_grace_s: float = 0.0,
    ):
        if sync_gate not in ("pipelined", "strict"):
            raise ValueError(f"sync_gate must be 'pipelined' or 'strict', got {sync_gate!r}")
        if max_retries < 0:
            raise ValueError(f"max_retries must be >= 0, got {max_retries}")
        self.k = parse_staleness(k)
        self._generate, self._score, self._update, self._sync = generate, score, update, sync
        self._clock, self._idle, self._versions = clock, idle, versions
        self.max_retries, self.on_failure = max_retries, on_failure
        self.sync_gate, self.initial_sync = sync_gate, initial_sync
        self._source, self.stop_grace_s = source, stop_grace_s
        self._cond = threading.Condition()
        self._carried: dict[int, Carried] = {}
        self._batches: dict[int, _Batch] = {}
        self._spans: list[Span] = []
        self._failure: PhaseFailed | None = None
        self._closed, self._run_id = True, 0
        self._state = SchedulerState()

    @property
    def state(self) -> SchedulerState:
        """The resume point: every batch before ``next_batch`` is trained, none after it."""
        return self._state

    # ------------------------------------------------------------------------------------------ the loop
    def run(
        self, end: int, state: SchedulerState | None = None, carried: Sequence[Carried] = ()
    ) -> Iterator[Step]:
        """Train batches ``state.next_batch .. end - 1`` in order, yielding one :class:`Step` each.
        ``carried``: batches a checkpoint held (:meth:`in_flight`), used instead of generating them again
        (one whose ``min_version`` is more than ``k`` behind is dropped: generated again)."""
        state = state or SchedulerState()
        if state.version != state.next_batch or state.next_batch < 0:
            raise ValueError(
                f"scheduler state {state} is inconsistent: the policy version is the number of updates "
                "applied, so it must equal next_batch (>= 0)"
            )
        if end < state.next_batch:
            raise ValueError(f"end={end} is before the resume point next_batch={state.next_batch}")
        with self._cond:
            if not self._closed:
                raise RuntimeError("Scheduler.run is already running; one run at a time")
            self._closed, self._failure, self._run_id = False, None, self._run_id + 1
            self._batches, self._spans = {}, []
            self._state = state
        self._start, self._end = state.next_batch, end
        self._next_gen = self._start
        self._carried = {
            c.batch: c
            for c in carried
            if state.next_batch <= c.batch < end and c.batch - c.min_version <= self.k
        }
        self._transfer: Future | None = None  # the latest async sync
        self._step_sync = 0.0
        try:
            yield from self._loop()
        except PhaseFailed as failed:
            err = failed
            if isinstance(err, Stopped):  # the update running when it was asked for finished
                err = Stopped(self._state.next_batch, err.why)
                if self.stop_grace_s > 0:  # answers on their way are worth keeping (in_flight)
                    self._settle(self.stop_grace_s, through_stop=True)
            self._close()
            if self.on_failure is not None:
                try:
                    self.on_failure(self._state, err)
                except Exception as e:  # the phase's failure is the cause to report, not the save's
                    log.error("on_failure after %s failed too: %s: %s", err.phase, type(e).__name__, e)
                    err.add_note(f"the failure handler (checkpoint) failed too: {type(e).__name__}: {e}")
            if err is failed:
                raise
            raise err from None
        finally:
            self._close()

    def _loop(self) -> Iterator[Step]:
        k, start, end = self.k, self._start, self._end
        initial = self.initial_sync if self.initial_sync is not None else start > 0
        last = self._clock()
        if initial and start < end:
            self._send(start)
        for t in range(start, end):
            waits = {"gen": 0.0, "teacher": 0.0}
            if start < t <= end - 1 - k and self._is_student(t + k):  # batch t + k is generated on version t
                gate = t + k - 2 if self.sync_gate == "pipelined" else t + k - 1
                waits["gen"] += self._wait(lambda g=gate: self._tried(g), "wait_gen", t)
                self._send(t)
            self._submit_generations(t)  # after the sync: the versions they need have been sent
            rec = self._batches[t]
            waits["gen"] += self._wait(lambda r=rec: r.generated, "wait_gen", t)
            waits["teacher"] += self._wait(lambda r=rec: r.done, "wait_teacher", t)
            u0 = self._clock()
            try:
                extra = self._update(t, rec.rollout, rec.scored) or {}
            except Exception as e:
                raise PhaseFailed("update", t, e) from e
            u1 = self._clock()
            with self._cond:
                del self._batches[t]  # drop the references to the batch's data
                self._state = SchedulerState(t + 1, t + 1)
                self._spans.append(Span("update", "trainer", t, u0, u1))
                spans, self._spans = self._spans, []
            metrics = self._metrics(rec, t, waits, u1 - u0, u1 - last)
            metrics.update(extra)
            last = u1
            yield Step(t, self._state, metrics, spans)

    def _metrics(self, rec: _Batch, t: int, waits: dict[str, float], update_s: float, step_s: float):
        m: dict[str, float] = {"batch/student": float(rec.student)}
        if rec.student:  # staleness is a student batch's: other answers have no policy version
            stale = [t - v for v in rec.versions]
            m["staleness"] = m["staleness/max"] = float(max(stale))
            m["staleness/mean"] = sum(stale) / len(stale)
            m["rollout/policy_version"] = float(min(rec.versions))
            m["rollout/min_version"] = float(rec.min_version)
        m["timing/step"] = step_s
        m["timing/wait_prev_gen"] = waits["gen"]
        m["timing/wait_prev_teacher"] = waits["teacher"]
        m["timing/sync_rollout_weights"] = self._step_sync
        m["timing/get_teacher_knowledge"] = rec.score_end - rec.score_first
        m["timing/generate"] = rec.gen_end - rec.gen_first
        m["timing/update_actor"] = update_s
        m["scheduler/retries"] = float(rec.gen_attempts + rec.score_attempts - 2)
        if self.k >= 2:  # verl's two-step-off name for the same wait
            m["timing/wait_prev_prev_teacher"] = waits["teacher"]
        self._step_sync = 0.0
        return m

    def _tried(self, b: int) -> bool:
        """The first generation attempt of batch ``b`` ended: the rollout worker is past it."""
        rec = self._batches.get(b)
        return rec is None or rec.tried or not rec.student  # None: before the start, or already trained

    def _is_student(self, b: int) -> bool:
        return self._source is None or self._source(b) == "student"

    def _submit_generations(self, version: int) -> None:
        while self._next_gen < self._end and self._next_gen - self.k <= version:
            b = self._next_gen
            rec = _Batch(b, max(self._start, b - self.k), self._run_id, self._is_student(b))
            with self._cond:
                self._batches[b] = rec
            self._next_gen += 1
            if b in self._carried:
                self._use_carried(rec, self._carried.pop(b))
            else:
                self._submit_gen(rec)

    def _use_carried(self, rec: _Batch, carried: Carried) -> None:
        """A batch a checkpoint held: generated already (on ``carried.min_version``), to be scored."""
        now = self._clock()
        with self._cond:
            rec.min_version, rec.rollout, rec.gen_attempts = carried.min_version, carried.result, 1
            rec.versions = list(self._versions(carried.result)) if rec.student else []
            rec.generated = rec.tried = True
            rec.gen_first = rec.gen_start = rec.gen_end = now
        self._submit_score(rec)

    # ------------------------------------------------------------------------ stopping, checkpoints
    def stop(self, why: str) -> None:
        """Ask the run to stop (any thread, or a signal handler on the run thread): the current update
        finishes; the next wait raises :class:`Stopped` (``on_failure`` saves the last trained step)."""
        with self._cond:
            if not self._closed:
                self._fail(Stopped(self._state.next_batch, why))

    def in_flight(self, timeout_s: float | None = None) -> list[Carried]:
        """The batches after the resume point that were generated (a checkpoint keeps them: see
        :class:`Carried`), waiting up to ``timeout_s`` (None: until each has its answers, the run failed
        or was asked to stop) for those still being generated. Call on the run thread between steps, or
        from ``on_failure``."""
        self._settle(timeout_s)
        with self._cond:
            recs = sorted(self._batches.values(), key=lambda r: r.index)
            return [
                Carried(r.index, r.min_version, r.rollout)
                for r in recs
                if r.generated and r.index >= self._state.next_batch
            ]

    def _settle(self, timeout_s: float | None, *, through_stop: bool = False) -> None:
        """Wait until every submitted generation has its answers, or a failure (a stop too, unless
        ``through_stop``), or ``timeout_s``."""

        def settled() -> bool:
            failed = self._failure is not None and not (through_stop and isinstance(self._failure, Stopped))
            return failed or all(r.generated or r.given_up for r in self._batches.values())

        deadline = None if timeout_s is None else self._clock() + timeout_s
        while True:
            with self._cond:
                left = None if deadline is None else deadline - self._clock()
                if settled() or (left is not None and left <= 0):
                    return
                if self._idle is None:
                    self._cond.wait_for(settled, left)
                    continue
            self._idle()

    def _send(self, version: int) -> None:
        """Wait for the previous transfer, then call ``sync(version)``; runs on the trainer thread."""
        self._step_sync += self._wait(self._transfer_done, "wait_sync", version)
        t0 = self._clock()
        try:
            out = self._sync(version)
        except Exception as e:
            raise PhaseFailed("sync", version, e) from e
        t1 = self._clock()
        self._step_sync += t1 - t0
        with self._cond:
            self._spans.append(Span("sync", "trainer", version, t0, t1))
        if isinstance(out, Future):
            with self._cond:
                self._transfer = out
            run = self._run_id
            out.add_done_callback(lambda f: self._sync_done(f, version, t0, run))

    def _transfer_done(self) -> bool:
        return self._transfer is None or self._transfer.done()

    def _sync_done(self, fut: Future, version: int, issued: float, run: int) -> None:
        exc = _exception(fut)
        with self._cond:
            self._spans.append(Span("sync_transfer", "weights", version, issued, self._clock()))
            if exc is not None and not self._closed and run == self._run_id:
                self._fail(PhaseFailed("sync", version, exc))
            self._cond.notify_all()

    def _wait(self, ready: Callable[[], bool], name: str, batch: int) -> float:
        """Block the trainer thread until ``ready()``; raise a recorded failure; return the seconds waited."""
        t0 = self._clock()
        waited = False
        while True:
            with self._cond:
                if self._failure is not None:
                    raise self._failure
                if ready():
                    break
                waited = True
                if self._idle is None:
                    self._cond.wait_for(lambda: self._failure is not None or ready())
                    continue
            self._idle()
        t1 = self._clock()
        if waited:
            with self._cond:
                self._spans.append(Span(name, "trainer", batch, t0, t1))
        return t1 - t0

    def _close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    # ------------------------------------------------------------------- callbacks (any thread)
    def _fail(self, err: PhaseFailed) -> None:
        """Record the first failure; the trainer thread raises it at its next wait. Caller holds the lock."""
        if self._failure is None:
            self._failure = err
        self._cond.notify_all()

    def _submit_gen(self, rec: _Batch) -> None:
        with self._cond:
            if self._closed or rec.run != self._run_id:
                return
            rec.gen_attempts += 1
            rec.gen_start = self._clock()
            if rec.gen_attempts == 1:
                rec.gen_first = rec.gen_start
        try:
            fut = self._generate(rec.index, rec.min_version)
        except Exception as e:  # e.g. a request that cannot be encoded: an attempt like any other
            self._gen_done(rec, None, e)
            return
        fut.add_done_callback(lambda f: self._gen_done(rec, f, None))

    def _gen_done(self, rec: _Batch, fut: Future | None, exc: BaseException | None) -> None:
        now = self._clock()
        result, versions, fatal = None, [], False
        if fut is not None:
            exc = _exception(fut)
        if exc is None and not rec.student:
            result = fut.result()
        elif exc is None:
            result = fut.result()
            try:
                versions = list(self._versions(result))
                if not versions:
                    raise ValueError("the rollout returned no samples")
            except Exception as e:
                exc = e
            else:
                if min(versions) < rec.min_version:
                    fatal = True  # retrying cannot help: the service ignores min_version
                    exc = ValueError(
                        f"the rollout returned policy versions {sorted(set(versions))}, older than "
                        f"min_version={rec.min_version}: the rollout service did not honour min_version"
                    )
        with self._cond:
            ok, rec.tried = exc is None, True
            self._spans.append(
                Span("generate" if ok else "generate_failed", "rollout", rec.index, rec.gen_start, now)
            )
            if rec.run != self._run_id:
                return
            if ok:  # kept even after a stop: the stop's checkpoint carries it
                rec.rollout, rec.versions, rec.generated, rec.gen_end = result, versions, True, now
            elif self._closed or self._failure is not None:  # stopping: no retry
                rec.given_up = True
            self._cond.notify_all()
            if self._closed:
                return
            if not ok and (fatal or rec.gen_attempts > self.max_retries):
                self._fail(PhaseFailed("generate", rec.index, exc, rec.gen_attempts))
                return
            if rec.given_up:
                return
        if ok:
            self._submit_score(rec)
        else:
            self._submit_gen(rec)

    def _submit_score(self, rec: _Batch) -> None:
        with self._cond:
            if self._closed or rec.run != self._run_id:
                return
            rec.score_attempts += 1
            rec.score_start = self._clock()
            if rec.score_attempts == 1:
                rec.score_first = rec.score_start
        try:
            fut = self._score(rec.index, rec.rollout)
        except Exception as e:
            self._score_done(rec, None, e)
            return
        fut.add_done_callback(lambda f: self._score_done(rec, f, None))

    def _score_done(self, rec: _Batch, fut: Future | None, exc: BaseException | None) -> None:
        now = self._clock()
        if fut is not None:
            exc = _exception(fut)
        with self._cond:
            ok = exc is None
            self._spans.append(
                Span("score" if ok else "score_failed", "teacher", rec.index, rec.score_start, now)
            )
            if self._closed or rec.run != self._run_id:
                return
            if ok:
                rec.scored, rec.done, rec.score_end = fut.result(), True, now
                self._cond.notify_all()
                return
            if rec.score_attempts > self.max_retries:
                self._fail(PhaseFailed("score", rec.index, exc, rec.score_attempts))
                return
        self._submit_score(rec)


def _exception(fut: Future) -> BaseException | None:
    """The future's exception (a cancelled future counts as failed); ``fut`` must be done."""
    if fut.cancelled():
        return CancelledError("the request's future was cancelled")
    return fut.exception()
