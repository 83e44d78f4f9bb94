"""Periodic validation: the current policy answers held-out prompts through the rollout service, the teacher
scores the answers, and the trainer measures its training loss on them (no gradient).

    prompts = val_prompts(cfg, tokenizer)                       # data.val_files, data.val_max_samples
    validator = Validator(cfg, prompts, rollout, teacher, loss_fn, eos_id=tokenizer.eos_token_id)
    if evaluation_due(done, cfg.trainer.test_freq, total):
        metrics.update(validator.run(min_version=last_sent))   # val/kl, val/teacher_token_logprob, ...
    pending = validator.start(min_version=last_sent)            # or in flight: pending.poll() / .finish()

How it interleaves with the scheduler (``gkd/trainer/recipe.py``), with ``val.overlap`` (default): an
evaluation due after step ``s`` is *requested* then (:meth:`Validator.start`) and runs beside training: the
rollout and teacher services take its requests in turn with the scheduler's, and the trainer keeps updating.
At each later step boundary the trainer polls it; once every score is back it measures the loss with its
weights of that step, and ``val/*`` go into that step's record (``val/requested_step`` = ``s``). It waits for
an evaluation still in flight at the next due step, and at the step before the last, so that the last step's
record holds the final evaluation alone; the final evaluation (after the last step), the one before training,
and any due too close to the end for a boundary in between are waited for (the pipeline stalls for their
time). ``val.overlap: false`` waits for every evaluation at its due step, whose record then holds it.
Staleness: the answers come from the newest version the trainer has sent to the rollout (``min_version`` =
that version), which trails the trainer's weights by up to ``k`` updates, plus the steps the evaluation spent
in flight when overlapped (``val/policy_version`` says which), while ``val/kl`` is measured with the trainer's
weights at measurement. The final evaluation first sends the final weights, so it measures the exported
student on its own answers.

Sampling settings ``val.*`` (greedy by default, a fixed seed): consecutive evaluations answer the same
prompts the same way up to the policy's change, so the curve is comparable step to step. Resume-safe:
which steps evaluate is a function of the step, and the records are rewritten with the metrics on resume.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future

from gkd.data.vocab import stop_token_ids
from gkd.rollout.types import Sample, SamplingConfig
from gkd.teacher.types import TeacherOutput

__all__ = ["Evaluations", "PendingValidation", "Validator", "evaluation_due", "val_prompts"]


def evaluation_due(done: int, test_freq: int, total: int) -> bool:
    """After ``done`` trained steps: every ``test_freq`` steps and after the last one (0 = never)."""
    return test_freq > 0 and done > 0 and (done % test_freq == 0 or done == total)


def val_prompts(cfg, tokenizer) -> list[list[int]]:
    """Token ids of the validation prompts: ``data.val_files`` rendered like the training prompts, the
    first ``data.val_max_samples`` of them (file order, not shuffled: the same prompts every time)."""
    from gkd.data.prompts import PromptDataset

    ds = PromptDataset.from_config(cfg.data, tokenizer, split="val")
    n = len(ds) if cfg.data.val_max_samples is None else min(len(ds), cfg.data.val_max_samples)
    return [ds[i] for i in range(n)]


class Validator:
    """Answers, scores and measures the validation prompts; :meth:`run` returns the ``val/*`` metrics.

    ``loss_fn(samples, teacher_outputs) -> (loss sum, tokens)``: the training loss on those answers without
    a gradient (the trainer's; with FSDP2 every rank takes part)."""

    def __init__(
        self,
        cfg,
        prompts: Sequence[Sequence[int]],
        rollout,
        teacher,
        loss_fn: Callable[[list[Sample], list[TeacherOutput]], tuple[float, int]],
        *,
        eos_id: int | None = None,
    ):
        if not prompts:
            raise ValueError("no validation prompts (data.val_files)")
        self.cfg, self.prompts = cfg, [list(p) for p in prompts]
        self.rollout, self.teacher, self.loss_fn = rollout, teacher, loss_fn
        v = cfg.val
        self.sampling = SamplingConfig(
            max_new_tokens=v.max_new_tokens or cfg.rollout.max_new_tokens,
            temperature=v.temperature,
            top_p=v.top_p,
            # the tokenizer's eos and every generation-config eos id of the student (end-of-turn tokens)
            stop_token_ids=stop_token_ids(cfg.model.student_path, eos_id),
            seed=v.seed,
            return_topk=cfg.rollout.return_topk,
        )
        self.batch = cfg.data.val_batch_size or cfg.data.train_batch_size

    @property
    def requests(self) -> int:
        """Answer requests per evaluation (``data.val_batch_size`` prompts each)."""
        return -(-len(self.prompts) // self.batch)

    def submit_answer(self, i: int, min_version: int | None) -> Future:
        """Answer request ``i``. Seeds: prompt ``j`` of the set always samples with ``val.seed + j``."""
        start = i * self.batch
        sampling = dataclasses.replace(self.sampling, seed=self.sampling.seed + start)
        return self.rollout.submit(
            self.prompts[start : start + self.batch], sampling, min_version=min_version
        )

    def submit_scores(self, samples: list[Sample]) -> Future:
        """The teacher request scoring one answer request's samples."""
        from gkd.trainer.step import union_request

        return self.teacher.submit(
            [(s.prompt_ids, s.response_ids) for s in samples],
            self.cfg.teacher.top_k,
            self.cfg.teacher.temperature,
            requested_ids=union_request(samples) if self.cfg.loss.support == "union" else None,
        )

    def start(self, min_version: int | None = None, *, paced: bool = False) -> PendingValidation:
        """An evaluation in flight, measured by the :class:`PendingValidation`. ``paced``: one answer request
        at a time (the next one sent when the previous is back, at a poll), so that beside training the
        rollout serves the scheduler's requests in between instead of a whole evaluation ahead of them."""
        return PendingValidation(self, min_version, paced)

    def run(self, min_version: int | None = None) -> dict[str, float]:
        """One evaluation, waited for: ``val/kl`` (the training loss per response token),
        ``val/teacher_token_logprob`` (the teacher's mean log-prob of the student's tokens),
        ``val/response_len/mean``, ``val/policy_version`` (the version that answered), ``val/num_samples``,
        ``val/wall_s`` (request to measurement)."""
        return self.start(min_version).finish()

    def measure(self, samples: list[Sample], outputs: list[TeacherOutput], t0: float) -> dict[str, float]:
        """The ``val/*`` metrics of scored answers, the loss with the trainer's weights as they are now."""
        loss_sum, tokens = self.loss_fn(samples, outputs)
        teacher_lp = sum(float(o.token_logprobs.float().sum()) for o in outputs)
        n_resp = sum(len(s.response_ids) for s in samples)
        return {
            "val/kl": loss_sum / max(tokens, 1),
            "val/teacher_token_logprob": teacher_lp / max(n_resp, 1),
            "val/response_len/mean": n_resp / len(samples),
            "val/policy_version": float(min(s.policy_version for s in samples)),
            "val/num_samples": float(len(samples)),
            "val/wall_s": time.perf_counter() - t0,
        }


class PendingValidation:
    """An evaluation in flight. Each answer request, once back, is sent to the teacher (the teacher scores
    one while the rollout answers the next); :meth:`poll` (never waits) returns the metrics once every
    score is back, :meth:`finish` waits for them (sending every answer request still unsent at once). The
    loss is measured when either returns them."""

    def __init__(self, validator: Validator, min_version: int | None, paced: bool = False):
        self.validator, self.min_version, self.t0 = validator, min_version, time.perf_counter()
        self.gens: list[Future] = []
        self.answers: list[list[Sample]] = []
        self.scores: list[Future] = []
        self._send(1 if paced else validator.requests)

    def _send(self, upto: int) -> None:
        while len(self.gens) < min(upto, self.validator.requests):
            self.gens.append(self.validator.submit_answer(len(self.gens), self.min_version))

    def _advance(self, wait: bool) -> bool:
        """Send each answered request for scoring, in order, and (paced) the next answer request; True when
        every score is back (or waited for)."""
        if wait:
            self._send(self.validator.requests)
        while len(self.scores) < self.validator.requests:
            fut = self.gens[len(self.scores)]
            if not wait and not fut.done():
                return False
            self.answers.append(fut.result())
            self.scores.append(self.validator.submit_scores(self.answers[-1]))
            self._send(len(self.scores) + 1)
        return wait or all(f.done() for f in self.scores)

    def poll(self) -> dict[str, float] | None:
        return self._measure() if self._advance(wait=False) else None

    def finish(self) -> dict[str, float]:
        self._advance(wait=True)
        return self._measure()

    def _measure(self) -> dict[str, float]:
        samples = [s for part in self.answers for s in part]
        outputs = [o for fut in self.scores for o in fut.result()]
        return self.validator.measure(samples, outputs, self.t0)


class Evaluations:
    """Which evaluations run when, and which step's record holds each (at most one per record).

    Due after every ``test_freq`` steps and after the last (:func:`evaluation_due`). With ``overlap`` a
    due evaluation starts and runs beside training (paced: one answer request at a time) when the next
    step is neither the last nor due itself; it is polled at each later boundary and waited for at the
    next due step, or at the boundary before an evaluation that is waited for (so that no record needs
    two). Otherwise (the final evaluation; overlap off; a due step followed by another) it is waited for
    at its due step."""

    def __init__(self, validator: Validator, test_freq: int, total: int, overlap: bool):
        self.validator, self.test_freq, self.total, self.overlap = validator, test_freq, total, overlap
        self.pending: tuple[int, PendingValidation] | None = None  # (requested after step, evaluation)

    def due(self, done: int) -> bool:
        return evaluation_due(done, self.test_freq, self.total)

    def can_overlap(self, done: int) -> bool:
        return self.overlap and done + 1 < self.total and not self.due(done + 1)

    def for_record(self, done: int, version: Callable[[int], int]) -> dict[str, float]:
        """The ``val/*`` metrics of the record of the step that made ``done`` steps (possibly none), with
        ``val/requested_step``. ``version(done)``: the policy version a starting evaluation asks for."""
        m: dict[str, float] = {}
        if self.pending is not None:
            requested, pending = self.pending
            nxt = done + 1
            wait = self.due(done) or nxt >= self.total or (self.due(nxt) and not self.can_overlap(nxt))
            got = pending.finish() if wait else pending.poll()
            if got is not None:
                m = {**got, "val/requested_step": float(requested)}
                self.pending = None
        if not self.due(done):
            return m
        if self.can_overlap(done):
            self.pending = (done - 1, self.validator.start(version(done), paced=True))
            return m
        return {**m, **self.validator.run(version(done)), "val/requested_step": float(done - 1)}


def eval_loss(model, micro_batches, cfg, device) -> tuple[float, int]:
    """(loss sum, tokens) of the training loss over ``micro_batches`` without a gradient, on this rank's
    model as it is (a DDP replica unwrapped by the caller; an FSDP2 module on every rank)."""
    import torch

    from gkd.trainer.step import _sampling_temperature, autocast_dtype, loss_on_micro_batch

    total, tokens = 0.0, 0
    with torch.no_grad():
        for mb in micro_batches:
            loss, n = loss_on_micro_batch(
                model,
                mb.to(device),
                cfg.loss,
                compute_dtype=autocast_dtype(model, cfg, device),
                chunk_bytes=cfg.loss.chunk_bytes,
                behaviour_temperature=_sampling_temperature(cfg),
            )
            total += float(loss)
            tokens += n
    return total, tokens
