"""Sharded checkpoints of FSDP2 students with ``torch.distributed.checkpoint`` (DCP), and loading any
checkpoint into a sharded model without a full copy on every rank.

Layout of a sharded checkpoint (``meta.json``: ``"layout": "dcp"``)::

    step_000042/
      dcp/.metadata        DCP's index: every tensor's global shape, dtype and where its chunks are
      dcp/__<r>_0.distcp   rank r's shards of the model ("model.<name>") and of the AdamW state
                           ("optim.state.<name>.exp_avg", ...; "optim.param_groups.<name>...")
      trainer_state.pt     step, LR scheduler, data position, staleness scheduler, every rank's RNG (rank 0)
      config.yaml          the resolved run config
      meta.json            written last, by rank 0

Every rank writes its own shards (:func:`save_sharded_state`): no rank ever holds the full model or
optimizer. All ranks write into the same ``.tmp-step_000042`` folder (prepared by rank 0 before a barrier);
DCP's coordinator (rank 0) gathers every rank's write result before it writes ``.metadata``, so once rank
0's save has returned every shard is written and fsynced; rank 0 then commits like a single-file save
(``meta.json``, fsync, rename). A checkpoint folder needs a file system every trainer rank sees.

Loading (:func:`load_dcp`) asks DCP for the state in the *current* model's form (its DTensor shards, or plain
full tensors for an unsharded model): DCP reads the overlapping pieces of the saved chunks, so a checkpoint
of 2 ranks resumes on 4 (and on 1, and into DDP). The other direction, a single-file checkpoint (DDP
runs, gkd's format 1) into a sharded model, goes through :func:`load_full_into_sharded`: rank 0 reads the
files, and DCP's ``set_*_state_dict(broadcast_from_rank0=True)`` broadcasts tensor by tensor into the
shards; a DDP optimizer state (keyed by parameter index) is converted to parameter names first.
"""

from __future__ import annotations

import contextlib
import warnings
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

__all__ = [
    "DCP_DIR",
    "checkpoint_group",
    "load_dcp",
    "load_full_into_sharded",
    "named_optimizer_state",
    "one_process_quiet",
    "save_sharded_state",
    "sharded_state",
]

DCP_DIR = "dcp"

_GROUP: dict[str, Any] = {}


def checkpoint_group():
    """A gloo group of all ranks for DCP's own collectives (created once; a collective): a background
    save plans and gathers its results on its thread while training uses the default group, and a CPU
    backend is what ``dcp.async_save`` needs next to NCCL."""
    if not (dist.is_available() and dist.is_initialized()):
        return None
    key = f"{id(dist.group.WORLD)}"
    if key not in _GROUP:
        _GROUP.clear()
        _GROUP[key] = dist.new_group(backend="gloo")
    return _GROUP[key]


@contextlib.contextmanager
def one_process_quiet():
    """Without a process group ``dcp.load`` warns that it assumes one process: it is meant."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "torch.distributed is disabled", UserWarning)
        yield


def _options(frozen: bool, **extra):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(ignore_frozen_params=not frozen, **extra)


def sharded_state(model: nn.Module, optimizer: torch.optim.Optimizer | None, *, frozen: bool = True) -> dict:
    """``{"model": ..., "optim": ...}`` in the model's own form (DTensor shards of an FSDP2 model, plain
    tensors otherwise), keyed by parameter name; ``frozen=False`` leaves out parameters that do not require
    grad (a LoRA student: the adapter)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict

    if optimizer is None:
        return {"model": get_model_state_dict(model, options=_options(frozen))}
    model_state, optim_state = get_state_dict(model, optimizer, options=_options(frozen))
    return {"model": model_state, "optim": optim_state}


def save_sharded_state(
    folder: Path, model: nn.Module, optimizer: torch.optim.Optimizer | None, *, frozen: bool, background: bool
) -> Future:
    """Every rank writes its shards into ``folder/dcp`` (a collective on :func:`checkpoint_group`). Returns
    a future that is done once this rank's part is written (rank 0: once every rank's is, and ``.metadata``).
    ``background``: ``dcp.async_save`` copies the shards to host memory and writes on a thread."""
    import torch.distributed.checkpoint as dcp

    state = sharded_state(model, optimizer, frozen=frozen)
    writer = dcp.FileSystemWriter(str(folder / DCP_DIR), sync_files=True)
    group = checkpoint_group()
    if background:
        response = dcp.async_save(state, storage_writer=writer, process_group=group)
        return getattr(response, "upload_completion", response)
    done: Future = Future()
    dcp.save(state, storage_writer=writer, process_group=group)
    done.set_result(None)
    return done


def load_dcp(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer | None, *, frozen: bool) -> None:
    """Load ``path/dcp`` into ``model`` (and ``optimizer``) in their current form: DTensor shards of any
    world size, or full tensors of an unsharded model. Every rank calls it (without a process group: one
    process reads everything)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_state_dict

    from gkd.trainer.checkpoint.folders import CheckpointError

    state = sharded_state(model, optimizer, frozen=frozen)
    try:
        with one_process_quiet():
            dcp.load(state, checkpoint_id=str(path / DCP_DIR), process_group=checkpoint_group())
    except Exception as e:  # a key or shape the checkpoint lacks (DCP raises CheckpointException / KeyError)
        raise CheckpointError(
            f"{path}/{DCP_DIR} does not match this run's student or optimizer (a different model, "
            f"model.lora settings or optimizer?): {_first_line(e)}"
        ) from e
    if optimizer is None:
        set_model_state_dict(model, state["model"], options=_options(frozen))
    else:
        set_state_dict(
            model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"],
            options=_options(frozen),
        )  # fmt: skip


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"


def named_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, saved: dict) -> dict:
    """A ``torch.optim`` state dict keyed by parameter index (what a DDP run saves) -> keyed by parameter
    name (DCP's full form). Indices follow ``optimizer.param_groups`` order, which ``build_optimizer`` makes
    the same for every strategy, so index i of group g names the live group g's i-th parameter."""
    names = {id(p): n for n, p in model.named_parameters()}
    groups, state = [], {}
    live = optimizer.param_groups
    if len(saved["param_groups"]) != len(live) or any(
        len(s["params"]) != len(g["params"]) for s, g in zip(saved["param_groups"], live, strict=True)
    ):
        raise ValueError("the saved optimizer's parameter groups differ from this run's")
    for group, mine in zip(saved["param_groups"], live, strict=True):
        fqns = [names[id(p)] for p in mine["params"]]
        for index, fqn in zip(group["params"], fqns, strict=True):
            if index in saved["state"]:
                state[fqn] = saved["state"][index]
        groups.append({**group, "params": fqns})
    return {"state": state, "param_groups": groups}


def load_full_into_sharded(
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None,
    read_model,
    read_optimizer,
    *,
    frozen: bool,
) -> None:
    """A full (single-file) state into a sharded model: rank 0 calls ``read_model()`` (and
    ``read_optimizer()``: a name-keyed optimizer state), the other ranks read nothing; the tensors are
    broadcast one by one into each rank's shards."""
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    rank0 = dist.get_rank() == 0
    options = _options(frozen, full_state_dict=True, broadcast_from_rank0=True, strict=frozen)
    set_model_state_dict(model, read_model() if rank0 else {}, options=options)
    if optimizer is not None:
        set_optimizer_state_dict(model, optimizer, read_optimizer() if rank0 else {}, options=options)
