"""Loading a checkpoint of either layout (``gkd.trainer.checkpoint``'s ``files``,
``gkd.trainer.checkpoint.sharded``'s ``dcp``) into a sharded or unsharded student, of any world size;
re-exported by ``gkd.trainer.checkpoint``."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_model
from torch import nn

from gkd.trainer.checkpoint.folders import CheckpointError
from gkd.trainer.checkpoint.rng import restore_rng_state
from gkd.trainer.checkpoint.save import _ADAPTER_FILE, _READABLE, _tied_names, _unwrap, is_sharded
from gkd.trainer.lora import is_lora

__all__ = ["LoadedCheckpoint", "load_checkpoint", "read_meta"]


def _load_adapter(model: nn.Module, path: Path, sharded: bool) -> None:
    """A LoRA checkpoint's adapter into ``model``: exactly its trainable parameters, by name; the frozen
    base stays as loaded from ``model.student_path``."""
    from safetensors.torch import load_file

    state = load_file(str(path / _ADAPTER_FILE))
    hf = _unwrap(model)
    want = {n: p for n, p in hf.named_parameters() if p.requires_grad}
    if set(state) != set(want):
        missing, unexpected = sorted(set(want) - set(state))[:5], sorted(set(state) - set(want))[:5]
        raise CheckpointError(
            f"{path}/{_ADAPTER_FILE} does not match the adapter: missing {missing}, unexpected "
            f"{unexpected} (model.lora.target_modules changed?)"
        )
    if sharded:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True, strict=False))
        return
    with torch.no_grad():
        for name, tensor in state.items():
            if tuple(tensor.shape) != tuple(want[name].shape):
                raise CheckpointError(
                    f"{path}/{_ADAPTER_FILE}: {name} has shape {tuple(tensor.shape)}, the adapter "
                    f"{tuple(want[name].shape)} (model.lora.r changed?)"
                )
            want[name].copy_(tensor)


@dataclass
class LoadedCheckpoint:
    path: Path
    step: int  # optimizer steps done when it was saved
    data_state: dict | None
    scheduler_state: dict | None
    config_yaml: str
    rng_states: list[dict[str, torch.Tensor]]


def _torch_load(path: Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing: the checkpoint is incomplete") from None


def read_meta(path: str | os.PathLike) -> dict[str, Any]:
    """A complete checkpoint's ``meta.json`` with its ``layout`` (``files`` | ``dcp``) and ``lora`` filled
    in for format 1; a missing, unreadable or newer checkpoint is a :class:`CheckpointError`."""
    path = Path(path)
    meta_path = path / "meta.json"
    if not meta_path.is_file():
        raise CheckpointError(f"{path} is not a complete checkpoint (no meta.json)")
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{meta_path} cannot be read ({e}): the checkpoint is damaged") from e
    if meta.get("format_version") not in _READABLE:
        raise CheckpointError(
            f"{path}: checkpoint format {meta.get('format_version')}, this gkd reads formats "
            f"{', '.join(map(str, _READABLE))}: use the gkd version that wrote it"
        )
    meta.setdefault("layout", "files")
    meta.setdefault("lora", (path / _ADAPTER_FILE).is_file())
    return meta


def load_checkpoint(
    path: str | os.PathLike,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    lr_scheduler=None,
    rank: int = 0,
    restore_rng: bool = True,
) -> LoadedCheckpoint:
    """Load a checkpoint of either layout into ``model`` (strictly: names and shapes must match; sharded
    or not, any world size), ``optimizer`` and ``lr_scheduler`` when given; restore this rank's RNG states
    (rank ``r`` takes the saved rank ``r``'s, so with a different world size only ranks that existed are
    restored). Every trainer rank calls it. Returns the step, data position, scheduler state and config."""
    path = Path(path)
    meta = read_meta(path)
    saved_lora = bool(meta["lora"])
    if saved_lora != is_lora(model):
        raise CheckpointError(
            f"{path} holds "
            + ("a LoRA adapter" if saved_lora else "a full student")
            + f" but this run's student is {'a LoRA' if is_lora(model) else 'a full'} model: resume it with "
            f"model.lora.enabled={str(saved_lora).lower()} (and the same model.lora settings)"
        )
    state = _torch_load(path / "trainer_state.pt")
    if meta["layout"] == "dcp":
        from gkd.trainer.checkpoint.sharded import load_dcp

        load_dcp(path, model, optimizer, frozen=not saved_lora)
    else:
        _load_files(path, model, optimizer, state, saved_lora)
    if lr_scheduler is not None:
        if state["lr_scheduler"] is None:
            raise CheckpointError(f"{path}: saved without an LR scheduler state")
        lr_scheduler.load_state_dict(state["lr_scheduler"])
    rng = list(state["rng"])
    if restore_rng and rank < len(rng):
        restore_rng_state(rng[rank])
    config_file = path / "config.yaml"
    return LoadedCheckpoint(
        path=path,
        step=int(state["step"]),
        data_state=state["data"],
        scheduler_state=state["scheduler"],
        config_yaml=config_file.read_text() if config_file.is_file() else "",
        rng_states=rng,
    )


def _load_files(path: Path, model: nn.Module, optimizer, state: dict, saved_lora: bool) -> None:
    """The ``files`` layout into any model. A sharded model: rank 0 alone reads the full files and
    broadcasts them into the shards (the adapter of a LoRA run, small, is read by every rank)."""
    sharded = is_sharded(model)
    if saved_lora:
        _load_adapter(model, path, sharded)
    elif sharded:
        from gkd.trainer.checkpoint.sharded import load_full_into_sharded

        def read_optimizer() -> dict:
            return _named_optimizer(model, optimizer, _torch_load(path / "optimizer.pt"), state, path)

        try:
            load_full_into_sharded(
                model, optimizer, lambda: _read_full_model(model, path / "model.safetensors"), read_optimizer,
                frozen=True,
            )  # fmt: skip
        except (RuntimeError, KeyError) as e:  # missing / unexpected keys, shape mismatch
            raise CheckpointError(f"{path} does not match the model (a different student?): {e}") from e
        return
    else:
        missing, unexpected = load_model(_unwrap(model), str(path / "model.safetensors"), strict=False)
        if missing or unexpected:
            raise CheckpointError(
                f"{path}/model.safetensors does not match the model: missing {sorted(missing)[:10]}, "
                f"unexpected {sorted(unexpected)[:10]} (a different student?)"
            )
    if optimizer is None:
        return
    saved = _torch_load(path / "optimizer.pt")
    if state.get("optimizer_format", "torch") == "torch" and not sharded:
        optimizer.load_state_dict(saved)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    named = _named_optimizer(model, optimizer, saved, state, path)
    set_optimizer_state_dict(model, optimizer, named, options=StateDictOptions(full_state_dict=True))


def _read_full_model(model: nn.Module, path: Path) -> dict[str, torch.Tensor]:
    """``model.safetensors`` with every tied alias of the model filled in (the file stores it once)."""
    from safetensors.torch import load_file

    state = load_file(str(path))
    for name, source in _tied_names(model).items():
        if name not in state and source in state:
            state[name] = state[source]
    return state


def _named_optimizer(model, optimizer, saved: dict, state: dict, path: Path) -> dict:
    """A saved optimizer state keyed by parameter name, whichever way it was saved."""
    if state.get("optimizer_format", "torch") == "fqn":
        return saved
    from gkd.trainer.checkpoint.sharded import named_optimizer_state

    try:
        return named_optimizer_state(_unwrap(model), optimizer, saved)
    except ValueError as e:
        raise CheckpointError(f"{path}/optimizer.pt: {e} (a different student or optim settings?)") from e
