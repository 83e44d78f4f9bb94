"""Decode steps of a Llama-family transformers model in a few large operations per layer.

:class:`HFRolloutEngine` runs the prompt pass through the transformers model (compute-bound: its cost is
the matrix products), then, for the models :func:`unsupported_reason` accepts, each one-token decode step
through :class:`FusedLlamaSteps` instead of the model's modules. A decode step streams every weight once
for a handful of rows, so its cost beyond that stream is per-operation overhead; per layer this path runs

- one product for the query, key and value projections (their weights concatenated), one for the output
  projection, one for gate and up (concatenated), one for down, each on oneDNN-packed weights on CPU;
- rotary embedding on queries and keys together (cos/sin computed once per step for every layer);
- the new key and value written in place into per-layer buffers reserved for the whole answer, and one
  SDPA call over them with grouped KV heads (no repeated heads, no mask when no row is padded).

The layers' own weights stay the source of truth: the fused and packed copies (:class:`FusedWeights`) are
remade when any of them changes (``invalidate``, or a torch in-place update moving a version counter).
Results match the transformers forward up to float rounding (tests/test_llama_decode.py).
"""

from __future__ import annotations

import functools
import logging
import os

import torch
import torch.nn.functional as F

__all__ = ["FusedLlamaSteps", "FusedWeights", "packing_unsupported", "unsupported_reason"]

log = logging.getLogger("gkd.rollout")
#: Set to 1 to treat this CPU as one whose oneDNN cannot pack bfloat16 weights (an AVX2-only x86-64 CPU),
#: so that machines with AVX-512 exercise the fallback too.
NO_BF16_PACKING_ENV = "GKD_NO_BF16_PACKING"
#: CPU flags (``/proc/cpuinfo``) with which oneDNN packs bfloat16 weights: AVX-NE-CONVERT, or AVX-512
#: BW + VL + DQ (torch's ``mkldnn_bf16_device_check``); float32 packing runs on any x86-64 (SSE4.1 up).
BF16_PACKING_FLAGS = ({"avx_ne_convert"}, {"avx512bw", "avx512vl", "avx512dq"})

#: transformers ``model_type`` values whose decoder layers have Llama's structure: RMSNorm, q/k/v/o
#: projections (biases allowed), rotary embedding from the model's ``rotary_emb``, a SiLU-gated MLP; qwen3
#: adds per-head RMSNorms on queries and keys before the rotary embedding (``q_norm``, ``k_norm``).
MODEL_TYPES = ("llama", "qwen2", "qwen3")
#: Input rows (batch x tokens) for which the packed products are used: fewer rows run ``F.linear`` on the
#: layers' own weights (MKL's GEMV is ~1.25x faster there), and more (the prompt pass) are compute-bound,
#: where packing does not help. The upper end is the packing's row hint.
PACKED_ROWS = (3, 64)


def unsupported_reason(model) -> str | None:
    """Why :class:`FusedLlamaSteps` cannot run ``model`` (None when it can)."""
    cfg = model.config
    if getattr(cfg, "model_type", None) not in MODEL_TYPES:
        return f"model_type {getattr(cfg, 'model_type', None)!r} is not one of {MODEL_TYPES}"
    if getattr(cfg, "hidden_act", None) != "silu":
        return f"hidden_act {getattr(cfg, 'hidden_act', None)!r} (only silu)"
    if getattr(cfg, "pretraining_tp", 1) != 1:
        return "pretraining_tp != 1"
    if getattr(cfg, "use_sliding_window", False) or any(
        t != "full_attention" for t in getattr(cfg, "layer_types", None) or ()
    ):
        return "sliding-window attention"
    inner = getattr(model, "model", None)
    if inner is None or not hasattr(inner, "rotary_emb") or not hasattr(inner, "layers"):
        return "no model.model.layers / rotary_emb"
    for layer in inner.layers:
        attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
        if (
            attn is None
            or mlp is None
            or any(
                not isinstance(getattr(attn, n, None), torch.nn.Linear)
                for n in ("q_proj", "k_proj", "v_proj", "o_proj")
            )
        ):
            return "a layer without self_attn.{q,k,v,o}_proj"
        if (hasattr(attn, "q_norm") or hasattr(attn, "k_norm")) and cfg.model_type != "qwen3":
            return "query/key norms"
        if any(
            getattr(getattr(mlp, n, None), "bias", None) is not None
            for n in ("gate_proj", "up_proj", "down_proj")
        ):
            return "MLP biases"
    return None


def in_packed_rows(rows: int) -> bool:
    """Whether a product with ``rows`` input rows runs on the packed weights (:data:`PACKED_ROWS`)."""
    return PACKED_ROWS[0] <= rows <= PACKED_ROWS[1]


def pack_weight(w: torch.Tensor) -> torch.Tensor:
    """``w`` [out, in] reordered into oneDNN's blocked layout for :func:`packed_linear` (a copy)."""
    return torch.ops.mkldnn._reorder_linear_weight(w.detach().contiguous(), PACKED_ROWS[1])


def packed_linear(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ w.T + bias`` with ``w`` from :func:`pack_weight`."""
    return torch.ops.mkldnn._linear_pointwise(x, w, bias, "none", [], "")


def packing_available() -> bool:
    ops = torch.ops.mkldnn
    return (
        torch.backends.mkldnn.is_available()
        and hasattr(ops, "_reorder_linear_weight")
        and hasattr(ops, "_linear_pointwise")
    )


def cpu_flags(path: str = "/proc/cpuinfo") -> frozenset[str]:
    """The first processor's ``flags`` line of ``path`` (empty where there is none: not Linux x86)."""
    try:
        with open(path) as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.partition(":")[2].split())
    except OSError:
        pass
    return frozenset()


def packing_unsupported(dtype: torch.dtype, flags: frozenset[str] | None = None) -> str | None:
    """Why this CPU cannot run :func:`pack_weight` / :func:`packed_linear` on ``dtype`` weights (None when
    it can). ``flags``: the CPU's flags (default :func:`cpu_flags`)."""
    if not packing_available():
        return "oneDNN's linear ops are not in this torch build"
    if dtype == torch.float32:
        return None
    if dtype != torch.bfloat16:
        return f"no packed {dtype} products"
    if os.environ.get(NO_BF16_PACKING_ENV) == "1":
        return f"{NO_BF16_PACKING_ENV}=1"
    flags = cpu_flags() if flags is None else flags
    if flags and not any(need <= flags for need in BF16_PACKING_FLAGS):
        return "bfloat16 packing needs AVX-NE-CONVERT or AVX-512 BW/VL/DQ; this CPU has neither"
    if not flags and not _packs(torch.bfloat16):  # no flags to read (not Linux): ask oneDNN itself
        return "oneDNN refused to pack a bfloat16 weight on this CPU"
    return None


@functools.cache
def _packs(dtype: torch.dtype) -> bool:
    try:
        packed_linear(torch.ones(2, 16, dtype=dtype), pack_weight(torch.ones(16, 16, dtype=dtype)))
    except RuntimeError:
        return False
    return True


def packing_for(dtype: torch.dtype, wanted: bool | None) -> bool:
    """Whether an engine packs its ``dtype`` weights: ``wanted`` (None: whenever the CPU can), and never
    where the CPU cannot (one log line saying why, the engine runs unpacked products)."""
    if wanted is False:
        return False
    reason = packing_unsupported(dtype)
    if reason is not None:
        if wanted or dtype in (torch.float32, torch.bfloat16):
            log.info(
                "rollout: %s weights unpacked (plain products): %s", str(dtype).removeprefix("torch."), reason
            )
        return False
    return True


def _rms_norm(norm, x: torch.Tensor) -> torch.Tensor:
    """A transformers RMSNorm module applied to ``x`` in one operation (its own forward takes eight)."""
    return F.rms_norm(x, norm.weight.shape, norm.weight, norm.variance_epsilon)


class FusedWeights:
    """Per layer: the concatenated q/k/v weight (and bias) and gate/up weight, and the o/down weights, in
    oneDNN's packed layout (CPU, float32/bfloat16); plus the packed output embedding. Rebuilt by
    :meth:`current` whenever a source weight was replaced or updated in place since the last build. They
    cost the model's size in memory."""

    def __init__(self, model):
        self.model = model
        self._key: tuple | None = None
        self.layers: list[dict] = []
        self.lm_head: torch.Tensor | None = None

    def invalidate(self) -> None:
        self._key = None

    def _sources(self) -> list[torch.Tensor]:
        out = []
        for layer in self.model.model.layers:
            a, m = layer.self_attn, layer.mlp
            out += [a.q_proj.weight, a.k_proj.weight, a.v_proj.weight, a.o_proj.weight]
            out += [m.gate_proj.weight, m.up_proj.weight, m.down_proj.weight]
            out += [p.bias for p in (a.q_proj, a.k_proj, a.v_proj, a.o_proj) if p.bias is not None]
        return out + [self.model.get_output_embeddings().weight]

    def current(self) -> FusedWeights:
        key = tuple((id(t), t._version) for t in self._sources())
        if key != self._key:
            self._build()
            self._key = key
        return self

    @torch.no_grad()
    def _build(self) -> None:
        self.layers = []
        for layer in self.model.model.layers:
            a, m = layer.self_attn, layer.mlp
            qkv = [a.q_proj, a.k_proj, a.v_proj]
            bias = None
            if any(p.bias is not None for p in qkv):
                bias = torch.cat(
                    [p.bias if p.bias is not None else p.weight.new_zeros(p.out_features) for p in qkv]
                )
            self.layers.append(
                {
                    "qkv": pack_weight(torch.cat([p.weight for p in qkv])),
                    "qkv_bias": bias,
                    "o": pack_weight(a.o_proj.weight),
                    "o_bias": a.o_proj.bias,
                    "gate_up": pack_weight(torch.cat([m.gate_proj.weight, m.up_proj.weight])),
                    "down": pack_weight(m.down_proj.weight),
                }
            )
        self.lm_head = pack_weight(self.model.get_output_embeddings().weight)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The output embedding's product with ``hidden`` [B, H] (rows in ``PACKED_ROWS``), float32."""
        return packed_linear(hidden, self.lm_head).float()


class FusedLlamaSteps:
    """One batch's decode steps after a transformers prompt pass: ``step(tokens, positions, attn)`` ->
    logits [B, V] float32 of the next position, reading and extending reserved per-layer KV buffers.

    ``cache``: the transformers cache the prompt pass filled (its keys/values are copied once into buffers
    of ``capacity`` positions). ``weights``: the model's :class:`FusedWeights`, current, or None (no
    packing: every product on the layers' own modules). ``padded``: some row has padding (a key mask is
    needed; without it SDPA runs unmasked)."""

    def __init__(self, model, weights: FusedWeights | None, cache, capacity: int, padded: bool):
        self._bind(model, weights)
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        for layer in cache.layers:
            k, v = layer.keys, layer.values  # [B, kv_heads, L, head_dim]
            kb = k.new_empty((*k.shape[:2], capacity, k.shape[-1]))
            vb = v.new_empty((*v.shape[:2], capacity, v.shape[-1]))
            kb[:, :, : k.shape[2]] = k
            vb[:, :, : v.shape[2]] = v
            self.keys.append(kb)
            self.values.append(vb)
        self.length = cache.layers[0].keys.shape[2]
        self.padded = padded

    def _bind(self, model, weights: FusedWeights | None) -> None:
        """The model's modules and attention shapes the steps read."""
        cfg = model.config
        self.model, self.w = model, weights
        inner = model.model
        self.layers, self.norm, self.rotary, self.embed = (
            inner.layers,
            inner.norm,
            inner.rotary_emb,
            inner.embed_tokens,
        )
        self.heads, self.kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.heads
        self.scale = self.head_dim**-0.5

    def select(self, keep: torch.Tensor) -> None:
        """Keep only these batch rows (finished rows leave)."""
        self.keys = [k.index_select(0, keep) for k in self.keys]
        self.values = [v.index_select(0, keep) for v in self.values]

    def _rope(self, x: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor) -> torch.Tensor:
        """``x`` [B, n, D] rotated: x * cos + rotate_half(x) * sin, with rotate_half as a half swap and the
        sign folded into ``sin_signed``."""
        b, n, d = x.shape
        swapped = x.view(b, n, 2, d // 2).flip(2).view(b, n, d)
        return torch.addcmul(x * cos, swapped, sin_signed)

    #: Whether :meth:`select` shrinks the batch (the static steps keep every row: their shapes are fixed).
    drops_rows = True

    def step(self, tokens: torch.Tensor, positions: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        """``tokens`` [B] long, ``positions`` [B, 1] long, ``attn`` [B, length + 1] (1: a real position, 0:
        padding). Returns logits [B, V] float32."""
        t = self.length
        mask = attn[:, None, None, : t + 1].bool() if self.padded else None
        logits = self.forward(tokens, positions, lambda i, q, k, v: self._attend(i, q, k, v, t, mask))
        self.length = t + 1
        return logits

    def _attend(self, i: int, q, k, v, t: int, mask) -> torch.Tensor:
        """Layer ``i``'s new key and value written at position ``t``, then SDPA of ``q`` [B, heads, D] over
        positions ``0..t`` (``mask`` [B, 1, 1, t + 1] or None). Returns [B, heads * D]."""
        self.keys[i][:, :, t] = k
        self.values[i][:, :, t] = v
        att = F.scaled_dot_product_attention(
            q[:, :, None],
            self.keys[i][:, :, : t + 1],
            self.values[i][:, :, : t + 1],
            attn_mask=mask,
            scale=self.scale,
            enable_gqa=self.heads != self.kv_heads,
        )
        return att.reshape(q.shape[0], -1)

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor, attend) -> torch.Tensor:
        """One decode step of every layer: ``attend(i, q [B, heads, D], k [B, kv_heads, D], v [B, kv_heads,
        D])`` stores layer ``i``'s new key and value and returns its attention output [B, heads * D]. Returns
        logits [B, V] float32."""
        b = tokens.shape[0]
        h, kvh, d = self.heads, self.kv_heads, self.head_dim
        x = self.embed(tokens)  # [B, H]
        cos, sin = self.rotary(x[:, None], positions)  # [B, 1, D] each
        half = d // 2
        sin_signed = torch.cat([-sin[..., :half], sin[..., half:]], dim=-1)
        packed = self.w is not None and in_packed_rows(b)
        for i, layer in enumerate(self.layers):
            wl = self.w.layers[i] if packed else None
            a = _rms_norm(layer.input_layernorm, x)
            if packed:
                qkv = packed_linear(a, wl["qkv"], wl["qkv_bias"])
            else:
                at = layer.self_attn
                qkv = torch.cat(
                    [F.linear(a, p.weight, p.bias) for p in (at.q_proj, at.k_proj, at.v_proj)], -1
                )
            qk = qkv[:, : (h + kvh) * d].view(b, h + kvh, d)
            if hasattr(layer.self_attn, "q_norm"):  # per-head norms before the rotary embedding (qwen3)
                at = layer.self_attn
                qk = torch.cat([_rms_norm(at.q_norm, qk[:, :h]), _rms_norm(at.k_norm, qk[:, h:])], dim=1)
            qk = self._rope(qk, cos, sin_signed)
            att = attend(i, qk[:, :h], qk[:, h:], qkv[:, (h + kvh) * d :].view(b, kvh, d))
            if packed:
                x = x + packed_linear(att, wl["o"], wl["o_bias"])
                gu = packed_linear(_rms_norm(layer.post_attention_layernorm, x), wl["gate_up"])
                g, u = gu.chunk(2, dim=-1)
                x = x + packed_linear(F.silu(g) * u, wl["down"])
            else:
                x = x + layer.self_attn.o_proj(att)
                x = x + layer.mlp(_rms_norm(layer.post_attention_layernorm, x))
        x = _rms_norm(self.norm, x)
        if packed:
            return packed_linear(x, self.w.lm_head).float()
        return self.model.get_output_embeddings()(x).float()
