"""LoRA students (``model.lora``) through peft: the adapter trains, the rollout engines get merged weights.

    model = apply_lora(model, cfg.model.lora)   # a peft model: only lora_A / lora_B require grad
    source = weight_source(model)               # WeightSender's source: base names, merged values
    merged = merged_state_dict(model, state)    # a full state dict (peft names) -> base names, merged

- Training: :func:`apply_lora` wraps the student with ``peft.get_peft_model`` (adapters created in the
  base weights' dtype, i.e. ``model.param_dtype``, so FSDP2's per-unit dtype rule holds); every base
  parameter is frozen, so the optimizer (``build_optimizer`` takes ``requires_grad`` parameters) holds the
  adapter only. Only ``nn.Linear`` layers may be adapted, not the output embedding (the fused loss reads
  its weight, never its forward) and none whose weight is tied to another parameter.
- Rollout: the engines load the *base* student and never see peft names. :class:`MergedWeights` names
  every tensor as the base model does (``base_model.model.`` and ``.base_layer`` dropped, adapter tensors
  left out) and hands the sender ``W + (B @ A) * scale`` for adapted layers, computed per tensor as its
  bucket is packed (never a second copy of the whole model), in the master dtype and then cast to the
  engine dtype like any weight. The arithmetic is peft's ``merge`` (``get_delta_weight``), so an fp32
  engine holds ``merge_and_unload()``'s weights bit for bit, a bf16 engine their bf16 cast.
  FSDP2: ``W`` and ``B`` are row-sharded alike (dim 0 is ``out_features`` for both), so each rank merges
  its own rows with the all-gathered ``A`` (``r x in``, small); the sender then gathers the merged rows
  (the whole merge up to rounding: each rank's rows are their own GEMM).
- Checkpoints and export (``gkd.trainer.checkpoint``): the adapter (+ optimizer) only; the final export
  writes a merged Hugging Face folder and the peft adapter folder.

peft is imported lazily (``pip install 'gkd[lora]'``); without it a LoRA config is one error line.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

from gkd.config import ConfigError

__all__ = [
    "ADAPTER",
    "MergedWeights",
    "adapter_state_dict",
    "apply_lora",
    "base_name",
    "is_lora",
    "merged_state_dict",
    "require_peft",
    "weight_source",
]

ADAPTER = "default"  # peft's adapter name; gkd trains one adapter
_PREFIX = "base_model.model."  # PeftModel -> LoraModel -> the transformers model
INSTALL_HINT = "pip install 'gkd[lora]' (peft==0.21.2)"


def require_peft():
    """The peft module, or a :class:`ConfigError` saying what to install."""
    try:
        import peft
    except ImportError as e:
        raise ConfigError(
            f"model.lora.enabled=true needs peft, which is not importable ({e}): {INSTALL_HINT}"
        ) from None
    return peft


def _unwrap(model: nn.Module) -> nn.Module:
    from gkd.trainer.step import unwrap  # one unwrapping rule (DDP, torch.compile); imported when used

    return unwrap(model)


def is_lora(model: nn.Module) -> bool:
    """True for a peft model (possibly inside DDP, or ``fully_shard``-ed: FSDP2 subclasses it in place).
    Never imports peft: a model cannot be a peft model unless peft was imported."""
    peft = sys.modules.get("peft")
    return peft is not None and isinstance(_unwrap(model), peft.PeftModel)


def base_name(name: str) -> str | None:
    """A peft parameter name -> the base model's name for it; None for adapter tensors.
    ``base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight`` ->
    ``model.layers.0.self_attn.q_proj.weight``; ``...q_proj.lora_A.default.weight`` -> None."""
    if name.startswith(_PREFIX):
        name = name[len(_PREFIX) :]
    parts = name.split(".")
    if any(p.startswith("lora_") for p in parts):
        return None
    return ".".join(p for p in parts if p != "base_layer")


def apply_lora(model: nn.Module, lora_cfg) -> nn.Module:
    """Wrap ``model`` (a transformers causal LM) with a LoRA adapter per ``model.lora`` (r, alpha, dropout,
    target_modules; ``[all-linear]`` is peft's every-linear-but-the-head). Adapters take the base weights'
    dtype. A target list that matches nothing, or matches a non-Linear or tied layer, is a
    :class:`ConfigError` naming ``model.lora.target_modules``."""
    peft = require_peft()
    targets = list(lora_cfg.target_modules)
    key = f"model.lora.target_modules={targets}"
    config = peft.LoraConfig(
        r=int(lora_cfg.r),
        lora_alpha=float(lora_cfg.alpha),
        lora_dropout=float(lora_cfg.dropout),
        target_modules="all-linear" if targets == ["all-linear"] else targets,
        bias="none",
        task_type="CAUSAL_LM",
    )
    tied = _tied_weights(model)
    head = model.get_output_embeddings()
    try:
        wrapped = peft.get_peft_model(model, config, autocast_adapter_dtype=False)
    except ValueError as e:  # peft: "Target modules {...} not found in the base model ..."
        raise ConfigError(f"{key}: {str(e).splitlines()[0]}; name Linear layers of the student") from None
    for name, layer in wrapped.named_modules():
        if not isinstance(layer, peft.tuners.lora.LoraLayer):
            continue
        path = base_name(name)
        if not isinstance(layer, peft.tuners.lora.Linear) or layer.fan_in_fan_out:
            raise ConfigError(
                f"{key}: {path} is a {type(layer.get_base_layer()).__name__}; only Linear layers can be "
                "adapted (their merge is W + scale * B @ A)"
            )
        if layer.get_base_layer() is head:
            raise ConfigError(
                f"{key}: {path} is the output embedding, which the fused loss reads as a weight (never "
                "through its forward), so an adapter there would not train; leave it out of the targets"
            )
        if f"{path}.weight" in tied:
            raise ConfigError(
                f"{key}: {path}.weight is tied to {tied[f'{path}.weight']} (tie_word_embeddings); leave "
                f"{path.rsplit('.', 1)[-1]} out of the targets"
            )
    return wrapped


def _tied_weights(model: nn.Module) -> dict[str, str]:
    """Every name of a parameter shared under several names -> another of its names."""
    names: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(name)
    return {n: next(o for o in group if o != n) for group in names.values() if len(group) > 1 for n in group}


def _adapted_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Base module path -> its peft LoRA layer (modules holding a ``lora_A`` adapter)."""
    out = {}
    for name, module in _unwrap(model).named_modules():
        lora_a = getattr(module, "lora_A", None)
        if isinstance(lora_a, nn.ModuleDict) and ADAPTER in lora_a:
            out[base_name(name)] = module
    return out


@dataclass(frozen=True)
class _Merge:
    """How one base weight is merged: the peft names of its adapter tensors and the scale."""

    a: str  # peft name of lora_A's weight [r, in]
    b: str  # peft name of lora_B's weight [out, r]
    scale: float  # lora_alpha / r (peft's ``scaling``)


def _merges(model: nn.Module) -> dict[str, _Merge]:
    """Base weight name -> its merge, for every adapted layer of a peft ``model``."""
    root = _unwrap(model)
    paths = {m: n for n, m in root.named_modules()}
    out = {}
    for path, layer in _adapted_layers(root).items():
        peft_path = paths[layer]
        out[f"{path}.weight"] = _Merge(
            f"{peft_path}.lora_A.{ADAPTER}.weight",
            f"{peft_path}.lora_B.{ADAPTER}.weight",
            layer.scaling[ADAPTER],
        )
    return out


def _merged(w: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: float) -> torch.Tensor:
    """``w + (b @ a) * scale``: peft's ``merge`` (``get_delta_weight`` then an add), the same operations in
    the same order, so the result equals ``merge_and_unload()``'s bit for bit on plain tensors."""
    return w + (b @ a) * scale


def _merged_sharded(w, a, b, scale: float):
    """The merge of FSDP2 DTensors, as a DTensor laid out like ``w``. Every rank of the mesh must call it
    (``A`` is all-gathered). ``W`` [out, in] and ``B`` [out, r] are both ``Shard(0)`` over ``out``, so
    their local rows match and each rank merges its own rows; other layouts are merged whole."""
    from torch.distributed.tensor import DTensor, Replicate, Shard

    a_full = a.full_tensor()  # [r, in]
    same_rows = tuple(w.placements) == (Shard(0),) and tuple(b.placements) == (Shard(0),)
    if same_rows and w.device_mesh == b.device_mesh:
        local = _merged(w.to_local(), a_full, b.to_local(), scale)
        return DTensor.from_local(local, w.device_mesh, w.placements, run_check=False, shape=w.shape,
                                  stride=w.stride())  # fmt: skip
    full = _merged(w.full_tensor(), a_full, b.full_tensor(), scale)
    return DTensor.from_local(full, w.device_mesh, [Replicate()] * w.device_mesh.ndim, run_check=False)


class MergedWeights:
    """The weight sender's source for a LoRA student (see :class:`gkd.weights.transfer.WeightSender`).

    :meth:`named_weights`: the base model's parameters under the base names, in its order (their shapes
    and dtypes are the merged tensors' too: the handshake is the base model's); :meth:`materialize`: the
    value to send for one of them, the merge for adapted weights (called per tensor while a bucket is
    packed; with FSDP2 on every trainer rank in the same order, since the merge all-gathers ``A``)."""

    def __init__(self, model: nn.Module):
        self.model = model
        self._merges = _merges(model)

    def named_weights(self) -> list[tuple[str, torch.Tensor]]:
        out = []
        for name, p in _unwrap(self.model).named_parameters():
            base = base_name(name)
            if base is not None:
                out.append((base, p.detach()))
        return out

    @torch.no_grad()
    def materialize(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        merge = self._merges.get(name)
        if merge is None:
            return tensor
        params = _unwrap(self.model).get_parameter
        a, b = params(merge.a).detach(), params(merge.b).detach()
        if type(tensor).__name__ == "DTensor":
            return _merged_sharded(tensor, a, b, merge.scale)
        return _merged(tensor, a, b, merge.scale)


def weight_source(model: nn.Module):
    """What the weight sender reads: :class:`MergedWeights` for a LoRA student, else the model itself."""
    return MergedWeights(model) if is_lora(model) else model


@torch.no_grad()
def merged_state_dict(model: nn.Module, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A full state dict of the peft ``model`` (its own names: ``model.state_dict()``, or
    ``gkd.trainer.checkpoint.full_state_dicts`` of a sharded one) -> the base model's state dict with every
    adapted weight merged; what ``save_pretrained`` of the base model writes."""
    merges = _merges(model)
    out = {}
    for name, value in state.items():
        base = base_name(name)
        if base is None:
            continue
        merge = merges.get(base)
        out[base] = value if merge is None else _merged(value, state[merge.a], state[merge.b], merge.scale)
    return out


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The trainable (adapter) parameters of an unsharded peft model by their own names, on the CPU."""
    return {n: p.detach().cpu().contiguous() for n, p in _unwrap(model).named_parameters() if p.requires_grad}
