"""Where evaluations run and which record holds each (gkd.trainer.validation.Evaluations), on fake services
whose answers take a chosen number of step boundaries to come back; and the pipelined scoring of
PendingValidation."""

from concurrent.futures import Future
from types import SimpleNamespace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gkd.rollout.types import Sample
from gkd.trainer.validation import Evaluations, PendingValidation, evaluation_due


class FakePending:
    """Back after ``latency`` polls; records when it was measured."""

    def __init__(self, log, requested, latency):
        self.log, self.requested, self.left = log, requested, latency

    def poll(self):
        self.left -= 1
        return self.finish() if self.left <= 0 else None

    def finish(self):
        self.log.append(("measured", self.requested))
        return {"val/kl": float(self.requested)}


class FakeValidator:
    def __init__(self, latency):
        self.latency, self.log, self.done = latency, [], None

    def start(self, version, paced=False):
        assert paced  # beside training: one answer request at a time
        self.log.append(("started", self.done))
        return FakePending(self.log, self.done, self.latency)

    def run(self, version):
        self.log.append(("waited", self.done))
        return {"val/kl": float(self.done)}


def _run(total, freq, overlap, latency):
    v = FakeValidator(latency)
    ev = Evaluations(v, freq, total, overlap)
    versions, records = [], {}
    for done in range(1, total + 1):
        v.done = done
        m = ev.for_record(done, lambda d: versions.append(d) or d)
        if m:
            records[done] = m
    return v.log, records, versions


@settings(max_examples=300, deadline=None)
@given(total=st.integers(1, 30), freq=st.integers(1, 12), overlap=st.booleans(), latency=st.integers(1, 15))
def test_every_due_evaluation_lands_in_exactly_one_record(total, freq, overlap, latency):
    log, records, versions = _run(total, freq, overlap, latency)
    due = [d for d in range(1, total + 1) if evaluation_due(d, freq, total)]
    assert versions == due  # each due evaluation asked for its version once, at its due step
    # one record per evaluation, none before it was due, the requesting step recorded
    assert sorted(int(m["val/kl"]) for m in records.values()) == due
    for done, m in records.items():
        assert m["val/requested_step"] == m["val/kl"] - 1 and done >= m["val/kl"]
    assert records[total]["val/kl"] == total and ("waited", total) in log  # the final one, waited for
    if not overlap:
        assert all(kind == "waited" for kind, _ in log) and set(records) == set(due)


def test_the_demo_schedule_overlaps_the_mid_run_evaluation():
    log, records, _ = _run(total=24, freq=12, overlap=True, latency=2)
    assert log == [("started", 12), ("measured", 12), ("waited", 24)]
    assert records[14] == {"val/kl": 12.0, "val/requested_step": 11.0} and set(records) == {14, 24}
    log, records, _ = _run(total=24, freq=12, overlap=True, latency=50)  # still in flight near the end
    assert set(records) == {23, 24}  # waited for at the boundary before the final evaluation
    log, records, _ = _run(total=10, freq=1, overlap=True, latency=1)  # every step due: nothing overlaps
    assert set(records) == set(range(1, 11)) and all(kind == "waited" for kind, _ in log)


class FakeClient:
    def __init__(self, log, name):
        self.log, self.name, self.futures = log, name, []

    def submit(self, *args, **kwargs):
        fut = Future()
        self.futures.append(fut)
        self.log.append((self.name, len(self.futures) - 1))
        return fut


def _validator(log, requests=2):
    from gkd.config import Config
    from gkd.trainer.validation import Validator

    cfg = Config()
    cfg.data.val_batch_size = 2
    rollout, teacher = FakeClient(log, "answer"), FakeClient(log, "score")
    loss_calls = []
    prompts = [[i] for i in range(1, 2 * requests)]  # the last request holds one prompt
    v = Validator(cfg, prompts, rollout, teacher, lambda s, o: loss_calls.append(len(s)) or (6.0, 3))
    return v, rollout, teacher, loss_calls


def test_pending_validation_scores_each_request_as_it_comes_back():
    log = []
    v, rollout, teacher, loss_calls = _validator(log)
    pending = v.start(min_version=4)
    assert log == [("answer", 0), ("answer", 1)] and pending.poll() is None
    sample = Sample([1], [5], None, "stop", 4)
    rollout.futures[0].set_result([sample, sample])
    assert pending.poll() is None and log[-1] == ("score", 0)  # the first request scored, the second not back
    rollout.futures[1].set_result([sample])
    assert pending.poll() is None and log[-1] == ("score", 1)
    out = SimpleNamespace(token_logprobs=torch.zeros(1))
    teacher.futures[0].set_result([out, out])
    assert pending.poll() is None and not loss_calls
    teacher.futures[1].set_result([out])
    m = pending.poll()
    assert loss_calls == [3] and m["val/kl"] == pytest.approx(2.0) and m["val/policy_version"] == 4
    assert isinstance(pending, PendingValidation)


def test_paced_validation_sends_one_answer_request_at_a_time():
    log = []
    v, rollout, teacher, _ = _validator(log, requests=3)
    pending = v.start(min_version=0, paced=True)
    assert log == [("answer", 0)] and pending.poll() is None
    sample, out = Sample([1], [5], None, "stop", 0), SimpleNamespace(token_logprobs=torch.zeros(1))
    rollout.futures[0].set_result([sample, sample])
    assert pending.poll() is None and log[1:] == [("score", 0), ("answer", 1)]
    rollout.futures[1].set_result([sample, sample])
    teacher.futures[0].set_result([out, out])
    assert pending.poll() is None and log[3:] == [("score", 1), ("answer", 2)]
    rollout.futures[2].set_result([sample])
    for fut in teacher.futures[1:]:
        fut.set_result([out, out])
    # finish() answers what is left: the last request's score is set once it is sent
    teacher_submit = teacher.submit

    def answered(*args, **kwargs):
        fut = teacher_submit(*args, **kwargs)
        fut.set_result([out])
        return fut

    teacher.submit = answered
    m = pending.finish()
    assert log[5:] == [("score", 2)] and m["val/num_samples"] == 5
    log.clear()
    v.start(min_version=0, paced=False)  # waited for: every answer request at once
    assert [name for name, _ in log] == ["answer"] * 3


def test_val_kl_is_the_training_loss_per_token_on_answers_of_different_lengths():
    """``val/kl`` through the trainer's own evaluation (``Trainer.evaluate_on``) equals the training loss of
    the same weights on the same answers, normalised per response token (``accumulate_gradients``: loss
    sum over the global token count), on answers of 1, 4 and 9 tokens, where a per-sequence mean differs."""
    from gkd.config import Config
    from gkd.trainer.recipe import Trainer
    from gkd.trainer.step import accumulate_gradients, pack_micro_batches
    from gkd.trainer.validation import Validator
    from tests.test_trainer_step import teacher_outputs, tiny_llama

    g = torch.Generator().manual_seed(5)
    samples = [
        Sample([3, 4, 5], torch.randint(0, 60, (r,), generator=g).tolist(), torch.zeros(r), "length", 2)
        for r in (1, 4, 9)
    ]
    outputs = teacher_outputs(tiny_llama(1), samples)
    cfg = Config()
    trainer = Trainer(cfg)
    trainer.model, trainer.pad_id, trainer.device = tiny_llama(0), 0, torch.device("cpu")
    validator = Validator(cfg, [[1]], None, None, trainer.evaluate_on)
    got = validator.measure(samples, outputs, 0.0)

    micro = pack_micro_batches(samples, outputs, cfg.data.micro_batch_tokens)
    loss_sum, tokens = accumulate_gradients(trainer.model, micro, cfg.loss)
    assert tokens == 14
    assert got["val/kl"] == pytest.approx(loss_sum / tokens, rel=1e-6)
    assert abs(loss_sum / len(samples) - loss_sum / tokens) > 0.5 * loss_sum / tokens  # the test can fail
    assert got["val/response_len/mean"] == pytest.approx(14 / 3) and got["val/policy_version"] == 2
