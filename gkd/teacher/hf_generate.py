"""The transformers teacher's ``generate``: sample answers with a KV cache and keep, at every answer
position, the teacher's top-k and the sampled token's log-prob from the very logits it sampled from.

One forward per generated token serves both purposes, so an answer costs no second (scoring) pass. The
top-k rows are taken at the *scoring* temperature (``teacher.temperature``, what ``score`` would use),
the draw at the *generation* temperature and top-p (``teacher.generate.*``). Prompts are left-padded into
batches (positions from the attention mask, as transformers' own ``generate`` does); prompt ``i`` of a
request with a seed draws from its own generator seeded ``seed + i``, so answers do not depend on how the
prompts were batched. A row stops at its first stop token (kept in the answer) or after
``max_new_tokens``; the batch stops once every row has.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from gkd.rollout.hf_engine import sample_rows
from gkd.rollout.types import SamplingConfig
from gkd.services.transport.cancel import check_cancelled
from gkd.teacher.types import GenerateSettings, TeacherAnswer, TeacherOutput


def plan_prompt_batches(
    lengths: Sequence[int], max_new_tokens: int, max_batch_tokens: int
) -> list[list[int]]:
    """Consecutive prompt indices grouped so each batch's padded width x rows stays within the budget."""
    batches: list[list[int]] = []
    width = 0
    for i, n in enumerate(lengths):
        w = max(width, n + max_new_tokens)
        if batches and w * (len(batches[-1]) + 1) <= max_batch_tokens:
            batches[-1].append(i)
            width = w
        else:
            batches.append([i])
            width = n + max_new_tokens
    return batches


@torch.inference_mode()
def generate_answers(
    engine,
    prompts: Sequence[Sequence[int]],
    settings: GenerateSettings,
    top_k: int,
    temperature: float,
    index_offset: int = 0,
) -> list[TeacherAnswer]:
    """Answers to ``prompts`` with ``engine`` (an :class:`~gkd.teacher.hf_engine.HFTeacherEngine`)."""
    out: list[TeacherAnswer] = []
    lengths = [len(p) for p in prompts]
    for batch in plan_prompt_batches(lengths, settings.max_new_tokens, engine.max_batch_tokens):
        out.extend(
            _generate_batch(engine, [prompts[i] for i in batch], settings, top_k, temperature, batch[0])
        )
    return out


def _uniforms(gens, rows: int, greedy: bool, device: torch.device) -> torch.Tensor | None:
    """One uniform per row from the rows' CPU generators, on ``device`` (where the logits are)."""
    if greedy:
        return None
    if gens is None:
        return torch.rand(rows, dtype=torch.float64).to(device)
    return torch.cat([torch.rand(1, generator=g, dtype=torch.float64) for g in gens]).to(device)


def _generate_batch(engine, prompts, settings: GenerateSettings, top_k: int, temperature: float, first: int):
    from transformers import DynamicCache

    model, dev = engine.model, engine.device
    b, width, n = len(prompts), max(len(p) for p in prompts), settings.max_new_tokens
    ids = torch.zeros(b, width, dtype=torch.long)
    attn = torch.zeros(b, width, dtype=torch.long)
    for i, p in enumerate(prompts):  # left padding: every row's next token is predicted at the last column
        ids[i, width - len(p) :] = torch.tensor(list(p))
        attn[i, width - len(p) :] = 1
    ids, attn = ids.to(dev), attn.to(dev)
    pos = (attn.cumsum(-1) - 1).clamp_min(0)
    sampling = SamplingConfig(max_new_tokens=n, temperature=settings.temperature, top_p=settings.top_p)
    greedy = sampling.temperature == 0
    gens = None
    if settings.seed is not None and not greedy:
        gens = [torch.Generator().manual_seed(settings.seed + first + i) for i in range(b)]
    stop = torch.tensor(settings.stop_token_ids, dtype=torch.long) if settings.stop_token_ids else None
    head = model.get_output_embeddings()
    cache = DynamicCache()
    toks, tok_lp = torch.zeros(b, n, dtype=torch.long), torch.zeros(b, n)
    top_ids, top_lp = torch.zeros(b, n, top_k, dtype=torch.int32), torch.zeros(b, n, top_k)
    lengths = torch.full((b,), n, dtype=torch.long)
    live = torch.ones(b, dtype=torch.bool)
    step_ids, step_pos = ids, pos
    static, steps = getattr(engine, "static_steps", None), None  # gkd.rollout.static_decode, on a GPU
    for step in range(n):
        check_cancelled()  # the broker withdrew the request: stop here
        if steps is not None:  # one graph replay (after the prompt pass)
            logits = steps.step(step_ids[:, 0], step_pos, attn)
        else:
            hidden = model.base_model(
                input_ids=step_ids,
                attention_mask=attn,
                position_ids=step_pos,
                past_key_values=cache,
                use_cache=True,
            ).last_hidden_state[:, -1]
            logits = head(hidden).float()  # [B, V]
            if static is not None:  # the prompt pass filled the cache: the static steps take over
                steps = static.get(b, width + n).start(cache, attn)
        tok, _, _ = sample_rows(logits, sampling, _uniforms(gens, b, greedy, dev))
        scaled = logits / temperature if temperature != 1.0 else logits
        logp = torch.log_softmax(scaled, dim=-1)
        lp, ix = logp.topk(top_k, dim=-1)
        tok = tok.cpu()
        toks[:, step], tok_lp[:, step] = tok, logp.gather(1, tok.to(dev)[:, None])[:, 0].cpu()
        top_ids[:, step], top_lp[:, step] = ix.int().cpu(), lp.cpu()
        if stop is not None:
            hit = torch.isin(tok, stop) & live
            lengths = torch.where(hit, step + 1, lengths)
            live &= ~hit
            if not bool(live.any()):
                break
        attn = torch.cat([attn, attn.new_ones(b, 1)], dim=1)
        step_ids, step_pos = tok.to(dev)[:, None], step_pos[:, -1:] + 1
    answers = []
    for i in range(b):
        r = int(lengths[i])
        output = TeacherOutput(
            top_ids[i, :r].clone(), top_lp[i, :r].to(engine.logprob_dtype), tok_lp[i, :r].clone()
        )
        reason = (
            "stop" if int(toks[i, r - 1]) in settings.stop_token_ids else "length"
        )  # the first stop ends it
        answers.append(TeacherAnswer(toks[i, :r].tolist(), reason, output))
    return answers
