"""CPU/transformers rollout engine: batched sampling with a KV cache.

An own decoding loop rather than ``model.generate``: it needs per-prompt seeded generators (results must
not depend on batching), the sampled tokens' log-probs under softmax(logits / T) before truncation, and
it drops finished rows from the batch and the cache once half of them have finished.

The loop is built to stay near the cost of streaming the weights once per step (bench/bench_generation.py):
tokens, log-probs and top ids stay on the device in ``[B, max_new_tokens]`` buffers and reach the host once,
at the end; sampling is one inverse-CDF draw per row (a single uniform from the row's generator, not one
random number per vocabulary entry); Llama-family models run their decode steps through
:class:`~gkd.rollout.llama_decode.FusedLlamaSteps` (fused q/k/v and gate/up products on oneDNN-packed
weights, a few operations per layer); other models run them through transformers, with the large float32
``nn.Linear`` weights reordered once into oneDNN's blocked layout on CPU (:class:`PackedLinears`).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterable, Sequence

import torch
import torch.nn.functional as F

from gkd.data.vocab import has_tokenizer, load_tokenizer, stop_token_ids
from gkd.rollout.llama_decode import (
    FusedLlamaSteps,
    FusedWeights,
    in_packed_rows,
    pack_weight,
    packed_linear,
    packing_available,
    packing_for,
    unsupported_reason,
)
from gkd.rollout.static_decode import StaticStepsCache, static_cache_default
from gkd.rollout.types import Sample, SamplingConfig, check_named_tensors, check_prompts
from gkd.services.transport.cancel import check_cancelled

TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
#: Weights with fewer elements stay on ``F.linear``: packing gains nothing measurable for them at decode
#: batch sizes (the demo student's 192 x 576 K/V projections; its 576 x 576 Q/O ones do gain).
PACK_MIN_NUMEL = 1 << 18
#: Block width of the two-level inverse CDF used to sample (:func:`inverse_cdf`).
CDF_BLOCK = 256


def filter_logits(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Set logits outside the top-k and outside the top-p nucleus to -inf. ``logits``: [B, V], scaled."""
    if top_k and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        srt, idx = logits.sort(dim=-1, descending=True)
        probs = srt.softmax(-1)
        # drop a token when the mass strictly before it already reaches top_p (the first is always kept)
        drop = (probs.cumsum(-1) - probs) >= top_p
        logits = logits.masked_fill(drop.scatter(1, idx, drop), float("-inf"))
    return logits


def sample_rows(
    logits: torch.Tensor, s: SamplingConfig, uniforms: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Next tokens [B], their log-probs [B] float32 under softmax(logits / T) (T = 1 when greedy) and the
    log normalisers [B] float64 (non-finite when the logits were).

    ``logits``: [B, V] float32. ``uniforms``: [B] float64 in [0, 1), one per row (None when greedy): row i
    takes the token where ``uniforms[i]`` falls in its cumulative distribution (after top-k/top-p), i.e. an
    exact draw from the filtered distribution that depends on that row's logits and uniform alone.
    """
    if s.temperature == 0:
        tok = logits.argmax(-1)
        lse = logits.logsumexp(-1).double()
        return tok, (logits.gather(1, tok[:, None])[:, 0] - lse).float(), lse
    scaled = logits / s.temperature if s.temperature != 1 else logits
    peak = scaled.amax(-1, keepdim=True)  # [B, 1]
    weights = (scaled - peak).exp_()  # [B, V] unnormalised probabilities, the largest 1
    if s.top_k or s.top_p < 1.0:
        lse = peak[:, 0].double() + weights.sum(-1, dtype=torch.float64).log()
        weights = weights.masked_fill_(filter_logits(scaled, s.top_k, s.top_p) == float("-inf"), 0.0)
        tok, _ = inverse_cdf(weights, uniforms)
    else:
        tok, total = inverse_cdf(weights, uniforms)
        lse = peak[:, 0].double() + total.log()
    return tok, (scaled.gather(1, tok[:, None])[:, 0].double() - lse).float(), lse


def inverse_cdf(weights: torch.Tensor, uniforms: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row, the first index where the running sum of ``weights`` exceeds ``uniforms`` x the row's total,
    and that total [B] float64. ``weights``: [B, V] >= 0, each row with a positive total.

    Two levels instead of a float64 cumsum over the vocabulary (the costliest part of a decode step's
    sampling): sums of ``CDF_BLOCK``-wide blocks pick the block, a cumsum inside that block picks the index.
    Targets are kept strictly below each level's total, so the chosen index always has a non-zero weight.
    """
    b, v = weights.shape
    nb = -(-v // CDF_BLOCK)
    if nb * CDF_BLOCK != v:  # zero weights pad the last block; they are never chosen
        weights = F.pad(weights, (0, nb * CDF_BLOCK - v))
    blocks = weights.view(b, nb, CDF_BLOCK)
    cdf = F.pad(blocks.sum(-1).double().cumsum(-1), (1, 0))  # [B, nb + 1], cdf[:, k] = mass before block k
    total = cdf[:, -1:]
    target = torch.minimum(uniforms[:, None] * total, _below(total))  # [B, 1]
    blk = (torch.searchsorted(cdf, target, right=True) - 1).clamp_(0, nb - 1)  # [B, 1]
    inner = blocks.gather(1, blk[:, :, None].expand(b, 1, CDF_BLOCK))[:, 0].cumsum(-1, dtype=torch.float64)
    rest = torch.minimum(target - cdf.gather(1, blk), _below(inner[:, -1:])).clamp_min_(0)
    j = torch.searchsorted(inner, rest, right=True).clamp_max_(CDF_BLOCK - 1)
    # the clamp only matters for NaN weights (the caller reports those): the padding is never chosen
    return (blk * CDF_BLOCK + j)[:, 0].clamp_max_(v - 1), total[:, 0]


def _below(x: torch.Tensor) -> torch.Tensor:
    """The largest float below ``x`` (elementwise)."""
    return torch.nextafter(x, torch.zeros_like(x))


class PackedLinears:
    """oneDNN-packed copies of a model's large float32 ``nn.Linear`` weights, used while :meth:`active`.

    MKL's GEMM repacks the weight on every call; for the decode steps' few rows that repacking costs about
    as much as the product (the weights are streamed ~twice). Packed once here, a decode step reads each
    weight once. A copy is remade when its weight changes: ``load_weights`` drops them all, and any other
    in-place torch update moves the tensor's version counter; a write that bypasses it (through ``.data``,
    or native code writing into the storage) must call :meth:`invalidate`. The copies cost the weights'
    size in memory. Other layers, other dtypes and inputs outside ``PACKED_ROWS`` run ``F.linear`` as before.
    """

    def __init__(self, model: torch.nn.Module, enabled: bool):
        self.modules = []
        if enabled:
            self.modules = [
                m
                for m in model.modules()
                if type(m) is torch.nn.Linear
                and m.weight.dtype == torch.float32
                and m.weight.device.type == "cpu"
                and m.weight.numel() >= PACK_MIN_NUMEL
            ]
        self._packed: dict[torch.nn.Module, tuple[torch.Tensor, int, torch.Tensor]] = {}

    available = staticmethod(packing_available)

    def invalidate(self) -> None:
        """Drop every packed copy (they are remade from the weights on next use)."""
        self._packed.clear()

    @contextlib.contextmanager
    def active(self):
        """Route the packed modules' forward through :meth:`_forward` (restored on exit)."""
        for m in self.modules:
            m.forward = functools.partial(self._forward, m)
        try:
            yield
        finally:
            for m in self.modules:
                m.__dict__.pop("forward", None)

    def _forward(self, m: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
        if not in_packed_rows(x.numel() // x.shape[-1]):
            return F.linear(x, m.weight, m.bias)
        w = m.weight
        entry = self._packed.get(m)
        if entry is None or entry[0] is not w or entry[1] != w._version:
            entry = (w, w._version, pack_weight(w))
            self._packed[m] = entry
        return packed_linear(x, entry[2], m.bias)


def reserved_cache(capacity: int):
    """A transformers ``DynamicCache`` whose layers are :func:`reserved_layer_class` layers (``capacity``
    positions each)."""
    from transformers import DynamicCache

    cache = DynamicCache()
    cache.layer_class_to_replicate = functools.partial(reserved_layer_class(), capacity)
    return cache


@functools.cache
def reserved_layer_class():
    """``ReservedLayer``: a ``DynamicLayer`` whose keys and values are views into buffers reserved for
    ``capacity`` positions, so that a decode step writes its one position in place instead of concatenating
    (copying) the whole cache per layer and step. A batch reselection (``batch_select_indices``) or an
    overflow moves them into new buffers. (A class made on first use: transformers is imported lazily.)"""
    from transformers.cache_utils import DynamicLayer

    class ReservedLayer(DynamicLayer):
        def __init__(self, capacity: int):
            super().__init__()
            self.capacity = capacity
            self._buffers: tuple[torch.Tensor, torch.Tensor] | None = None
            self._view: torch.Tensor | None = None

        def update(self, key_states, value_states, *args, **kwargs):
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            old = self.get_seq_length()
            new = old + key_states.shape[-2]
            bufs = self._buffers
            if bufs is None or self.keys is not self._view or new > bufs[0].shape[-2]:
                cap = max(self.capacity, new)
                bufs = tuple(
                    t.new_empty((*t.shape[:-2], cap, t.shape[-1])) for t in (key_states, value_states)
                )
                if old:
                    bufs[0][..., :old, :] = self.keys
                    bufs[1][..., :old, :] = self.values
                self._buffers = bufs
            bufs[0][..., old:new, :] = key_states
            bufs[1][..., old:new, :] = value_states
            self.keys, self.values = bufs[0][..., :new, :], bufs[1][..., :new, :]
            self._view = self.keys
            return self.keys, self.values

    return ReservedLayer


#: transformers' attention name under which :func:`sdpa_gqa_decode` is registered (used while decoding).
GQA_ATTENTION = "gkd_sdpa_gqa"


def sdpa_gqa_decode(
    module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **kw
):
    """transformers' ``sdpa`` attention, except that a CPU decode step (one query token) hands the grouped
    KV heads to SDPA (``enable_gqa``) instead of repeating them: transformers repeats them whenever there is
    a mask (what its CUDA kernels need); the CPU kernel takes both and gives the same result without two
    ``[B, H, L, D]`` copies per layer and step. Anything else goes to transformers' function unchanged."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if (
        query.shape[2] != 1
        or query.device.type != "cpu"
        or dropout
        or kw.get("position_bias") is not None
        or kw.get("cache") is not None
    ):
        return sdpa_attention_forward(
            module,
            query,
            key,
            value,
            attention_mask,
            dropout=dropout,
            scaling=scaling,
            is_causal=is_causal,
            **kw,
        )
    gqa = query.shape[1] != key.shape[1]
    out = F.scaled_dot_product_attention(
        query, key, value, attn_mask=attention_mask, scale=scaling, enable_gqa=gqa
    )
    return out.transpose(1, 2).contiguous(), None


@contextlib.contextmanager
def gqa_decode_attention(model):
    """While active, a model on transformers' ``sdpa`` attention runs :func:`sdpa_gqa_decode` (other
    attention implementations are left alone)."""
    config = model.config
    if getattr(config, "_attn_implementation", None) != "sdpa":
        yield
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(GQA_ATTENTION, sdpa_gqa_decode)  # a new name: existing ones are untouched
    AttentionMaskInterface.register(GQA_ATTENTION, AttentionMaskInterface._global_mapping["sdpa"])
    config._attn_implementation = GQA_ATTENTION
    try:
        yield
    finally:
        config._attn_implementation = "sdpa"


class HFRolloutEngine:
    """``generate(prompts, sampling) -> list[Sample]`` and strict ``load_weights`` on a transformers model.

    ``prepack``: packed weights for the decode steps (None: on CPU when its oneDNN can pack the model's
    dtype; never where it cannot, see :func:`~gkd.rollout.llama_decode.packing_unsupported`).
    ``fused``: decode Llama-family models through :class:`FusedLlamaSteps` (None: when the model is one);
    False runs every step through the transformers model (with :class:`PackedLinears` when ``prepack``).
    ``token_ids``: the real vocabulary (``len(tokenizer)``; None: every embedding row): padded rows past it
    are never sampled nor among the top-m. ``stop_ids``: ids that end every response besides a request's
    own ``stop_token_ids`` (:meth:`from_pretrained`: the model's generation-config eos ids and the
    tokenizer's eos).
    ``static_cache``: decode Llama-family models through
    :class:`~gkd.rollout.static_decode.StaticLlamaSteps` (fixed KV buffers and batch, one CUDA graph replay
    per step on a GPU; None: on CUDA devices unless ``GKD_STATIC_CACHE=0``; on CPU, True runs the same
    static-shape steps eagerly).
    """

    def __init__(
        self,
        model,
        *,
        device: str = "cpu",
        max_batch_size: int = 64,
        pad_token_id: int = 0,
        prepack: bool | None = None,
        fused: bool | None = None,
        token_ids: int | None = None,
        stop_ids: Sequence[int] = (),
        static_cache: bool | None = None,
        max_len: int | None = None,
    ):
        self.model = model.eval()
        self.device = torch.device(device)
        self.max_batch_size = int(max_batch_size)
        self.pad_token_id = int(pad_token_id)
        self.policy_version = 0
        self.vocab_size = int(model.get_output_embeddings().weight.shape[0])
        self.token_ids = min(int(token_ids), self.vocab_size) if token_ids else self.vocab_size
        self.stop_ids = tuple(int(i) for i in stop_ids)
        # prompt + response positions served (vLLM's max_model_len): the model's own limit, or less when
        # given; longer requests are refused before any buffer is sized by them
        self.max_len = int(getattr(model.config, "max_position_embeddings", 1 << 31))
        if max_len is not None:
            if max_len < 2:
                raise ValueError(f"max_len={max_len} must be >= 2 (prompt + response tokens)")
            self.max_len = min(self.max_len, int(max_len))
        if prepack is None and self.device.type != "cpu":
            prepack = False
        # packed copies only where this CPU's oneDNN can make them (bf16 needs AVX-512 or AVX-NE-CONVERT)
        prepack = packing_for(model.dtype, prepack)
        # Llama-family models decode through FusedLlamaSteps (packed fused weights on CPU); others through
        # the transformers model, with PackedLinears swapped in for its large float32 linears
        if fused is None:
            fused = unsupported_reason(model) is None
        elif fused and unsupported_reason(model) is not None:
            raise ValueError(
                f"fused=True: this model cannot use the fused decode steps: {unsupported_reason(model)}"
            )
        self.fused = fused
        if static_cache is None:
            static_cache = self.fused and static_cache_default(self.device)
        elif static_cache and not self.fused:
            raise ValueError(
                "static_cache=True needs the fused decode steps (fused=False, or an unsupported model)"
            )
        self.static_steps = StaticStepsCache(model) if static_cache else None
        self.fused_weights = FusedWeights(model) if self.fused and prepack else None
        self.linears = PackedLinears(model, prepack and not self.fused)

    @classmethod
    def from_pretrained(cls, path: str, *, dtype: str = "float32", device: str = "cpu", **kwargs):
        from transformers import AutoModelForCausalLM

        if dtype not in TORCH_DTYPES:
            raise ValueError(f"dtype={dtype!r} is not one of {sorted(TORCH_DTYPES)}")
        model = AutoModelForCausalLM.from_pretrained(path, dtype=TORCH_DTYPES[dtype]).to(device)
        tok = load_tokenizer(path) if has_tokenizer(path) else None
        kwargs.setdefault("token_ids", len(tok) if tok is not None else None)
        kwargs.setdefault("stop_ids", stop_token_ids(path, tok.eos_token_id if tok is not None else None))
        return cls(model, device=device, **kwargs)

    def parameters_spec(self) -> dict[str, torch.Tensor]:
        """The parameters load_weights expects, by name (tied weights appear once)."""
        return dict(self.model.named_parameters())

    @torch.no_grad()
    def load_weights(
        self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int | None = None
    ) -> int:
        """Copy a full state into the model (strict: every parameter, no unknown name, same shapes)."""
        params = self.parameters_spec()
        incoming = check_named_tensors(params, named_tensors)
        self.linears.invalidate()
        if self.fused_weights is not None:
            self.fused_weights.invalidate()
        for name, tensor in incoming.items():
            params[name].copy_(tensor)
        if version is not None:
            self.policy_version = int(version)
        return len(incoming)

    def generate(
        self, prompts: Sequence[Sequence[int]], sampling: SamplingConfig, *, seed_offset: int = 0
    ) -> list[Sample]:
        check_prompts(prompts, vocab_size=self.vocab_size)
        # the request's max_new_tokens sizes [B, N] buffers: bounded by max_len like vLLM's max_model_len
        longest = max(map(len, prompts), default=0)
        if longest + sampling.max_new_tokens > self.max_len:
            raise ValueError(
                f"max_new_tokens {sampling.max_new_tokens} + the longest prompt's {longest} tokens exceed "
                f"this engine's max_len of {self.max_len} prompt + response tokens (--max-model-len)"
            )
        out: list[Sample] = []
        version = self.policy_version  # one version for the whole call: weights change only between calls
        for start in range(0, len(prompts), self.max_batch_size):
            batch = prompts[start : start + self.max_batch_size]
            out.extend(self._generate_batch(batch, sampling, seed_offset + start, version))
        return out

    def _generate_batch(
        self, prompts, sampling: SamplingConfig, seed_base: int, version: int
    ) -> list[Sample]:
        with torch.inference_mode(), self.linears.active(), gqa_decode_attention(self.model):
            toks, lps, tops, lengths, stopped, lse_ok = self._decode(prompts, sampling, seed_base)
        # the one host transfer of the batch (outside inference mode: the samples hold ordinary tensors)
        toks, lps, lengths, stopped = toks.cpu(), lps.cpu(), lengths.tolist(), stopped.tolist()
        if not bool(lse_ok):
            raise RuntimeError(
                "the rollout model produced non-finite logits (NaN/inf) while sampling: "
                "check the weights loaded into the rollout engine"
            )
        tops = tops.cpu() if tops is not None else None
        return [
            Sample(
                list(p),
                toks[i, : lengths[i]].tolist(),
                lps[i, : lengths[i]].clone(),
                "stop" if stopped[i] else "length",
                version,
                topk_ids=tops[i, : lengths[i]].clone() if tops is not None else None,  # [R, m]
            )
            for i, p in enumerate(prompts)
        ]

    def _decode(self, prompts, sampling: SamplingConfig, seed_base: int):
        """Device buffers of one batch: tokens [B, N], log-probs [B, N] float32, top ids [B, N, m] int32
        (or None), response lengths [B], stopped-by-a-stop-token [B] bool, all-normalisers-finite []."""
        b, width, n = len(prompts), max(len(p) for p in prompts), sampling.max_new_tokens
        dev = self.device
        ids = torch.full((b, width), self.pad_token_id, dtype=torch.long)
        attn = torch.zeros(b, width, dtype=torch.long)
        for i, p in enumerate(prompts):  # left padding: every row's next token lands in the last column
            ids[i, width - len(p) :] = torch.tensor(list(p))
            attn[i, width - len(p) :] = 1
        ids, attn = ids.to(dev), attn.to(dev)
        pos = (attn.cumsum(-1) - 1).clamp_min(0)
        greedy = sampling.temperature == 0
        gens = None
        if sampling.seed is not None and not greedy:
            gens = [torch.Generator(device=dev).manual_seed(sampling.seed + seed_base + i) for i in range(b)]
        stop_ids = tuple(dict.fromkeys((*sampling.stop_token_ids, *self.stop_ids)))
        stop = torch.tensor(stop_ids, device=dev) if stop_ids else None
        m = min(sampling.return_topk, self.token_ids)
        toks = torch.zeros(b, n, dtype=torch.long, device=dev)
        lps = torch.zeros(b, n, dtype=torch.float32, device=dev)
        tops = torch.zeros(b, n, m, dtype=torch.int32, device=dev) if m else None
        lengths = torch.full((b,), n, dtype=torch.long, device=dev)
        stopped = torch.zeros(b, dtype=torch.bool, device=dev)
        lse_ok = torch.ones((), dtype=torch.bool, device=dev)

        logits, steps = self._prompt_pass(ids, attn, pos, width + n, padded=min(map(len, prompts)) < width)
        rows = list(range(b))  # batch row -> prompt index; finished rows leave once half have finished
        index = torch.arange(b, device=dev)  # the same, on the device
        live = torch.ones(b, dtype=torch.bool, device=dev)  # per batch row: no stop token yet
        next_pos = pos[:, -1:] + 1
        for step in range(n):
            check_cancelled()  # the broker withdrew this request (its client gave up): stop here
            if self.token_ids < logits.shape[1]:  # padded embedding rows are no tokens
                logits[:, self.token_ids :] = float("-inf")
            uniforms = None
            if gens is not None:
                uniforms = torch.cat(
                    [torch.rand(1, generator=gens[r], dtype=torch.float64, device=dev) for r in rows]
                )
            elif not greedy:
                uniforms = torch.rand(len(rows), dtype=torch.float64, device=dev)
            tok, lp, lse = sample_rows(logits, sampling, uniforms)
            lse_ok &= lse.isfinite().all()
            toks[index, step] = tok
            lps[index, step] = lp
            if m:  # the student's top-m: softmax(logits / T) keeps the logits' order, so no rescaling needed
                tops[index, step] = logits.topk(m, dim=-1).indices.to(torch.int32)
            if stop is not None:
                hit = torch.isin(tok, stop) & live
                lengths[index] = torch.where(hit, step + 1, lengths[index])
                stopped[index] |= hit
                live &= ~hit
            if step + 1 == n:
                break
            if stop is not None:
                alive = int(live.sum())  # a host sync, once per step and only with stop tokens
                if alive == 0:
                    break
                if 2 * alive <= len(rows) and steps.drops_rows:  # finished rows leave the batch and cache
                    keep = live.nonzero()[:, 0]
                    steps.select(keep)
                    rows = [rows[j] for j in keep.tolist()]
                    index, live, tok, attn, next_pos = (
                        index[keep],
                        live[keep],
                        tok[keep],
                        attn[keep],
                        next_pos[keep],
                    )
            attn = torch.cat([attn, attn.new_ones(attn.shape[0], 1)], dim=1)
            logits = steps.step(tok, next_pos, attn)  # [B', V] float32
            next_pos = next_pos + 1
        return toks, lps, tops, lengths, stopped, lse_ok

    def _prompt_pass(self, ids, attn, pos, capacity: int, padded: bool):
        """The prompt pass through the transformers model: the next position's logits [B, V] float32 and
        the decode steps that follow (:class:`FusedLlamaSteps` or :class:`ModelSteps`)."""
        if not self.fused:
            cache = reserved_cache(capacity)
            out = self.model(
                input_ids=ids,
                attention_mask=attn,
                position_ids=pos,
                past_key_values=cache,
                use_cache=True,
                logits_to_keep=1,
            )
            return out.logits[:, -1].float(), ModelSteps(self.model, cache)
        from transformers import DynamicCache

        cache = DynamicCache()
        weights = self.fused_weights.current() if self.fused_weights is not None else None
        hidden = self.model.model(
            input_ids=ids, attention_mask=attn, position_ids=pos, past_key_values=cache, use_cache=True
        ).last_hidden_state[:, -1]  # [B, H], after the final norm
        if self.static_steps is not None:
            steps = self.static_steps.get(ids.shape[0], capacity).start(cache, attn)
            return self.model.get_output_embeddings()(hidden).float(), steps
        if weights is not None and in_packed_rows(hidden.shape[0]):
            logits = weights.logits(hidden)
        else:
            logits = self.model.get_output_embeddings()(hidden).float()
        return logits, FusedLlamaSteps(self.model, weights, cache, capacity, padded)


class ModelSteps:
    """Decode steps through the transformers model itself (any architecture), on a reserved cache."""

    drops_rows = True

    def __init__(self, model, cache):
        self.model, self.cache = model, cache

    def select(self, keep: torch.Tensor) -> None:
        self.cache.batch_select_indices(keep)

    def step(self, tokens: torch.Tensor, positions: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        out = self.model(
            input_ids=tokens[:, None],
            attention_mask=attn,
            position_ids=positions,
            past_key_values=self.cache,
            use_cache=True,
        )
        return out.logits[:, -1].float()
