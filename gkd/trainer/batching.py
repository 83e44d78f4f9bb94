"""Which samples each data-parallel rank trains on, and how they are packed into micro-batches.

    mine = deal(samples, world)[rank]  # balanced by sequence length, the same plan on every rank
    micro = pack_micro_batches([samples[i] for i in mine], [outputs[i] for i in mine], budget)

:func:`deal` splits a step's batch (every rank holds all of it: rank 0 broadcasts it) so that the ranks'
token counts are close; :func:`pack_micro_batches` packs one rank's share by a token budget. Ranks may still
pack different numbers of micro-batches: ``gkd.trainer.step.accumulate_gradients`` then pads the short
ones with :func:`zero_weight_micro_batch` (FSDP2 all-gathers every layer per forward and DDP all-reduces on
the last backward, so every rank must run as many forwards as its peers).
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from gkd.rollout.types import Sample
from gkd.teacher.types import TeacherOutput

__all__ = [
    "MicroBatch",
    "balanced_partition",
    "deal",
    "pack_micro_batches",
    "rank_micro_batches",
    "sequence_length",
    "zero_weight_micro_batch",
]


# ------------------------------------------------------------------------------------------ dealing


def balanced_partition(weights: Sequence[int], parts: int) -> list[list[int]]:
    """The indices of ``weights`` split into ``parts`` lists of near-equal weight sums, each list in
    increasing index order (some lists are empty when there are fewer weights than parts).

    Greedy longest-processing-time (Graham 1969): heaviest first (ties: lower index first), each to the
    part with the smallest sum so far (ties: fewer items, then the lower part). The heaviest part's sum is
    at most ``(4/3 - 1/(3 parts))`` times the optimum, and two parts differ by at most the largest weight.
    A function of ``weights`` alone: every rank computes the same plan without talking to the others.
    """
    if parts < 1:
        raise ValueError(f"parts={parts} must be >= 1")
    heap = [(0, 0, p) for p in range(parts)]  # (sum, items, part): heapq pops the lightest
    out: list[list[int]] = [[] for _ in range(parts)]
    for i in sorted(range(len(weights)), key=lambda i: (-weights[i], i)):
        total, n, p = heapq.heappop(heap)
        out[p].append(i)
        heapq.heappush(heap, (total + weights[i], n + 1, p))
    return [sorted(part) for part in out]


def sequence_length(s: Sample) -> int:
    """Tokens the forward runs over for ``s`` (``prompt + response - 1``); 0 for an empty response, which
    packing skips."""
    return len(s.prompt_ids) + len(s.response_ids) - 1 if s.response_ids else 0


def deal(samples: Sequence[Sample], world: int) -> list[list[int]]:
    """Batch indices of each of ``world`` data-parallel ranks, balanced by :func:`sequence_length` (the
    tokens each forward and backward runs over) with :func:`balanced_partition`. A batch smaller than the
    world leaves some ranks without samples (they run zero-weight micro-batches)."""
    return balanced_partition([sequence_length(s) for s in samples], world)


def rank_micro_batches(
    samples: Sequence[Sample],
    teacher_outputs: Sequence[TeacherOutput],
    rank: int,
    world: int,
    micro_batch_tokens: int,
    *,
    pad_id: int = 0,
) -> list[MicroBatch]:
    """Rank ``rank``'s micro-batches of the step: its :func:`deal` share packed by
    :func:`pack_micro_batches`."""
    mine = deal(samples, world)[rank]
    return pack_micro_batches(
        [samples[i] for i in mine], [teacher_outputs[i] for i in mine], micro_batch_tokens, pad_id=pad_id
    )


# ------------------------------------------------------------------------------------------ micro-batches


@dataclass
class MicroBatch:
    """Right-padded sequences plus everything the loss needs, flattened to response positions.

    Sequence b holds ``prompt + response[:-1]`` (the last response token predicts nothing we train on).
    Response token j of sequence b is predicted by the hidden state at ``(rows[n], cols[n])`` with
    ``cols = len(prompt) - 1 + j``; tokens are ordered sequence by sequence.
    """

    input_ids: torch.Tensor  # [B, L] int64, right-padded with pad_id
    attention_mask: torch.Tensor  # [B, L] int64, 1 on real tokens
    rows: torch.Tensor  # [N] int64, batch row of each response token
    cols: torch.Tensor  # [N] int64, position whose hidden state predicts it
    target_ids: torch.Tensor  # [N] int64, the sampled response tokens
    teacher_ids: torch.Tensor  # [N, K] int32 teacher top-k ids
    teacher_logprobs: torch.Tensor  # [N, K] float32; -inf marks an unused slot
    teacher_token_logprobs: torch.Tensor  # [N] float32, log p(target) under the teacher
    rollout_logprobs: torch.Tensor  # [N] float32, log mu(target) under the sampling policy
    sample_index: list[int]  # which of the packed samples, in row order
    response_lens: list[int]  # [B] response tokens per sequence
    # padding (see zero_weight_micro_batch): its forward and backward run, its loss counts 0 times
    zero_weight: bool = False

    @property
    def num_tokens(self) -> int:
        """Response tokens (loss terms) in this micro-batch; 0 for a zero-weight one."""
        return 0 if self.zero_weight else int(self.target_ids.shape[0])

    @property
    def padded_tokens(self) -> int:
        """B * L: what the budget bounds."""
        return int(self.input_ids.numel())

    def to(self, device: torch.device | str) -> MicroBatch:
        moved = {
            k: (v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v)
            for k, v in self.__dict__.items()
        }
        return MicroBatch(**moved)


def _check_pair(i: int, s: Sample, t: TeacherOutput) -> None:
    r = len(s.response_ids)
    if len(s.prompt_ids) == 0:
        raise ValueError(f"sample {i}: empty prompt (the first response token needs a context)")
    if t.num_tokens != r or t.token_logprobs.shape != (r,):
        raise ValueError(
            f"sample {i}: {r} response tokens but the teacher output has {t.num_tokens} rows and "
            f"{tuple(t.token_logprobs.shape)} token log-probs (teacher and rollout batches out of step?)"
        )
    if s.response_logprobs.shape != (r,):
        raise ValueError(
            f"sample {i}: response_logprobs has shape {tuple(s.response_logprobs.shape)}, expected ({r},)"
        )


def _build(idx: list[int], samples, teachers, k: int, pad_id: int) -> MicroBatch:
    lens = [len(samples[i].prompt_ids) + len(samples[i].response_ids) - 1 for i in idx]
    width = max(lens)
    input_ids = torch.full((len(idx), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(idx), width), dtype=torch.long)
    rows, cols, targets, t_ids, t_lp, t_tok, r_lp = [], [], [], [], [], [], []
    for b, i in enumerate(idx):
        s, t = samples[i], teachers[i]
        p, r = len(s.prompt_ids), len(s.response_ids)
        seq = torch.tensor(list(s.prompt_ids) + list(s.response_ids[:-1]), dtype=torch.long)
        input_ids[b, : lens[b]] = seq
        attention_mask[b, : lens[b]] = 1
        rows.append(torch.full((r,), b, dtype=torch.long))
        cols.append(torch.arange(p - 1, p - 1 + r, dtype=torch.long))
        targets.append(torch.tensor(list(s.response_ids), dtype=torch.long))
        ids, lp = t.padded(k)  # teachers answering with different K: unused (-inf) slots
        t_ids.append(ids)
        t_lp.append(lp)
        t_tok.append(t.token_logprobs.to(torch.float32))
        r_lp.append(s.response_logprobs.to(torch.float32))
    return MicroBatch(
        input_ids=input_ids,
        attention_mask=attention_mask,
        rows=torch.cat(rows),
        cols=torch.cat(cols),
        target_ids=torch.cat(targets),
        teacher_ids=torch.cat(t_ids),
        teacher_logprobs=torch.cat(t_lp),
        teacher_token_logprobs=torch.cat(t_tok),
        rollout_logprobs=torch.cat(r_lp),
        sample_index=list(idx),
        response_lens=[len(samples[i].response_ids) for i in idx],
    )


def pack_micro_batches(
    samples: Sequence[Sample],
    teacher_outputs: Sequence[TeacherOutput],
    micro_batch_tokens: int,
    *,
    pad_id: int = 0,
) -> list[MicroBatch]:
    """Split one rank's samples into micro-batches whose padded size ``B * L`` is at most
    ``micro_batch_tokens`` (``L`` = the longest ``prompt + response - 1`` in the micro-batch).

    Samples are sorted longest first and filled greedily, so sequences of similar length share a
    micro-batch (little padding); every response token appears in exactly one micro-batch. Samples with an
    empty response are skipped (they have no loss term). A single sequence longer than the budget is an
    error: raise ``data.micro_batch_tokens``.
    """
    if len(samples) != len(teacher_outputs):
        raise ValueError(f"{len(samples)} samples but {len(teacher_outputs)} teacher outputs")
    if micro_batch_tokens < 1:
        raise ValueError(f"micro_batch_tokens={micro_batch_tokens} must be >= 1")
    for i, (s, t) in enumerate(zip(samples, teacher_outputs, strict=True)):
        _check_pair(i, s, t)
    live = [i for i, s in enumerate(samples) if len(s.response_ids) > 0]
    if not live:
        return []
    k = max(int(teacher_outputs[i].topk_ids.shape[1]) for i in live)

    def length(i: int) -> int:
        return len(samples[i].prompt_ids) + len(samples[i].response_ids) - 1

    order = sorted(live, key=lambda i: (-length(i), i))
    if length(order[0]) > micro_batch_tokens:
        raise ValueError(
            f"sample {order[0]} has {length(order[0])} tokens, more than data.micro_batch_tokens="
            f"{micro_batch_tokens}; raise the budget to at least the longest prompt + response"
        )
    groups: list[list[int]] = []
    for i in order:
        # longest first: the group's width is its first member's length
        if groups and (len(groups[-1]) + 1) * length(groups[-1][0]) <= micro_batch_tokens:
            groups[-1].append(i)
        else:
            groups.append([i])
    return [_build(g, samples, teacher_outputs, k, pad_id) for g in groups]


def zero_weight_micro_batch(pad_id: int = 0) -> MicroBatch:
    """A one-token micro-batch whose loss is multiplied by 0: a rank with fewer micro-batches than its
    peers runs it so that every FSDP2 all-gather and DDP all-reduce has all its ranks. Token ``pad_id``
    predicts itself with teacher and rollout log-probs 0 (finite, so the zeroed loss has an exactly zero
    gradient: no 0 x inf); ``num_tokens`` is 0, so it adds nothing to the global token count."""
    one = torch.zeros(1, dtype=torch.long)
    return MicroBatch(
        input_ids=torch.full((1, 1), pad_id, dtype=torch.long),
        attention_mask=torch.ones((1, 1), dtype=torch.long),
        rows=one,
        cols=one.clone(),
        target_ids=torch.full((1,), pad_id, dtype=torch.long),
        teacher_ids=torch.full((1, 1), pad_id, dtype=torch.int32),
        teacher_logprobs=torch.zeros((1, 1)),
        teacher_token_logprobs=torch.zeros(1),
        rollout_logprobs=torch.zeros(1),
        sample_index=[],
        response_lens=[1],
        zero_weight=True,
    )
