"""Exact resume at k >= 1 and stopping on request, on the scheduler's discrete-event fake
(``tests.test_scheduler``): a checkpoint carries the batches generated for the next steps
(:meth:`Scheduler.in_flight`), so a resumed run trains every batch on the version an uninterrupted run
does; :meth:`Scheduler.stop` lets the current update finish and ends the run at the next wait."""

from __future__ import annotations

import pytest

from gkd.trainer.scheduler import Carried, SchedulerState, Stopped
from tests.test_scheduler import FakeSample, Harness

END = 12


def _versions(steps) -> dict[int, float]:
    return {s.batch: s.metrics["rollout/policy_version"] for s in steps}


def _interrupted(k: int, at: int, *, carry: bool) -> tuple[dict[int, float], list[int]]:
    """Train batches 0..at-1, checkpoint (with or without the in-flight batches), resume in a fresh
    scheduler with a fresh rollout worker holding version ``at``; the batch -> version map of both parts,
    and the batches the resumed run generated."""
    first = Harness(k, G=2, T=1.5, U=1, S=0.25)
    steps, carried = [], []
    run = first.sched.run(END)
    for step in run:
        steps.append(step)
        if step.batch == at - 1:
            carried = first.sched.in_flight() if carry else []
            break
    run.close()
    assert [c.batch for c in carried] == (list(range(at, at + k)) if carry else [])
    second = Harness(k, G=2, T=1.5, U=1, S=0.25)  # a fresh worker: the initial sync sends version `at`
    steps += list(second.sched.run(END, SchedulerState(at, at), carried))
    return _versions(steps), [b for b, *_ in second.rollout.log]


@pytest.mark.parametrize("k", [1, 2, 3])
def test_a_resume_with_the_carried_batches_trains_each_batch_on_the_uninterrupted_version(k):
    want = _versions(Harness(k, G=2, T=1.5, U=1, S=0.25).run(END))
    got, regenerated = _interrupted(k, at=5, carry=True)
    assert got == want
    assert regenerated == list(range(5 + k, END))  # the carried batches are not generated again
    # without them the first k batches after the resume all use the resumed version (not exact)
    loose, _ = _interrupted(k, at=5, carry=False)
    assert loose != want and all(loose[b] == 5 for b in range(5, 5 + k))


def test_carried_batches_older_than_k_are_generated_again():
    h = Harness(1)
    old = Carried(5, 3, [FakeSample(3), FakeSample(3)])  # two versions behind batch 5: over k = 1
    steps = list(h.sched.run(8, SchedulerState(5, 5), [old]))
    assert [s.batch for s in steps] == [5, 6, 7]
    assert [b for b, *_ in h.rollout.log] == [5, 6, 7]
    assert all(s.metrics["staleness/max"] <= 1 for s in steps)


def test_stop_during_an_update_finishes_it_and_ends_the_run_with_a_checkpoint():
    h = Harness(2, G=2, T=1.5, U=1, S=0.25, stop_grace_s=10.0)
    inner = h.update

    def update(b, rollout, scored):
        out = inner(b, rollout, scored)
        if b == 3:  # the signal arrives while batch 3 trains
            h.sched.stop("SIGTERM received")
        return out

    h.sched._update = update
    seen = []

    def on_failure(state, err):
        seen.append((state, type(err), h.sched.in_flight(timeout_s=0)))

    h.sched.on_failure = on_failure
    steps = []
    with pytest.raises(Stopped, match="SIGTERM received: the run stopped before batch 4"):
        for step in h.sched.run(END):
            steps.append(step.batch)
    assert steps == h.trained == [0, 1, 2, 3]
    state, kind, carried = seen[0]
    assert state == SchedulerState(4, 4) and kind is Stopped
    # the generations on their way when the stop came were let finish (stop_grace_s): both carried
    assert [(c.batch, c.min_version) for c in carried] == [(4, 2), (5, 3)]


def test_a_stop_ends_the_wait_of_a_periodic_checkpoint_for_the_in_flight_answers():
    h = Harness(2, G=5, T=1, U=1, S=0.25)
    run = h.sched.run(END)
    next(run)  # batch 0 trained; batches 1 and 2 are being generated
    h.sched.stop("SIGTERM received")
    now = h.sim.now
    carried = h.sched.in_flight()  # would otherwise run the clock on until both are generated
    assert h.sim.now == now and all(c.batch > 0 for c in carried)
    with pytest.raises(Stopped, match="before batch 1"):
        next(run)


def test_a_generation_that_fails_after_a_stop_is_not_retried():
    h = Harness(2, G=2, T=1, U=1, S=0.25, gen_fails={(2, 0)}, stop_grace_s=30.0)
    run = h.sched.run(END)
    next(run)  # batch 0 trained; batch 2's first attempt is on its way and will fail
    h.sched.stop("SIGTERM received")
    with pytest.raises(Stopped):
        next(run)
    assert h.rollout.attempts[2] == 1  # stopping: no retry of a failed generation
    assert h.sim.now < 30  # the stop's wait for answers ended when none was left to come
