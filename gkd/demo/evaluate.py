"""Before/after evaluation of the demo's student on held-out prompts, in the demo's own process.

- on-policy: the student samples answers (the sampler and settings the rollout service uses), and the
  per-token KL(teacher || student) is measured over the full vocabulary on those answers;
- off-policy: the same measure on the teacher's greedy answers (the same answers before and after);
- both directions: KL(teacher || student) (forward) and KL(student || teacher) (reverse);
- the teacher's mean log-prob of the student's greedy answers (how plausible the teacher finds them).

Full-vocabulary KL is affordable here (a few thousand tokens); training itself only ever sees top-k.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from gkd.rollout.hf_engine import HFRolloutEngine
from gkd.rollout.types import SamplingConfig

Pair = tuple[list[int], list[int]]  # (prompt ids, response ids)


@dataclass
class KLResult:
    kl: float  # mean per-token KL(teacher || student), nats
    reverse_kl: float  # mean per-token KL(student || teacher), nats
    tokens: int  # response tokens measured
    answers: list[list[int]]  # the responses measured, one per prompt


def _batches(pairs: Sequence[Pair], max_tokens: int):
    """Consecutive groups of pairs whose padded size stays under ``max_tokens``."""
    group: list[Pair] = []
    width = 0
    for p in pairs:
        w = max(width, len(p[0]) + len(p[1]))
        if group and w * (len(group) + 1) > max_tokens:
            yield group
            group, w = [], len(p[0]) + len(p[1])
        group.append(p)
        width = w
    if group:
        yield group


@torch.no_grad()
def _response_logprobs(model, pairs: Sequence[Pair], pad_id: int) -> list[torch.Tensor]:
    """Full-vocabulary log-probs ``[R, V]`` at each response position, per pair (right padding)."""
    width = max(len(p) + len(r) for p, r in pairs)
    ids = torch.full((len(pairs), width), pad_id, dtype=torch.long)
    attn = torch.zeros_like(ids)
    for i, (p, r) in enumerate(pairs):
        ids[i, : len(p) + len(r)] = torch.tensor(p + r)
        attn[i, : len(p) + len(r)] = 1
    logits = model(input_ids=ids, attention_mask=attn).logits.float()
    return [
        torch.log_softmax(logits[i, len(p) - 1 : len(p) + len(r) - 1], -1) for i, (p, r) in enumerate(pairs)
    ]


@torch.no_grad()
def token_kl(teacher, student, pairs: Sequence[Pair], *, pad_id: int, max_tokens: int = 4096) -> KLResult:
    """Mean over response tokens of KL(teacher || student) = sum_v p_t(v) (log p_t(v) - log p_s(v)), and of
    the reverse KL(student || teacher)."""
    total, reverse, count = 0.0, 0.0, 0
    kept = [(p, r) for p, r in pairs if r]
    for group in _batches(kept, max_tokens):
        for lt, ls in zip(
            _response_logprobs(teacher, group, pad_id),
            _response_logprobs(student, group, pad_id),
            strict=True,
        ):
            total += float((lt.exp() * (lt - ls)).sum())
            reverse += float((ls.exp() * (ls - lt)).sum())
            count += lt.shape[0]
    n = max(count, 1)
    return KLResult(kl=total / n, reverse_kl=reverse / n, tokens=count, answers=[list(r) for _, r in pairs])


@torch.no_grad()
def teacher_logprob(teacher, pairs: Sequence[Pair], *, pad_id: int, max_tokens: int = 4096) -> float:
    """Mean over response tokens of the teacher's log-prob of each token (nats; higher is better)."""
    total, count = 0.0, 0
    for group in _batches([(p, r) for p, r in pairs if r], max_tokens):
        for lt, (_, r) in zip(_response_logprobs(teacher, group, pad_id), group, strict=True):
            total += float(lt.gather(1, torch.tensor(r)[:, None]).sum())
            count += len(r)
    return total / max(count, 1)


def generate(
    model,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    temperature: float,
    seed: int,
    stop: Sequence[int],
    pad_id: int,
) -> list[list[int]]:
    """Answers from ``model`` with the rollout service's sampler (``temperature=0``: greedy)."""
    engine = HFRolloutEngine(model, pad_token_id=pad_id, max_batch_size=32)
    sampling = SamplingConfig(
        max_new_tokens=max_new_tokens, temperature=temperature, stop_token_ids=tuple(stop), seed=seed
    )
    return [s.response_ids for s in engine.generate([list(p) for p in prompts], sampling)]


def evaluate(
    teacher,
    student,
    prompts: Sequence[Sequence[int]],
    teacher_answers: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    temperature: float,
    seed: int,
    stop: Sequence[int],
    pad_id: int,
) -> dict[str, KLResult]:
    """``{"on_policy": ..., "off_policy": ...}`` for ``student`` on held-out ``prompts``."""
    own = generate(
        student,
        prompts,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        seed=seed,
        stop=stop,
        pad_id=pad_id,
    )
    on = token_kl(teacher, student, list(zip(map(list, prompts), own, strict=True)), pad_id=pad_id)
    off_pairs = list(zip(map(list, prompts), map(list, teacher_answers), strict=True))
    off = token_kl(teacher, student, off_pairs, pad_id=pad_id)
    return {"on_policy": on, "off_policy": off}
