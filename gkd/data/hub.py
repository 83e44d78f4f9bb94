"""Hugging Face Hub ids for the student, the teacher and the prompt datasets, through ``huggingface_hub``.

``gkd train`` calls :func:`localize` once, before anything starts: every hub id among
``model.student_path`` (revision ``model.revision``), ``teacher.model_path`` (``teacher.revision``, when
the teacher is launched) and the datasets of ``data.train_files`` / ``data.val_files`` / ``data.sources``
is fetched with ``snapshot_download`` (a progress bar per download; nothing is fetched twice: the cache
under ``HF_HOME`` is reused, and ``HF_HUB_OFFLINE=1`` uses it alone). The model ids are then replaced by
their local folders through ``key=value`` overrides, so that the services and every trainer rank read
folders and never the network; a dataset id stays an id and its readers find the snapshot in the cache
(:func:`local_dataset`).

What is a hub id: ``owner/name`` (letters, digits, ``-_.``; legacy ids without an owner are spelled with
it, e.g. ``openai-community/gpt2``), not an existing path and without a prompt file's extension. Anything
else is a local path, checked as before.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence

from gkd.config import ConfigError

__all__ = ["HubError", "is_hub_id", "local_dataset", "local_model", "localize"]

_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")
_PROMPT_SUFFIXES = (".parquet", ".pq", ".jsonl", ".json", ".ndjson")
#: Files of a model repository no gkd engine reads: other frameworks' weights, the original checkpoints.
MODEL_IGNORE = ["*.pth", "*.pt", "original/*", "*.h5", "*.msgpack", "*.ot", "*.onnx", "*.gguf", "*.mlmodel"]


class HubError(ConfigError):
    """A hub id that could not be fetched; the message names the key, the id and what to do."""


def is_hub_id(value: str) -> bool:
    """Whether ``value`` names a hub repository rather than a local path (module docstring)."""
    v = str(value)
    if not v or os.path.exists(os.path.expanduser(v)) or v.lower().endswith(_PROMPT_SUFFIXES):
        return False
    return bool(_ID.match(v)) and not v.startswith(".")


def _fetch(repo_id: str, repo_type: str, revision: str | None, key: str, **kw) -> str:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
    what = f"{key}={repo_id}" + (f" (revision {revision})" if revision else "")
    if not offline:
        print(
            f"gkd: fetching {repo_type} {repo_id}{f'@{revision}' if revision else ''} from the hub",
            flush=True,
        )
    try:
        return snapshot_download(repo_id, repo_type=repo_type, revision=revision, **kw)
    except LocalEntryNotFoundError as e:
        hint = "not in the local cache and HF_HUB_OFFLINE=1" if offline else "could not be downloaded"
        raise HubError(f"{what}: no local folder of that name, and the hub {repo_type} {hint}") from e
    except (HFValidationError, OSError, ValueError) as e:  # RepositoryNotFound, RevisionNotFound: OSError
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise HubError(
            f"{what}: no local folder of that name, and the hub {repo_type} could not be fetched ({reason})"
        ) from e


def local_model(path: str, revision: str | None = None, key: str = "model") -> str:
    """``path`` itself when it is not a hub id, else the local snapshot folder of that model repository
    (config, weights in safetensors/bin, tokenizer, generation config)."""
    if not is_hub_id(path):
        return path
    return _fetch(path, "model", revision, key, ignore_patterns=MODEL_IGNORE)


def local_dataset(path: str, revision: str | None = None, key: str = "data") -> str:
    """The local snapshot folder of the hub dataset ``path`` (fetched, or found in the cache)."""
    return _fetch(path, "dataset", revision, key)


def _dataset_ids(data_cfg) -> list[tuple[str, str, str | None]]:
    """``(key, id, revision)`` of every hub dataset of the data section."""
    out = [(f"data.train_files[{i}]", p, None) for i, p in enumerate(data_cfg.train_files)]
    out += [(f"data.val_files[{i}]", p, None) for i, p in enumerate(data_cfg.val_files)]
    out += [(f"data.sources[{i}].path", s.path, s.revision) for i, s in enumerate(data_cfg.sources)]
    return [(k, p, r) for k, p, r in out if is_hub_id(str(p))]


def localize(cfg, overrides: Sequence[str], *, dry_run: bool = False):
    """``(cfg, overrides)`` with every hub model id fetched and replaced by its local folder (the overrides
    gain ``model.student_path=<folder>`` etc., so that every child process reads the folder) and every hub
    dataset fetched into the cache. ``dry_run``: fetch nothing, change nothing."""
    if dry_run:
        return cfg, list(overrides)
    import dataclasses

    extra: list[str] = []
    model, teacher = cfg.model, cfg.teacher
    if is_hub_id(model.student_path):
        folder = local_model(model.student_path, model.revision, "model.student_path")
        model = dataclasses.replace(model, student_path=folder)
        extra.append(f"model.student_path={folder}")
    if teacher.launch and is_hub_id(teacher.model_path):
        folder = local_model(teacher.model_path, teacher.revision, "teacher.model_path")
        teacher = dataclasses.replace(teacher, model_path=folder)
        extra.append(f"teacher.model_path={folder}")
    for key, repo_id, revision in _dataset_ids(cfg.data):
        local_dataset(repo_id, revision, key)
    return dataclasses.replace(cfg, model=model, teacher=teacher), [*overrides, *extra]
