"""Atomic, resumable checkpoints and the final Hugging Face export.

Layout: ``OUTPUT_DIR/checkpoints/step_000042/`` holding

    model.safetensors   the student's state (tied tensors stored once)
      or adapter.safetensors: a LoRA student's (``model.lora``) adapter tensors only, by their peft names
    optimizer.pt        optimizer.state_dict() (a LoRA student's optimizer holds the adapter only)
    trainer_state.pt    step, LR scheduler, RNG states (one per trainer rank), data position, scheduler state
    config.yaml         the resolved run config
    meta.json           written last: format version, step, file list

Sharded students (FSDP2, ``trainer.strategy=fsdp2``) are saved as *full* state dicts: every trainer rank
calls :func:`full_state_dicts` (``torch.distributed.checkpoint.state_dict`` with ``full_state_dict=True``),
rank 0 writes the same ``model.safetensors`` a DDP run writes and ``optimizer.pt`` keyed by parameter name
(``optimizer_format: "fqn"`` in trainer_state.pt); :func:`load_checkpoint` reshards both on every rank, so a
checkpoint does not depend on the number of ranks. Final export: :func:`export_hf` with the gathered state
(a LoRA student: the merged Hugging Face folder and, next to it, ``<name>_adapter``, peft's adapter folder).

A checkpoint is written into ``.tmp-step_000042-<pid>`` in the same parent, every file and the directory
fsynced, then renamed to its final name (atomic on POSIX), so a directory named ``step_*`` is always
complete: a crash or ``kill -9`` mid-write leaves at most a ``.tmp-*`` directory, which :func:`latest`
ignores and the next save deletes. ``.pt`` files are our own, read back from local disk with
``torch.load(weights_only=True)``: they must hold tensors and plain Python values only.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_model
from torch import nn

from gkd.lora import adapter_state_dict, is_lora, merged_state_dict

__all__ = [
    "FORMAT_VERSION",
    "CheckpointError",
    "LoadedCheckpoint",
    "capture_rng_state",
    "checkpoint_root",
    "export_hf",
    "full_state_dicts",
    "gather_rng_states",
    "has_checkpoint",
    "is_sharded",
    "latest",
    "list_checkpoints",
    "load_checkpoint",
    "resolve_resume",
    "restore_rng_state",
    "save_checkpoint",
    "should_save",
    "snapshot",
    "write_snapshot",
    "Snapshot",
]

FORMAT_VERSION = 1
_STEP_DIR = re.compile(r"^step_(\d+)$")
_TMP_PREFIX = ".tmp-"


class CheckpointError(RuntimeError):
    """A checkpoint cannot be found, read or used; the message names the path."""


def _unwrap(model: nn.Module) -> nn.Module:
    while isinstance(getattr(model, "module", None), nn.Module):
        model = model.module
    return model


def is_sharded(model: nn.Module) -> bool:
    """True for an FSDP2 (``fully_shard``) model: its parameters are DTensor shards."""
    from torch.distributed.fsdp import FSDPModule

    return any(isinstance(m, FSDPModule) for m in model.modules())


def full_state_dicts(
    model: nn.Module, optimizer: torch.optim.Optimizer | None = None, *, frozen: bool = True
) -> tuple[dict[str, torch.Tensor], dict[str, Any] | None]:
    """(model, optimizer) full state dicts on CPU of a sharded model; a collective: every trainer rank calls
    it, rank 0 gets the full dicts, the others empty ones. The optimizer's is keyed by parameter name.
    ``frozen=False`` leaves out parameters that do not require grad (a LoRA checkpoint: the adapter only;
    the frozen base is never gathered)."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=not frozen)
    model_state = get_model_state_dict(model, options=options)
    optim_state = (
        get_optimizer_state_dict(model, optimizer, options=options) if optimizer is not None else None
    )
    return model_state, optim_state


def _tied_names(model: nn.Module) -> dict[str, str]:
    """Each alias of a shared parameter -> the first name it has (``lm_head.weight`` -> embed_tokens')."""
    first: dict[int, str] = {}
    alias = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in first:
            alias[name] = first[id(p)]
        else:
            first[id(p)] = name
    return alias


def _load_sharded_model(model: nn.Module, path: Path) -> None:
    from safetensors.torch import load_file
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    state = load_file(str(path))
    for name, source in _tied_names(model).items():
        if name not in state and source in state:
            state[name] = state[source]
    try:
        set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True, strict=True))
    except RuntimeError as e:  # missing / unexpected keys, shape mismatch
        raise CheckpointError(f"{path} does not match the model (a different student?): {e}") from e


_ADAPTER_FILE = "adapter.safetensors"


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


# ------------------------------------------------------------------------------------------------ RNG


def capture_rng_state() -> dict[str, torch.Tensor]:
    """This process's python / numpy / torch (and CUDA) RNG states as fixed-size tensors (so ranks can
    all-gather them without pickling, and ``torch.load(weights_only=True)`` reads them back)."""
    version, words, gauss = random.getstate()
    np_state = np.random.get_state(legacy=True)  # ('MT19937', key[624] uint32, pos, has_gauss, gauss)
    state = {
        "python": torch.tensor([version, *words], dtype=torch.int64),
        "python_gauss": torch.tensor([gauss is not None, gauss or 0.0], dtype=torch.float64),
        "numpy": torch.tensor([*np_state[1].tolist(), np_state[2], np_state[3]], dtype=torch.int64),
        "numpy_gauss": torch.tensor([np_state[4]], dtype=torch.float64),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()  # the current device's generator
    return state


def restore_rng_state(state: Mapping[str, torch.Tensor]) -> None:
    """Inverse of :func:`capture_rng_state`."""
    py = state["python"].tolist()
    has_gauss, gauss = state["python_gauss"].tolist()
    random.setstate((int(py[0]), tuple(int(w) for w in py[1:]), gauss if has_gauss else None))
    npy = state["numpy"].tolist()
    key = np.array(npy[:624], dtype=np.uint32)
    np.random.set_state(("MT19937", key, int(npy[624]), int(npy[625]), float(state["numpy_gauss"][0])))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def gather_rng_states(group=None) -> list[dict[str, torch.Tensor]]:
    """Every trainer rank's :func:`capture_rng_state` (call on all ranks; rank 0 saves the list). Tensors
    travel through all_gather, on the device the group's backend needs."""
    import torch.distributed as dist

    mine = capture_rng_state()
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size(group) == 1:
        return [mine]
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend(group) == "nccl" else None
    world = dist.get_world_size(group)
    out: list[dict[str, torch.Tensor]] = [{} for _ in range(world)]
    for name, t in sorted(mine.items()):
        local = t.to(device) if device is not None else t
        parts = [torch.empty_like(local) for _ in range(world)]
        dist.all_gather(parts, local, group=group)
        for r, part in enumerate(parts):
            out[r][name] = part.cpu()
    return out


# ------------------------------------------------------------------------------------------ discovery


def checkpoint_root(output_dir: str | os.PathLike) -> Path:
    """Where a run's checkpoints live: ``OUTPUT_DIR/checkpoints``."""
    return Path(output_dir) / "checkpoints"


def _is_complete(path: Path) -> bool:
    return path.is_dir() and _STEP_DIR.match(path.name) is not None and (path / "meta.json").is_file()


def list_checkpoints(output_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """Complete checkpoints of a run as (step, path), oldest first."""
    root = checkpoint_root(output_dir)
    if not root.is_dir():
        return []
    found = [
        (int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name)) and _is_complete(p)
    ]
    return sorted(found)


def has_checkpoint(output_dir: str | os.PathLike, step: int) -> bool:
    """A complete checkpoint of ``step`` exists (a failure save after a periodic save of the same step
    has nothing to add and must not collide with it)."""
    return _is_complete(checkpoint_root(output_dir) / f"step_{step:06d}")


def latest(output_dir: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint of a run, or None."""
    found = list_checkpoints(output_dir)
    return found[-1][1] if found else None


def resolve_resume(resume: str, output_dir: str | os.PathLike) -> Path | None:
    """``trainer.resume``: ``never`` -> None; ``auto`` -> :func:`latest` (None for a fresh run); otherwise
    a checkpoint directory, or a run directory whose newest checkpoint is used."""
    if resume == "never":
        return None
    if resume == "auto":
        return latest(output_dir)
    path = Path(resume)
    if (path / "meta.json").is_file():
        return path
    newest = latest(path)
    if newest is None:
        raise CheckpointError(
            f"trainer.resume={resume}: not a checkpoint (no meta.json) and no complete checkpoint under "
            f"{checkpoint_root(path)}; pass a step_* directory, auto or never"
        )
    return newest


def should_save(step: int, save_freq: int, total_steps: int) -> bool:
    """After optimizer step ``step`` (1-based count of steps done): every ``save_freq`` steps and at the
    end (``save_freq=0``: only at the end)."""
    return step == total_steps or (save_freq > 0 and step % save_freq == 0)


# ----------------------------------------------------------------------------------------------- save


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(path: Path) -> None:
    for p in sorted(path.rglob("*"), reverse=True):  # files before their directories
        _fsync_path(p)
    _fsync_path(path)


def _remove_stale_tmp(root: Path) -> None:
    """``.tmp-*`` directories are saves that died (kill -9); only rank 0 saves, so none is in progress."""
    for p in root.iterdir():
        if p.name.startswith(_TMP_PREFIX) and p.is_dir():
            shutil.rmtree(p, ignore_errors=True)


def _atomic_dir(final: Path, write) -> Path:
    """Run ``write(tmp_dir)``, fsync, rename to ``final``. On any failure the temp dir is removed and
    ``final`` is untouched."""
    final.parent.mkdir(parents=True, exist_ok=True)
    if final.exists():
        raise CheckpointError(f"{final} already exists; refusing to overwrite a complete checkpoint")
    tmp = final.parent / f"{_TMP_PREFIX}{final.name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        write(tmp)
        _fsync_tree(tmp)
        os.rename(tmp, final)
        _fsync_path(final.parent)  # make the rename itself durable
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def save_checkpoint(output_dir: str | os.PathLike, step: int, *, keep_last: int = 2, **state: Any) -> Path:
    """Write ``OUTPUT_DIR/checkpoints/step_{step:06d}`` atomically from the live state (the keyword
    arguments of :func:`snapshot`: ``model``, ``optimizer``, ``lr_scheduler``, ...), then delete all but
    the newest ``keep_last`` complete checkpoints. Call on trainer rank 0 only (DDP replicas are
    identical). :class:`gkd.checkpoint_writer.CheckpointWriter` writes the same files from a host-memory
    copy on a background thread."""
    return write_snapshot(output_dir, snapshot(step, **state), keep_last=keep_last)


@dataclass
class Snapshot:
    """Everything a checkpoint holds, as in memory (:func:`snapshot`); :func:`write_snapshot` writes it."""

    step: int
    weights_file: str  # model.safetensors | adapter.safetensors
    weights: dict[str, torch.Tensor]
    weights_metadata: dict[str, str] | None  # safetensors' header metadata (the tied names save_model drops)
    optimizer: dict[str, Any] | None
    trainer_state: dict[str, Any]
    config_yaml: str


def snapshot(
    step: int,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    lr_scheduler=None,
    data_state: Mapping[str, Any] | None = None,
    scheduler_state: Mapping[str, Any] | None = None,
    config_yaml: str = "",
    rng_states: Sequence[Mapping[str, torch.Tensor]] | None = None,
    model_state: Mapping[str, torch.Tensor] | None = None,
    optimizer_state: Mapping[str, Any] | None = None,
    copy=None,
) -> Snapshot:
    """What :func:`save_checkpoint` writes. The tensors are the live ones unless ``copy`` (a function
    mapping nested dicts / lists of tensors to a copy) makes them independent of training.

    A sharded model passes ``model_state`` / ``optimizer_state`` from :func:`full_state_dicts` (gathered
    on every rank before this call); ``model`` then only names the tied parameters. A LoRA student writes
    ``adapter.safetensors`` (its trainable tensors; sharded: ``full_state_dicts(..., frozen=False)``).
    ``data_state`` is ``PromptLoader.state_dict_at(next batch)``; ``scheduler_state`` the staleness
    scheduler's resume state; both must hold plain values / tensors only. ``rng_states`` defaults to this
    process's (:func:`gather_rng_states` for all ranks)."""
    copy = copy or (lambda obj: obj)
    rng = list(rng_states) if rng_states is not None else [capture_rng_state()]
    trainer_state = {
        "format_version": FORMAT_VERSION,
        "step": int(step),
        "lr_scheduler": lr_scheduler.state_dict() if lr_scheduler is not None else None,
        "rng": rng,
        "data": dict(data_state) if data_state is not None else None,
        "scheduler": dict(scheduler_state) if scheduler_state is not None else None,
        "optimizer_format": "fqn" if optimizer_state is not None else "torch",
    }
    metadata = None
    if is_lora(model):  # the adapter only: the base is model.student_path, unchanged
        adapter = model_state if model_state is not None else adapter_state_dict(model)
        name, weights = _ADAPTER_FILE, {k: v.contiguous() for k, v in adapter.items()}
    elif model_state is not None:  # each shared parameter once
        tied = _tied_names(_unwrap(model))
        weights = {k: v.contiguous() for k, v in model_state.items() if k not in tied}
        name = "model.safetensors"
    else:  # what safetensors' save_model writes: shared tensors once, the dropped names in the metadata
        from safetensors.torch import _remove_duplicate_names

        state = _unwrap(model).state_dict()
        for kept, dropped in _remove_duplicate_names(state).items():
            for alias in dropped:
                metadata = {**(metadata or {}), alias: kept}
                del state[alias]
        name, weights = "model.safetensors", {k: v.contiguous() for k, v in state.items()}
    if optimizer_state is not None:
        optim = dict(optimizer_state)
    else:
        optim = optimizer.state_dict() if optimizer is not None else None
    return Snapshot(int(step), name, copy(weights), metadata, copy(optim), copy(trainer_state), config_yaml)


def write_snapshot(output_dir: str | os.PathLike, state: Snapshot, *, keep_last: int = 2) -> Path:
    """Write ``state`` as ``OUTPUT_DIR/checkpoints/step_{step:06d}`` (atomically: a temporary folder,
    fsynced, renamed), then delete all but the newest ``keep_last`` complete checkpoints."""
    from safetensors.torch import save_file

    if keep_last < 1:
        raise ValueError(f"keep_last={keep_last} must be >= 1")
    root = checkpoint_root(output_dir)
    root.mkdir(parents=True, exist_ok=True)
    _remove_stale_tmp(root)

    def write(tmp: Path) -> None:
        save_file(state.weights, str(tmp / state.weights_file), metadata=state.weights_metadata)
        if state.optimizer is not None:
            torch.save(state.optimizer, tmp / "optimizer.pt")
        torch.save(state.trainer_state, tmp / "trainer_state.pt")
        (tmp / "config.yaml").write_text(state.config_yaml)
        files = sorted(p.name for p in tmp.iterdir())
        meta = {"format_version": FORMAT_VERSION, "step": state.step, "files": files, "time": time.time()}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))  # last: marks the content complete

    path = _atomic_dir(root / f"step_{state.step:06d}", write)
    for _, old in list_checkpoints(output_dir)[:-keep_last]:
        shutil.rmtree(old)
    return path


# ----------------------------------------------------------------------------------------------- load


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


def load_checkpoint(
    path: str | os.PathLike,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    lr_scheduler=None,
    rank: int = 0,
    restore_rng: bool = True,
) -> LoadedCheckpoint:
    """Load a checkpoint from :func:`save_checkpoint` into ``model`` (strictly: names and shapes must
    match), ``optimizer`` and ``lr_scheduler`` when given; restore this rank's RNG states (rank ``r``
    takes the saved rank ``r``'s, so with a different world size only ranks that existed are restored).
    Every trainer rank calls it. Returns the step, data position, scheduler state and config."""
    path = Path(path)
    meta_path = path / "meta.json"
    if not meta_path.is_file():
        raise CheckpointError(f"{path} is not a complete checkpoint (no meta.json)")
    meta = json.loads(meta_path.read_text())
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: checkpoint format {meta.get('format_version')}, this gkd reads {FORMAT_VERSION}"
        )
    sharded = is_sharded(model)
    saved_lora = (path / _ADAPTER_FILE).is_file()
    if saved_lora != is_lora(model):
        raise CheckpointError(
            f"{path} holds "
            + ("a LoRA adapter (adapter.safetensors)" if saved_lora else "a full student (model.safetensors)")
            + f" but this run's student is {'a LoRA' if is_lora(model) else 'a full'} model: resume it with "
            f"model.lora.enabled={str(saved_lora).lower()} (and the same model.lora settings)"
        )
    if saved_lora:
        _load_adapter(model, path, sharded)
    elif sharded:  # every rank reads the full tensors and keeps its shards
        _load_sharded_model(model, path / "model.safetensors")
    else:
        missing, unexpected = load_model(_unwrap(model), str(path / "model.safetensors"), strict=False)
        if missing or unexpected:
            raise CheckpointError(
                f"{path}/model.safetensors does not match the model: missing {sorted(missing)[:10]}, "
                f"unexpected {sorted(unexpected)[:10]} (a different student?)"
            )
    state = _torch_load(path / "trainer_state.pt")
    if optimizer is not None:
        _load_optimizer(model, optimizer, _torch_load(path / "optimizer.pt"), state, sharded, path)
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


def _load_optimizer(model, optimizer, saved: dict, trainer_state: dict, sharded: bool, path: Path) -> None:
    fmt = trainer_state.get("optimizer_format", "torch")
    if fmt == "torch" and not sharded:
        optimizer.load_state_dict(saved)
        return
    if fmt != "fqn":
        raise CheckpointError(
            f"{path}: the optimizer state was saved by an unsharded (ddp) run, this run is sharded (fsdp2); "
            "resume it with trainer.strategy=ddp"
        )
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(model, optimizer, saved, options=StateDictOptions(full_state_dict=True))


# --------------------------------------------------------------------------------------------- export


def export_hf(
    model: nn.Module,
    tokenizer,
    path: str | os.PathLike,
    *,
    state: Mapping[str, torch.Tensor] | None = None,
    adapter_path: str | os.PathLike | None = None,
) -> Path:
    """Save the student as a Hugging Face folder (safetensors weights + config + tokenizer), atomically;
    an existing folder at ``path`` is replaced only after the new one is complete. A sharded model passes
    its full ``state`` (from :func:`full_state_dicts`, gathered on every rank).

    A LoRA student: ``path`` gets the base model with every adapter merged (``W + scale * B @ A``, what
    the rollout engines ran; loads with ``AutoModelForCausalLM``), and ``adapter_path`` (default: next
    to it, ``<name>_adapter``) peft's adapter folder (``PeftModel.from_pretrained(base, adapter_path)``)."""
    final = Path(path)
    hf = _unwrap(model)
    if not is_lora(model):
        return _replace_dir(final, lambda tmp: _save_hf(hf, tokenizer, tmp, state))
    full = dict(state) if state is not None else hf.state_dict()
    merged = merged_state_dict(hf, full)
    adapter = {k: v for k, v in full.items() if k in {n for n, p in hf.named_parameters() if p.requires_grad}}

    def write_adapter(tmp: Path) -> None:
        hf.save_pretrained(str(tmp), state_dict=adapter, save_embedding_layers=False)

    _replace_dir(
        Path(adapter_path) if adapter_path else final.parent / f"{final.name}_adapter", write_adapter
    )
    return _replace_dir(final, lambda tmp: _save_hf(hf.get_base_model(), tokenizer, tmp, merged))


def _save_hf(hf: nn.Module, tokenizer, tmp: Path, state: Mapping[str, torch.Tensor] | None) -> None:
    hf.save_pretrained(str(tmp), state_dict=dict(state) if state is not None else None)
    if tokenizer is not None:
        tokenizer.save_pretrained(str(tmp))


def _replace_dir(final: Path, write) -> Path:
    """:func:`_atomic_dir`, replacing an existing ``final`` only once the new folder is complete."""
    if not final.exists():
        return _atomic_dir(final, write)
    staged = _atomic_dir(final.parent / f"{final.name}.new", write)
    old = final.parent / f"{_TMP_PREFIX}{final.name}-old-{os.getpid()}"
    os.rename(final, old)
    os.rename(staged, final)
    _fsync_path(final.parent)
    shutil.rmtree(old)
    return final
