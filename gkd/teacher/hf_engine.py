"""Teacher engine on a transformers causal LM (any ``AutoModelForCausalLM`` folder or a GGUF file).

Sequences are right-padded into batches under a token budget; the decoder runs once per batch and the
lm_head + log-softmax run only at the positions that predict response tokens (never at prompt
positions, never as full ``[batch, seq, vocab]`` logits).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from gkd.config.dtypes import torch_dtype
from gkd.data.vocab import real_vocab_size
from gkd.teacher.types import (
    LOGPROB_DTYPES,
    GenerateSettings,
    TeacherAnswer,
    TeacherOutput,
    check_prompts_for_generate,
    check_score_request,
    union_rows,
)


def plan_batches(lengths: Sequence[int], max_batch_tokens: int) -> list[list[int]]:
    """Group sequence indices (longest first) so each padded batch holds at most ``max_batch_tokens``
    tokens (batch size x longest length); a sequence longer than the budget gets a batch of its own."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches: list[list[int]] = []
    for i in order:
        if batches and lengths[batches[-1][0]] * (len(batches[-1]) + 1) <= max_batch_tokens:
            batches[-1].append(i)
        else:
            batches.append([i])
    return batches


def _static_steps(model, device: torch.device, wanted: bool | None):
    """The engine's static decode steps for ``generate`` (None: it decodes through the transformers model)."""
    from gkd.rollout.llama_decode import unsupported_reason
    from gkd.rollout.static_decode import StaticStepsCache, static_cache_default

    reason = unsupported_reason(model)
    if wanted and reason is not None:
        raise ValueError(f"static_cache=True: this model cannot use the static decode steps: {reason}")
    if wanted is None:
        wanted = reason is None and static_cache_default(device)
    return StaticStepsCache(model) if wanted else None


class HFTeacherEngine:
    """``score(sequences, top_k, temperature, requested_ids=None) -> list[TeacherOutput]`` and
    ``generate(prompts, settings, top_k, temperature) -> list[TeacherAnswer]`` with a transformers model.
    ``requested_ids`` (one ``[R, M]`` integer tensor per sequence): each row then covers the union of the
    top-k and those ids, gathered exactly from the same log-softmax.

    ``token_ids``: the real vocabulary (``len(tokenizer)``; None: every embedding row). Rows past it (an
    embedding padded to a multiple of 64 or 128) get log-prob -inf: never among the top-k, so a student
    whose embedding is padded less never receives an id it has no logit for.

    ``static_cache``: ``generate`` decodes Llama-family models through
    :class:`~gkd.rollout.static_decode.StaticLlamaSteps` (one CUDA graph replay per token on a GPU; None:
    on CUDA devices unless ``GKD_STATIC_CACHE=0``; on CPU, True runs the same steps eagerly)."""

    def __init__(
        self,
        model,
        *,
        dtype: str = "float32",
        device: str = "cpu",
        max_batch_tokens: int = 8192,
        max_top_k: int = 128,
        logprob_dtype: str = "float32",
        max_len: int | None = None,
        token_ids: int | None = None,
        static_cache: bool | None = None,
    ):
        if logprob_dtype not in LOGPROB_DTYPES:
            raise ValueError(f"logprob_dtype={logprob_dtype!r} is not one of {sorted(LOGPROB_DTYPES)}")
        self.model = model.eval()
        self.device = torch.device(device)
        self.dtype = torch_dtype(dtype)
        self.max_batch_tokens = int(max_batch_tokens)
        self.max_top_k = int(max_top_k)
        self.logprob_dtype = LOGPROB_DTYPES[logprob_dtype]
        config = model.config
        self.vocab_size = int(model.get_output_embeddings().weight.shape[0])
        self.token_ids = min(int(token_ids), self.vocab_size) if token_ids else self.vocab_size
        self.max_len = int(max_len or getattr(config, "max_position_embeddings", 4096))
        self.model_name = str(getattr(config, "_name_or_path", "") or type(model).__name__)
        self.static_steps = _static_steps(model, self.device, static_cache)

    @classmethod
    def from_pretrained(cls, path: str, *, gguf_file: str | None = None, dtype: str = "float32", **kwargs):
        from transformers import AutoModelForCausalLM

        extra = {"gguf_file": gguf_file} if gguf_file else {}
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype(dtype), **extra)
        model.to(kwargs.get("device", "cpu"))
        if not gguf_file and "token_ids" not in kwargs:  # the tokenizer's length, when shorter
            rows = int(model.get_output_embeddings().weight.shape[0])
            kwargs["token_ids"] = real_vocab_size(path, rows)
        return cls(model, dtype=dtype, **kwargs)

    def info(self) -> dict:
        return {
            "model": self.model_name,
            "vocab_size": self.vocab_size,
            "token_ids": self.token_ids,
            "max_top_k": self.max_top_k,
            "max_len": self.max_len,
            "engine": "hf",
        }

    @torch.inference_mode()
    def score(
        self,
        sequences: Sequence[tuple[Sequence[int], Sequence[int]]],
        top_k: int,
        temperature: float = 1.0,
        requested_ids: Sequence[torch.Tensor] | None = None,
        index_offset: int = 0,
    ) -> list[TeacherOutput]:
        check_score_request(self, sequences, top_k, temperature, requested_ids, index_offset)
        lengths = [len(p) + len(r) for p, r in sequences]
        outputs: list[TeacherOutput | None] = [None] * len(sequences)
        for batch in plan_batches(lengths, self.max_batch_tokens):
            wanted = None if requested_ids is None else torch.cat([requested_ids[i] for i in batch])
            for i, out in zip(
                batch,
                self._score_batch([sequences[i] for i in batch], top_k, temperature, wanted),
                strict=True,
            ):
                outputs[i] = out
        return outputs  # type: ignore[return-value]

    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        settings: GenerateSettings,
        top_k: int,
        temperature: float = 1.0,
        index_offset: int = 0,
    ) -> list[TeacherAnswer]:
        """Sample an answer per prompt (``settings``) and return it with the top-k rows a ``score`` of it
        would give at ``temperature``, from the same forward passes (``gkd.teacher.hf_generate``)."""
        from gkd.teacher.hf_generate import generate_answers

        if not 0 < temperature < float("inf"):
            raise ValueError(f"temperature={temperature} must be a positive finite number")
        check_prompts_for_generate(self, prompts, settings, top_k, index_offset)
        return generate_answers(self, prompts, settings, top_k, temperature, index_offset)

    def _score_batch(self, seqs, top_k: int, temperature: float, wanted=None) -> list[TeacherOutput]:
        width = max(len(p) + len(r) for p, r in seqs)
        ids = torch.zeros(len(seqs), width, dtype=torch.long)
        attn = torch.zeros(len(seqs), width, dtype=torch.long)
        rows, cols, targets, counts = [], [], [], []
        for b, (prompt, response) in enumerate(seqs):
            full = list(prompt) + list(response)
            ids[b, : len(full)] = torch.tensor(full)
            attn[b, : len(full)] = 1
            start = len(prompt) - 1  # the position that predicts response[0]
            rows.append(torch.full((len(response),), b))
            cols.append(torch.arange(start, start + len(response)))
            targets.append(torch.tensor(list(response)))
            counts.append(len(response))
        ids, attn = ids.to(self.device), attn.to(self.device)
        hidden = self.model.base_model(input_ids=ids, attention_mask=attn).last_hidden_state  # [B, T, H]
        rows_t, cols_t = torch.cat(rows).to(self.device), torch.cat(cols).to(self.device)
        selected = hidden[rows_t, cols_t]  # [sum R, H]
        logits = self.model.get_output_embeddings()(selected).float()  # [sum R, V]
        if temperature != 1.0:
            logits.div_(temperature)
        if self.token_ids < logits.shape[1]:  # padded embedding rows are no tokens
            logits[:, self.token_ids :] = float("-inf")
        logp = torch.log_softmax(logits, dim=-1)
        if wanted is None:
            top_lp, top_ids = logp.topk(top_k, dim=-1)
        else:  # [sum R, M] requested ids, in the same row order as the selected positions
            top_ids, top_lp = union_rows(logp, top_k, wanted)
        tok_lp = logp.gather(1, torch.cat(targets).to(self.device)[:, None])[:, 0]
        top_ids, top_lp, tok_lp = top_ids.int().cpu(), top_lp.to(self.logprob_dtype).cpu(), tok_lp.cpu()
        support = "topk" if wanted is None else "union"
        return [
            TeacherOutput(a, b, c, support)
            for a, b, c in zip(top_ids.split(counts), top_lp.split(counts), tok_lp.split(counts), strict=True)
        ]
