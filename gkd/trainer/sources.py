"""Where each batch's answers come from: GKD's mixture of student and teacher answers (``loss.lmbda``).

Agarwal et al. ("On-Policy Distillation of Language Models", ICLR 2024) train on the student's own samples
for a fraction ``lmbda`` of the batches and on fixed answers for the rest: the teacher's own samples
(``loss.seq_kd: true``, sequence-level KD) or the dataset's reference answers (``seq_kd: false``, supervised
KD on ``data.response_key``). In both cases the teacher's top-k rows on the answer are the target.

- :func:`lmbda_at` / :func:`batch_source`: the draw, a pure function of (``trainer.seed``, batch index) and
  the schedule (``loss.lmbda_schedule``: ``constant`` or ``linear`` from ``loss.lmbda_start`` to
  ``loss.lmbda`` over ``loss.lmbda_steps`` batches), so a resumed run draws exactly what it would have;
- :class:`BatchSources`: the scheduler's ``generate`` and ``score`` phases per source. Student batches go to
  the rollout service (version-gated, scored by the teacher); teacher batches are one ``generate`` request
  to the teacher service, whose reply already holds the score rows (the score phase just hands them on);
  dataset batches are the tokenised reference answers, scored by the teacher.

Answers that the student did not sample have no behaviour log-probs: their ``response_logprobs`` are NaN,
which the importance-sampling correction reads as "weight 1" (``gkd.trainer.step.importance_weights``), and
their ``policy_version`` is -1 (the scheduler counts staleness on student batches only).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from concurrent.futures import Future

import torch

from gkd.config import rollout_seeded
from gkd.rollout.types import Sample, SamplingConfig

SOURCES = ("student", "teacher", "data")
NO_VERSION = -1  # the policy_version of answers the student did not sample


def lmbda_at(loss_cfg, batch: int) -> float:
    """The probability that batch ``batch`` is answered by the student."""
    if loss_cfg.lmbda_schedule == "linear" and loss_cfg.lmbda_steps > 0:
        frac = min(batch / loss_cfg.lmbda_steps, 1.0)
        return loss_cfg.lmbda_start + frac * (loss_cfg.lmbda - loss_cfg.lmbda_start)
    return float(loss_cfg.lmbda)


def uniform_draw(seed: int, batch: int) -> float:
    """A uniform number in [0, 1) that depends on (seed, batch) alone (no RNG state to checkpoint)."""
    digest = hashlib.sha256(f"gkd-lmbda:{int(seed)}:{int(batch)}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / float(1 << 64)


def batch_source(loss_cfg, seed: int, batch: int) -> str:
    """``student`` | ``teacher`` | ``data``: who answers batch ``batch``."""
    p = lmbda_at(loss_cfg, batch)
    if p >= 1.0 or uniform_draw(seed, batch) < p:
        return "student"
    return "teacher" if loss_cfg.seq_kd else "data"


def fixed_answer_sample(prompt: Sequence[int], response: Sequence[int], finish: str, source: str) -> Sample:
    """A :class:`Sample` for an answer the student did not sample (no behaviour log-probs: NaN)."""
    r = len(response)
    return Sample(
        list(prompt),
        list(response),
        torch.full((r,), float("nan")),
        finish,
        NO_VERSION,
        extra={"source": source},
    )


class AnsweredBatch(list):
    """A teacher batch: its samples (a list), with the teacher's rows already attached (``outputs``)."""

    outputs: list


def reference_answers(data_cfg, dataset, tokenizer, eos_id: int | None) -> list[list[int]]:
    """Token ids of ``data.response_key`` for every row of ``dataset`` (the prompt dataset: the same files
    in the same order), ending with ``eos_id``, cut to ``data.max_response_length``."""
    from dataclasses import replace

    from gkd.data.sources import DataError, read_source

    key = data_cfg.response_key
    out: list[list[int]] = []
    columns = []
    for source in dataset.inputs:  # the same sources, files and rows as the prompts, in order
        try:
            columns += read_source(replace(source, prompt_key=key))
        except DataError as e:
            raise DataError(
                f"{e} (data.response_key={key!r}: the reference answers for loss.seq_kd=false)"
            ) from e
    for where, values in columns:
        for i, v in enumerate(values):
            if not isinstance(v, str) or not v.strip():
                raise DataError(f"{where}, row {i}, column '{key}': expected a non-empty answer string")
        enc = tokenizer(values, add_special_tokens=False)["input_ids"]
        tail = [eos_id] if eos_id is not None else []
        out.extend((list(ids) + tail)[: data_cfg.max_response_length] for ids in enc)
    return out


class BatchSources:
    """The scheduler's ``generate(b, min_version)`` / ``score(b, answers)`` / ``source(b)`` for a run."""

    def __init__(self, cfg, loader, tokenizer, rollout, teacher):
        self.cfg, self.loader, self.rollout, self.teacher = cfg, loader, rollout, teacher
        self.eos = tokenizer.eos_token_id
        lo = cfg.loss
        self.mixed = lo.lmbda < 1 or (lo.lmbda_schedule == "linear" and lo.lmbda_start < 1)
        self.references = None
        if self.mixed and not lo.seq_kd:
            self.references = reference_answers(cfg.data, loader.dataset, tokenizer, self.eos)

    def source(self, b: int) -> str:
        return batch_source(self.cfg.loss, self.cfg.trainer.seed, b) if self.mixed else "student"

    def _seed(self, b: int) -> int:
        from gkd.data.prompts import batch_seed

        return batch_seed(self.cfg.trainer.seed, b, self.cfg.data.train_batch_size, self.cfg.rollout.n)

    def generate(self, b: int, min_version: int) -> Future:
        from gkd.data.prompts import repeat_prompts

        kind, cfg, n = self.source(b), self.cfg, self.cfg.rollout.n
        batch = self.loader.batch(b)
        prompts = repeat_prompts(batch.prompt_ids, n)
        if kind == "teacher":
            return self._teacher_answers(prompts, self._seed(b))
        if kind == "data":
            done: Future = Future()
            rows = [r for r in batch.rows for _ in range(n)]
            done.set_result(
                [
                    fixed_answer_sample(p, self.references[r], "stop", "data")
                    for p, r in zip(prompts, rows, strict=True)
                ]
            )
            return done
        sampling = SamplingConfig(
            max_new_tokens=cfg.rollout.max_new_tokens,
            temperature=cfg.rollout.temperature,
            top_p=cfg.rollout.top_p,
            stop_token_ids=(self.eos,) if self.eos is not None else (),
            # rollout.n: the copies of a prompt get distinct seeds (base + j); rollout.seeded: false = none
            seed=self._seed(b) if rollout_seeded(cfg) else None,
            return_topk=cfg.rollout.return_topk,
        )
        return self.rollout.submit(prompts, sampling, min_version=min_version)

    def _teacher_answers(self, prompts, seed: int) -> Future:
        from gkd.teacher.types import GenerateSettings

        cfg, g = self.cfg, self.cfg.teacher.generate
        settings = GenerateSettings(
            max_new_tokens=g.max_new_tokens or cfg.rollout.max_new_tokens,
            temperature=g.temperature,
            top_p=g.top_p,
            seed=seed,
            stop_token_ids=(self.eos,) if self.eos is not None else (),
        )
        reply = self.teacher.generate(prompts, settings, cfg.teacher.top_k, cfg.teacher.temperature)
        result: Future = Future()

        def done(f: Future) -> None:
            try:
                answers = f.result()
            except BaseException as e:  # the scheduler retries the phase
                result.set_exception(e)
                return
            batch = AnsweredBatch(
                fixed_answer_sample(p, a.response_ids, a.finish_reason, "teacher")
                for p, a in zip(prompts, answers, strict=True)
            )
            batch.outputs = [a.output for a in answers]
            result.set_result(batch)

        reply.add_done_callback(done)
        return result

    def score(self, b: int, samples) -> Future:
        if isinstance(samples, AnsweredBatch):  # the teacher's own answers: scored in the same pass
            done: Future = Future()
            done.set_result(samples.outputs)
            return done
        from gkd.trainer.step import union_request

        cfg = self.cfg
        pairs = [(s.prompt_ids, s.response_ids) for s in samples]
        student = samples and samples[0].policy_version != NO_VERSION
        wanted = union_request(samples) if cfg.loss.support == "union" and student else None
        return self.teacher.submit(pairs, cfg.teacher.top_k, cfg.teacher.temperature, requested_ids=wanted)


def required_metrics(staleness: int, mixed: bool) -> tuple[str, ...]:
    """The metrics every step record must hold: a mixed run's teacher batches have no staleness."""
    from gkd.metrics.records import metric_names

    names = metric_names(staleness)
    if not mixed:
        return names
    return tuple(n for n in names if not n.startswith("staleness") and n != "rollout/policy_version")


def source_of(samples) -> str:
    """The source of a batch's answers (``Sample.extra['source']``; student samples carry none)."""
    return samples[0].extra.get("source", "student") if samples else "student"
