"""Periodic validation: the current policy answers held-out prompts through the rollout service, the teacher
scores the answers, and the trainer measures its training loss on them (no gradient).

    prompts = val_prompts(cfg, tokenizer)                       # data.val_files, data.val_max_samples
    validator = Validator(cfg, prompts, rollout, teacher, loss_fn, eos_id=tokenizer.eos_token_id)
    if evaluation_due(done, cfg.trainer.test_freq, total):
        metrics.update(validator.run(min_version=last_sent))   # val/kl, val/teacher_token_logprob, ...

How it interleaves with the scheduler (``gkd/trainer.py``): the evaluation runs on the trainer thread after
the update of the step it reports (``val/*`` sit in that step's record), while the scheduler's generation
and scoring requests of later batches stay in flight: the rollout and teacher services take the
validation requests in turn with those, and the trainer starts the next update once the evaluation is back.
The pipeline stalls for the evaluation's own time only. Staleness: the answers come from the newest
version the trainer has sent to the rollout (``min_version`` = that version), which with staleness ``k``
trails the trainer's weights by up to ``k`` updates (``val/policy_version`` says which), while ``val/kl``
is measured with the trainer's current weights on those answers. The final evaluation (after the last
step) first sends the final weights, so it measures the exported student on its own answers.

Sampling settings ``val.*`` (greedy by default, a fixed seed): consecutive evaluations answer the same
prompts the same way up to the policy's change, so the curve is comparable step to step. Resume-safe:
which steps evaluate is a function of the step, and the records are rewritten with the metrics on resume.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence

from gkd.rollout.types import Sample, SamplingConfig
from gkd.teacher.types import TeacherOutput

__all__ = ["Validator", "evaluation_due", "val_prompts"]


def evaluation_due(done: int, test_freq: int, total: int) -> bool:
    """After ``done`` trained steps: every ``test_freq`` steps and after the last one (0 = never)."""
    return test_freq > 0 and done > 0 and (done % test_freq == 0 or done == total)


def val_prompts(cfg, tokenizer) -> list[list[int]]:
    """Token ids of the validation prompts: ``data.val_files`` rendered like the training prompts, the
    first ``data.val_max_samples`` of them (file order, not shuffled: the same prompts every time)."""
    from gkd.data import PromptDataset

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
            stop_token_ids=(eos_id,) if eos_id is not None else (),
            seed=v.seed,
            return_topk=cfg.rollout.return_topk,
        )
        self.batch = cfg.data.val_batch_size or cfg.data.train_batch_size

    def answer(self, min_version: int | None) -> tuple[list[Sample], list[TeacherOutput]]:
        """Every prompt answered (requests of ``data.val_batch_size``, all in flight together) and scored,
        each request's answers sent for scoring as soon as they are back (the teacher scores one while the
        rollout answers the next). Seeds: prompt ``i`` of the set always samples with ``val.seed + i``."""
        from gkd.trainer_step import union_request

        gens = []
        for start in range(0, len(self.prompts), self.batch):
            chunk = self.prompts[start : start + self.batch]
            sampling = dataclasses.replace(self.sampling, seed=self.sampling.seed + start)
            gens.append(self.rollout.submit(chunk, sampling, min_version=min_version))
        union = self.cfg.loss.support == "union"
        samples, scores = [], []
        for fut in gens:
            part = fut.result()
            samples += part
            pairs = [(s.prompt_ids, s.response_ids) for s in part]
            scores.append(
                self.teacher.submit(
                    pairs,
                    self.cfg.teacher.top_k,
                    self.cfg.teacher.temperature,
                    requested_ids=union_request(part) if union else None,
                )
            )
        outputs = [o for fut in scores for o in fut.result()]
        return samples, outputs

    def run(self, min_version: int | None = None) -> dict[str, float]:
        """One evaluation: ``val/kl`` (the training loss per response token), ``val/teacher_token_logprob``
        (the teacher's mean log-prob of the student's tokens), ``val/response_len/mean``,
        ``val/policy_version`` (the version that answered), ``val/num_samples``, ``val/wall_s``."""
        t0 = time.perf_counter()
        samples, outputs = self.answer(min_version)
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


def eval_loss(model, micro_batches, cfg, device) -> tuple[float, int]:
    """(loss sum, tokens) of the training loss over ``micro_batches`` without a gradient, on this rank's
    model as it is (a DDP replica unwrapped by the caller; an FSDP2 module on every rank)."""
    import torch

    from gkd.trainer_step import _sampling_temperature, autocast_dtype, loss_on_micro_batch

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
