"""Atomic, resumable checkpoints and the final Hugging Face export.

Layout: ``OUTPUT_DIR/checkpoints/step_000042/``. Two layouts, named by ``meta.json``'s ``"layout"``:

``files`` (DDP and one-process runs; every checkpoint of gkd's format 1)::

    model.safetensors   the student's state (tied tensors stored once)
      or adapter.safetensors: a LoRA student's (``model.lora``) adapter tensors only, by their peft names
    optimizer.pt        optimizer.state_dict() (a LoRA student's optimizer holds the adapter only)
    trainer_state.pt    step, LR scheduler, RNG states (one per trainer rank), data position, scheduler state
    config.yaml         the resolved run config
    meta.json           written last: format version, layout, step, file list

``dcp`` (FSDP2 students): ``dcp/`` holds every rank's shards of the model and optimizer, written by
``torch.distributed.checkpoint`` (:mod:`gkd.trainer.checkpoint.sharded`), next to the same
``trainer_state.pt``, ``config.yaml`` and ``meta.json`` written by rank 0. :func:`load_checkpoint` reads
either layout into either strategy and any world size.

A checkpoint is written into ``.tmp-step_000042-<suffix>`` in the same parent, every file and the directory
fsynced, then renamed to its final name (atomic on POSIX), so a directory named ``step_*`` is always
complete: a crash or ``kill -9`` mid-write leaves at most a ``.tmp-*`` directory, which :func:`latest`
ignores and the next save deletes. ``.pt`` files are our own, read back from local disk with
``torch.load(weights_only=True)``: they must hold tensors and plain Python values only.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from gkd.trainer.checkpoint.folders import (
    _TMP_PREFIX,
    CheckpointError,
    checkpoint_root,
    list_checkpoints,
)
from gkd.trainer.checkpoint.prune import to_prune, weights_finite
from gkd.trainer.checkpoint.rng import capture_rng_state
from gkd.trainer.lora import adapter_state_dict, is_lora, merged_state_dict

FORMAT_VERSION = 2  # 2: meta.json names the layout (files | dcp); 1: files only
_READABLE = (1, 2)


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


_ADAPTER_FILE = "adapter.safetensors"


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
    """``.tmp-*`` directories are saves that died (kill -9); only rank 0 commits and a save starts after
    the previous one is committed, so none is in progress."""
    for p in root.iterdir():
        if p.name.startswith(_TMP_PREFIX) and p.is_dir():
            shutil.rmtree(p, ignore_errors=True)


def _tmp_dir(final: Path, suffix: str) -> Path:
    """A fresh ``.tmp-<name>-<suffix>`` next to ``final`` (which must not exist)."""
    final.parent.mkdir(parents=True, exist_ok=True)
    if final.exists():
        raise CheckpointError(f"{final} already exists; refusing to overwrite a complete checkpoint")
    tmp = final.parent / f"{_TMP_PREFIX}{final.name}-{suffix}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    return tmp


def _commit(tmp: Path, final: Path) -> None:
    """fsync everything under ``tmp``, rename it to ``final``, fsync the parent (the rename is durable)."""
    _fsync_tree(tmp)
    os.rename(tmp, final)
    _fsync_path(final.parent)


def _atomic_dir(final: Path, write) -> Path:
    """Run ``write(tmp_dir)``, fsync, rename to ``final``. On any failure the temp dir is removed and
    ``final`` is untouched."""
    tmp = _tmp_dir(final, str(os.getpid()))
    try:
        write(tmp)
        _commit(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def save_checkpoint(output_dir: str | os.PathLike, step: int, *, keep_last: int = 2, **state: Any) -> Path:
    """Write ``OUTPUT_DIR/checkpoints/step_{step:06d}`` atomically from the live state (the keyword
    arguments of :func:`snapshot`: ``model``, ``optimizer``, ``lr_scheduler``, ...), then delete all but
    the newest ``keep_last`` complete checkpoints. Call on trainer rank 0 only (DDP replicas are
    identical). :class:`gkd.trainer.checkpoint.writer.CheckpointWriter` writes the same files from a
    host-memory copy on a background thread."""
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
    trainer_state = make_trainer_state(
        step, lr_scheduler, data_state, scheduler_state, rng_states,
        optimizer_format="fqn" if optimizer_state is not None else "torch",
    )  # fmt: skip
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


def make_trainer_state(
    step: int,
    lr_scheduler=None,
    data_state: Mapping[str, Any] | None = None,
    scheduler_state: Mapping[str, Any] | None = None,
    rng_states: Sequence[Mapping[str, torch.Tensor]] | None = None,
    *,
    optimizer_format: str,
) -> dict[str, Any]:
    """``trainer_state.pt``'s content (both layouts): plain values and tensors only. ``optimizer_format``:
    ``torch`` (keyed by parameter index), ``fqn`` (by name) or ``dcp`` (the optimizer is in ``dcp/``)."""
    return {
        "format_version": FORMAT_VERSION,
        "step": int(step),
        "lr_scheduler": lr_scheduler.state_dict() if lr_scheduler is not None else None,
        "rng": list(rng_states) if rng_states is not None else [capture_rng_state()],
        "data": dict(data_state) if data_state is not None else None,
        "scheduler": dict(scheduler_state) if scheduler_state is not None else None,
        "optimizer_format": optimizer_format,
    }


def _write_small_files(tmp: Path, trainer_state: dict, config_yaml: str, step: int, **meta: Any) -> None:
    """``trainer_state.pt``, ``config.yaml``, then ``meta.json`` (last: marks the content complete)."""
    torch.save(trainer_state, tmp / "trainer_state.pt")
    (tmp / "config.yaml").write_text(config_yaml)
    files = sorted(p.name for p in tmp.iterdir())
    from gkd.trainer.checkpoint.runs import read_run_id

    run_id = read_run_id(tmp.parent.parent)  # OUTPUT_DIR/checkpoints/.tmp-*: the run writing it
    meta = {"format_version": FORMAT_VERSION, **meta, "step": step, "files": files, "time": time.time()}
    if run_id is not None:
        meta["run_id"] = run_id
    (tmp / "meta.json").write_text(json.dumps(meta, indent=1))


def _prune(output_dir: str | os.PathLike, keep_last: int) -> None:
    """All but the newest ``keep_last``, never the newest with finite weights
    (``gkd.trainer.checkpoint.prune``)."""
    for old in to_prune(list_checkpoints(output_dir), keep_last):
        shutil.rmtree(old)


def sharded_tmp(output_dir: str | os.PathLike, step: int) -> Path:
    """The temporary folder every rank of a sharded save writes into (the same name on every rank)."""
    return checkpoint_root(output_dir) / f"{_TMP_PREFIX}step_{step:06d}-dcp"


def begin_sharded(output_dir: str | os.PathLike, step: int) -> Path:
    """Rank 0, before a sharded save: sweep dead temporary folders, create :func:`sharded_tmp`."""
    root = checkpoint_root(output_dir)
    root.mkdir(parents=True, exist_ok=True)
    _remove_stale_tmp(root)
    return _tmp_dir(root / f"step_{step:06d}", "dcp")


def finish_sharded(
    output_dir: str | os.PathLike, step: int, trainer_state: dict, config_yaml: str, *, lora: bool,
    keep_last: int, weights_finite: bool = True,
) -> Path:  # fmt: skip
    """Rank 0, once every rank's shards are in :func:`sharded_tmp`: the small files, then the atomic
    commit and the pruning; on failure the temporary folder is removed (no checkpoint).
    ``weights_finite``: every rank's shards were finite (recorded in meta.json for the pruning)."""
    tmp = sharded_tmp(output_dir, step)
    final = checkpoint_root(output_dir) / f"step_{step:06d}"
    try:
        _write_small_files(
            tmp, trainer_state, config_yaml, step, layout="dcp", lora=lora, weights_finite=weights_finite
        )
        _commit(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _prune(output_dir, keep_last)
    return final


def write_snapshot(output_dir: str | os.PathLike, state: Snapshot, *, keep_last: int = 2) -> Path:
    """Write ``state`` as ``OUTPUT_DIR/checkpoints/step_{step:06d}`` (atomically: a temporary folder,
    fsynced, renamed), then delete all but the newest ``keep_last`` complete checkpoints (keeping the newest
    with finite weights: meta.json records ``weights_finite``)."""
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
        lora, finite = state.weights_file == _ADAPTER_FILE, weights_finite(state.weights.values())
        _write_small_files(tmp, state.trainer_state, state.config_yaml, state.step, layout="files", lora=lora,
                           weights_finite=finite)  # fmt: skip

    path = _atomic_dir(root / f"step_{state.step:06d}", write)
    _prune(output_dir, keep_last)
    return path


# --------------------------------------------------------------------------------------------- export


def export_hf(
    model: nn.Module,
    tokenizer,
    path: str | os.PathLike,
    *,
    state: Mapping[str, torch.Tensor] | None = None,
    adapter_path: str | os.PathLike | None = None,
    dtype: torch.dtype | None = None,
) -> Path:
    """Save the student as a Hugging Face folder (safetensors weights in ``dtype``, default the
    parameters'; config; tokenizer), atomically; an existing folder at ``path`` is replaced only after the
    new one is complete. A sharded model passes its full ``state`` (from :func:`full_state_dicts`).

    A LoRA student: ``path`` gets the base model with every adapter merged (``W + scale * B @ A``, what
    the rollout engines ran; loads with ``AutoModelForCausalLM``), and ``adapter_path`` (default: next
    to it, ``<name>_adapter``) peft's adapter folder (``PeftModel.from_pretrained(base, adapter_path)``)."""
    from gkd.trainer.export import export_state

    final = Path(path)
    hf = base = _unwrap(model)
    full = dict(state) if state is not None else hf.state_dict()
    if is_lora(model):
        trainable = {n for n, p in hf.named_parameters() if p.requires_grad}
        adapter = {k: v for k, v in full.items() if k in trainable}

        def write_adapter(tmp: Path) -> None:
            hf.save_pretrained(str(tmp), state_dict=adapter, save_embedding_layers=False)

        _replace_dir(
            Path(adapter_path) if adapter_path else final.parent / f"{final.name}_adapter", write_adapter
        )
        full, base = merged_state_dict(hf, full), hf.get_base_model()
    dtype = dtype or next(base.parameters()).dtype
    return export_state(base, full, final, dtype=dtype, tokenizer=tokenizer, skip=list(_tied_names(base)))


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
