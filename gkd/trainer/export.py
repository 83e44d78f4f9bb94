"""Hugging Face folders from a student: ``gkd export CHECKPOINT OUT [--dtype bfloat16|float32|float16]``
and the final export at the end of training (``OUTPUT_DIR/final``).

The weights are streamed: tensors are read a few at a time (``safe_open`` for the ``files`` layout,
``dcp.load`` into preallocated full tensors of a bounded group of names for the ``dcp`` layout, no process
group needed), cast to the export dtype and written into safetensors shards of at most ``max_shard_bytes``
(``model.safetensors``, or ``model-0000i-of-0000n.safetensors`` + ``model.safetensors.index.json``), so
the whole model is never held in memory at once. The folder gets the student's ``config.json`` (its
``dtype`` set to the export dtype), generation config and tokenizer when the student folder has them, and
replaces an existing ``OUT`` only once complete.

A LoRA checkpoint holds the adapter only: the export builds the base student from ``model.student_path``
(in the checkpoint's config, or ``--student``), loads the adapter, and writes the merged weights plus
peft's adapter folder next to it (``OUT_adapter``), as the end of training does.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import torch

from gkd.config.dtypes import DTYPE_NAMES, torch_dtype
from gkd.trainer.checkpoint.folders import CheckpointError
from gkd.trainer.checkpoint.load import read_meta
from gkd.trainer.checkpoint.save import _replace_dir

log = logging.getLogger("gkd.export")

__all__ = ["add_export_cli", "export_checkpoint", "export_dtype", "student_dtype", "write_hf_folder"]

MAX_SHARD_BYTES = 2 << 30
READ_BYTES = 1 << 30  # the dcp layout: tensors read per dcp.load call


class ExportError(ValueError):
    """A checkpoint or student folder that cannot be exported; the message names it and what to do."""


def student_dtype(student_path: str | os.PathLike, fallback: str = "float32") -> torch.dtype:
    """The dtype the student's ``config.json`` names (``dtype`` / ``torch_dtype``), else ``fallback``."""
    try:
        config = json.loads((Path(student_path) / "config.json").read_text())
    except (OSError, ValueError):
        config = {}
    name = config.get("dtype") or config.get("torch_dtype")
    return torch_dtype(name if name in DTYPE_NAMES else fallback)


def export_dtype(cfg) -> torch.dtype:
    """``trainer.export_dtype`` of a run's config (``auto``: the student's own, else model.param_dtype)."""
    name = cfg.trainer.export_dtype
    return (
        student_dtype(cfg.model.student_path, cfg.model.param_dtype) if name == "auto" else torch_dtype(name)
    )


def _plan_shards(sizes: Sequence[tuple[str, int]], max_bytes: int) -> list[list[str]]:
    """Names in order, cut into groups of at most ``max_bytes`` (a larger tensor alone)."""
    shards: list[list[str]] = [[]]
    used = 0
    for name, nbytes in sizes:
        if shards[-1] and used + nbytes > max_bytes:
            shards.append([])
            used = 0
        shards[-1].append(name)
        used += nbytes
    return shards


def write_hf_folder(
    out: str | os.PathLike,
    config,
    tensors: Iterator[tuple[str, torch.Tensor]],
    sizes: Sequence[tuple[str, int]],
    *,
    dtype: torch.dtype,
    tokenizer=None,
    generation_config=None,
    max_shard_bytes: int = MAX_SHARD_BYTES,
) -> Path:
    """Write a Hugging Face folder at ``out`` (atomically, replacing an existing one when complete) from
    ``tensors`` (yielded in the order of ``sizes``: (name, bytes in ``dtype``)), cast to ``dtype``; only one
    shard's tensors are held at a time."""
    from safetensors.torch import save_file

    shards = _plan_shards(sizes, max_shard_bytes)
    files = (
        ["model.safetensors"]
        if len(shards) == 1
        else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    )
    total = sum(n for _, n in sizes)

    def write(tmp: Path) -> None:
        weight_map = {}
        for names, file in zip(shards, files, strict=True):
            part = {}
            for want in names:
                name, tensor = next(tensors)
                if name != want:
                    raise RuntimeError(f"tensors came out of order: {name} where {want} was planned")
                part[name] = tensor.to(dtype).contiguous()
                weight_map[name] = file
            save_file(part, str(tmp / file), metadata={"format": "pt"})
            del part
        if len(files) > 1:
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        saved = copy.deepcopy(config)  # the live model's config keeps its dtype
        saved.dtype = dtype
        saved.save_pretrained(str(tmp))
        if generation_config is not None:
            generation_config.save_pretrained(str(tmp))
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))

    return _replace_dir(Path(out), write)


def export_state(
    hf_model,
    state: dict[str, torch.Tensor],
    out: str | os.PathLike,
    *,
    dtype: torch.dtype,
    tokenizer=None,
    skip: Sequence[str] = (),
) -> Path:
    """An in-memory state dict (a model's own, or gathered) as a Hugging Face folder of ``hf_model``'s
    config; names in ``skip`` (tied aliases) are left out."""
    names = [n for n in state if n not in set(skip)]
    sizes = [(n, state[n].numel() * dtype.itemsize) for n in names]
    return write_hf_folder(
        out, hf_model.config, ((n, state[n]) for n in names), sizes, dtype=dtype, tokenizer=tokenizer,
        generation_config=getattr(hf_model, "generation_config", None),
    )  # fmt: skip


# ------------------------------------------------------------------------------------- reading checkpoints


def _files_tensors(path: Path) -> tuple[list[tuple[str, torch.Size]], Callable[[], Iterator]]:
    """The tensors of ``model.safetensors``, read one at a time; a tied name the file stores once (its
    header metadata maps the dropped name to the kept one) is listed under both names."""
    from safetensors import safe_open

    file = str(path / "model.safetensors")
    with safe_open(file, framework="pt") as f:
        keys = list(f.keys())
        shapes = {k: torch.Size(f.get_slice(k).get_shape()) for k in keys}
        aliases = {a: k for a, k in (f.metadata() or {}).items() if k in shapes and a not in shapes}
    listed = [*((k, shapes[k]) for k in keys), *((a, shapes[k]) for a, k in aliases.items())]

    def read() -> Iterator[tuple[str, torch.Tensor]]:
        with safe_open(file, framework="pt") as f:
            for name, _ in listed:
                yield name, f.get_tensor(aliases.get(name, name))

    return listed, read


def _dcp_tensors(path: Path) -> tuple[list[tuple[str, torch.Size]], Callable[[], Iterator]]:
    """The model tensors of a ``dcp`` checkpoint, loaded a group of names at a time (at most
    :data:`READ_BYTES` each, into preallocated full tensors) by one process without a process group."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    from gkd.trainer.checkpoint.sharded import DCP_DIR, one_process_quiet

    folder = str(path / DCP_DIR)
    meta = dcp.FileSystemReader(folder).read_metadata().state_dict_metadata
    entries = {
        k[len("model.") :]: v
        for k, v in meta.items()
        if k.startswith("model.") and isinstance(v, TensorStorageMetadata)
    }
    shapes = [(name, entry.size) for name, entry in entries.items()]

    def read() -> Iterator[tuple[str, torch.Tensor]]:
        sizes = [(n, e.size.numel() * e.properties.dtype.itemsize) for n, e in entries.items()]
        for group in _plan_shards(sizes, READ_BYTES):
            state = {
                f"model.{n}": torch.empty(entries[n].size, dtype=entries[n].properties.dtype) for n in group
            }
            with one_process_quiet():
                dcp.load(state, storage_reader=dcp.FileSystemReader(folder), no_dist=True)
            for n in group:
                yield n, state.pop(f"model.{n}")

    return shapes, read


def _checkpoint_config(path: Path, student: str | None):
    """(the run's Config, the student folder) of a checkpoint; the folder must exist here."""
    from gkd.config import ConfigError, load_config

    try:
        cfg = load_config([str(path / "config.yaml")], check=False)
    except (ConfigError, OSError) as e:
        raise ExportError(f"{path}/config.yaml cannot be read ({e}): is {path} a gkd checkpoint?") from e
    folder = student or cfg.model.student_path
    if not folder or not (Path(folder) / "config.json").is_file():
        raise ExportError(
            f"{path}: its student folder model.student_path={folder!r} has no config.json here; pass "
            "--student PATH (the model folder the run started from)"
        )
    return cfg, folder


def export_checkpoint(
    checkpoint: str | os.PathLike,
    out: str | os.PathLike,
    *,
    dtype: str | torch.dtype | None = None,
    student: str | None = None,
    max_shard_bytes: int = MAX_SHARD_BYTES,
) -> Path:
    """Any gkd checkpoint (``files`` or ``dcp`` layout, full or LoRA) -> a Hugging Face folder at ``out``.
    ``dtype``: the weights' dtype (default: ``trainer.export_dtype`` of the checkpoint's config; ``auto``:
    the student's own). Raises :class:`ExportError` / :class:`~gkd.trainer.checkpoint.CheckpointError`."""
    from transformers import AutoConfig

    path = Path(checkpoint)
    meta = read_meta(path)
    cfg, folder = _checkpoint_config(path, student)
    if isinstance(dtype, torch.dtype):
        target = dtype
    else:
        cfg.trainer.export_dtype = dtype or cfg.trainer.export_dtype
        cfg.model.student_path = folder
        target = export_dtype(cfg)
    tokenizer, generation = _tokenizer(folder), _generation_config(folder)
    if meta["lora"]:
        return _export_lora(path, out, cfg, folder, target, tokenizer)
    config = AutoConfig.from_pretrained(folder)
    shapes, read = (_dcp_tensors if meta["layout"] == "dcp" else _files_tensors)(path)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    keep = [(n, s) for n, s in shapes if not (tied and n == "lm_head.weight")]
    names = {n for n, _ in keep}
    tensors = ((n, t) for n, t in read() if n in names)
    sizes = [(n, s.numel() * target.itemsize) for n, s in keep]
    final = write_hf_folder(out, config, tensors, sizes, dtype=target, tokenizer=tokenizer,
                            generation_config=generation, max_shard_bytes=max_shard_bytes)  # fmt: skip
    log.info("exported %s (%s, %s) to %s", path, meta["layout"], str(target).removeprefix("torch."), final)
    return final


def _tokenizer(folder: str):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError) as e:
        log.warning("no tokenizer in %s (%s): the export has none", folder, e)
        return None


def _generation_config(folder: str):
    from transformers import GenerationConfig

    try:
        return GenerationConfig.from_pretrained(folder)
    except OSError:
        return None


def _export_lora(path: Path, out, cfg, folder: str, dtype: torch.dtype, tokenizer) -> Path:
    """The base student with the checkpoint's adapter merged, plus peft's adapter folder (``OUT_adapter``)."""
    from transformers import AutoModelForCausalLM

    from gkd.trainer.checkpoint import export_hf, load_checkpoint
    from gkd.trainer.lora import apply_lora

    base = AutoModelForCausalLM.from_pretrained(folder, dtype=torch_dtype(cfg.model.param_dtype))
    model = apply_lora(base, cfg.model.lora)
    load_checkpoint(path, model=model, restore_rng=False)
    return export_hf(model, tokenizer, out, dtype=dtype)


# ----------------------------------------------------------------------------------------------- CLI


def add_export_cli(sub: argparse._SubParsersAction) -> None:
    """Register ``gkd export CHECKPOINT OUT [--dtype D] [--student PATH]``."""
    p = sub.add_parser("export", help="a checkpoint (any layout, LoRA or not) -> a Hugging Face model folder")
    p.add_argument(
        "checkpoint", metavar="CHECKPOINT", help="a step_* checkpoint folder, or a run's output_dir"
    )
    p.add_argument("out", metavar="OUT", help="the Hugging Face folder to write (replaced when complete)")
    p.add_argument(
        "--dtype", choices=DTYPE_NAMES, default=None,
        help="weights' dtype (default: the run's trainer.export_dtype, auto: the student's own dtype)",
    )  # fmt: skip
    p.add_argument("--student", default=None, help="the student model folder, when the run's is elsewhere")
    p.set_defaults(func=_export)


def _export(args: argparse.Namespace) -> int:
    from gkd.services.inputs import InputError
    from gkd.trainer.checkpoint import checkpoint_root, latest

    path = Path(args.checkpoint)
    if not (path / "meta.json").is_file():
        if (newest := latest(path)) is None:
            raise InputError(
                f"{path}: not a checkpoint (no meta.json) and no complete checkpoint under "
                f"{checkpoint_root(path)}; pass a step_* folder or a run's output_dir"
            )
        path = newest
    try:
        print(export_checkpoint(path, args.out, dtype=args.dtype, student=args.student))
    except (CheckpointError, ExportError) as e:
        raise InputError(str(e)) from e
    return 0
