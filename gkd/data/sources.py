"""Where prompts come from: parquet, jsonl/json files, folders written by ``datasets.save_to_disk``, and
Hugging Face datasets by name (``datasets.load_dataset``: config, split, revision; HF_HOME and
HF_HUB_OFFLINE honoured). :class:`Source` names one; :func:`read_source` returns its prompt column and
:func:`inspect_source` checks it from headers only (a parquet footer, a jsonl file's first line, a saved
dataset's metadata), as preflight does before anything starts.

What a path is: an existing folder with ``state.json`` or ``dataset_dict.json`` is a saved dataset; an
``owner/name`` that is no existing path (:func:`gkd.data.hub.is_hub_id`) a hub dataset; anything else a file
or glob (by extension: ``.jsonl``/``.json`` are JSON lines or a JSON array of objects, anything else parquet).
"""

from __future__ import annotations

import glob
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

__all__ = [
    "DataError",
    "Source",
    "expand_files",
    "file_rows",
    "inspect_source",
    "read_source",
    "source_kind",
    "sources_from_config",
]

JSON_SUFFIXES = (".jsonl", ".json", ".ndjson")
FILE_SUFFIXES = (".parquet", ".pq", *JSON_SUFFIXES)
_SAVED_DATASET = ("state.json", "dataset_dict.json")  # what datasets.save_to_disk writes into its folder


class DataError(ValueError):
    """A problem with the prompt data; the message names the file, the column and, if any, the row."""


@dataclass(frozen=True)
class Source:
    """One prompt source. ``weight``: its share of a mixture (``data.sources``); None: concatenated with
    the others in order (``data.train_files``)."""

    path: str  # a file or glob, a save_to_disk folder, or a hub dataset id
    prompt_key: str = "prompt"
    weight: float | None = None
    config: str | None = None  # hub datasets: the configuration name
    split: str = "train"  # hub and saved datasets
    revision: str | None = None  # hub datasets: a branch, tag or commit

    @property
    def kind(self) -> str:
        return source_kind(self.path)


def sources_from_config(data_cfg, split: str = "train") -> list[Source]:
    """``data.sources`` (weighted, train only) or the paths of ``data.train_files`` / ``data.val_files``
    (each with ``data.prompt_key``, concatenated)."""
    if split == "train" and getattr(data_cfg, "sources", None):
        return [
            Source(
                path=str(s.path),
                prompt_key=s.prompt_key or data_cfg.prompt_key,
                weight=float(s.weight),
                config=s.config,
                split=s.split,
                revision=s.revision,
            )
            for s in data_cfg.sources
        ]
    paths = data_cfg.train_files if split == "train" else data_cfg.val_files
    return [Source(str(p), data_cfg.prompt_key) for p in paths]


def _is_saved_dataset(path: str) -> bool:
    return os.path.isdir(path) and any(os.path.isfile(os.path.join(path, f)) for f in _SAVED_DATASET)


def source_kind(path: str) -> str:
    """``files``, ``disk`` (a save_to_disk folder) or ``hub`` (module docstring)."""
    p = os.path.expanduser(path)
    if _is_saved_dataset(p):
        return "disk"
    from gkd.data.hub import is_hub_id

    return "hub" if is_hub_id(path) and not glob.has_magic(p) else "files"


def expand_files(patterns: Sequence[str] | str) -> list[str]:
    """Paths and globs -> files in the given order (each glob sorted); duplicates dropped. A pattern that
    matches nothing raises ``FileNotFoundError`` naming it."""
    if isinstance(patterns, str):
        patterns = [patterns]
    out: list[str] = []
    for pat in patterns:
        path = os.path.expanduser(str(pat))
        hits = sorted(glob.glob(path)) if glob.has_magic(path) else ([path] if os.path.isfile(path) else [])
        if not hits and os.path.isdir(path):
            raise FileNotFoundError(
                f"data file {pat} is a folder; name its files, e.g. {pat}/*.parquet, or give a folder "
                "written by datasets.save_to_disk"
            )
        if not hits:
            raise FileNotFoundError(
                f"data file {pat} not found" + (" (no file matches)" if glob.has_magic(path) else "")
            )
        out.extend(h for h in hits if h not in out)
    return out


def _is_json(path: str) -> bool:
    return path.lower().endswith(JSON_SUFFIXES)


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _missing(where: str, key: str, names: Sequence[str]) -> DataError:
    return DataError(
        f"{where} has no column '{key}' (data.prompt_key); available columns: {', '.join(names)}"
    )


# ----------------------------------------------------------------------------------- headers only


def _parquet_rows(path: str, key: str) -> int:
    """Rows of the parquet file ``path``, which must have the column ``key``; reads the footer only."""
    import pyarrow.parquet as pq  # heavy import; only data users pay for it

    try:
        meta = pq.read_metadata(path)
    except Exception as e:  # pyarrow raises ArrowInvalid/OSError for non-parquet files
        raise DataError(f"data file {path}: cannot read as parquet: {_first_line(e)}") from e
    names = meta.schema.to_arrow_schema().names
    if key not in names:
        raise _missing(f"data file {path}", key, names)
    return meta.num_rows


def _json_head(path: str, key: str) -> int:
    """1 when the JSON file's first record has ``key``, 0 when it holds none; reads the first line (a JSON
    array is parsed whole)."""
    with open(path, encoding="utf-8") as f:
        head = f.read(1)
        while head and head.isspace():
            head = f.read(1)
        if not head:
            return 0
        if head == "[":
            f.seek(0)
            records = _load_json_array(path, f)
            first = records[0] if records else None
        else:
            f.seek(0)
            line = f.readline()
            first = _json_record(path, 1, line)
    if first is None:
        return 0
    if key not in first:
        raise _missing(f"data file {path}", key, list(first))
    return 1


def file_rows(path: str, key: str) -> int:
    """Rows of a parquet file (its footer), or 1/0 for a JSON file whose first record has ``key`` / that
    holds none (its first line); raises :class:`DataError` for a missing column or an unreadable file."""
    return _json_head(path, key) if _is_json(path) else _parquet_rows(path, key)


def inspect_source(source: Source) -> int:
    """Check ``source`` from headers: it exists, has the prompt column and at least one row. Returns its
    row count (files: 1 for a non-empty JSON file, whose length is not read; hub datasets: -1, not
    checked here, read by the trainer). Raises ``FileNotFoundError`` or :class:`DataError`."""
    key = source.prompt_key
    if source.kind == "hub":
        return -1
    if source.kind == "disk":
        names, rows = _saved_header(source)
        if key not in names:
            raise _missing(f"dataset {source.path} (split {source.split})", key, names)
    else:
        rows = sum(file_rows(f, key) for f in expand_files(source.path))
    if rows == 0:
        raise DataError(f"data source {source.path} has no rows")
    return rows


def _saved_header(source: Source) -> tuple[list[str], int]:
    data = _load_saved(source)
    return list(data.column_names), len(data)


# ------------------------------------------------------------------------------------------ reading


def _json_record(path: str, line_no: int, line: str) -> dict | None:
    if not line.strip():
        return None
    try:
        value = json.loads(line)
    except json.JSONDecodeError as e:
        raise DataError(f"data file {path}, line {line_no}: not JSON ({e.msg})") from e
    if not isinstance(value, dict):
        raise DataError(f"data file {path}, line {line_no}: expected a JSON object, got {value!r:.60}")
    return value


def _load_json_array(path: str, f) -> list[dict]:
    try:
        records = json.load(f)
    except json.JSONDecodeError as e:
        raise DataError(f"data file {path}: not JSON ({e.msg}, line {e.lineno})") from e
    if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
        raise DataError(f"data file {path}: expected JSON lines or a JSON array of objects")
    return records


def _read_json(path: str, key: str) -> list[Any]:
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if text.lstrip().startswith("["):
        import io

        records = _load_json_array(path, io.StringIO(text))
        numbered = list(enumerate(records, 1))
    else:
        numbered = [(i, _json_record(path, i, line)) for i, line in enumerate(text.splitlines(), 1)]
        numbered = [(i, r) for i, r in numbered if r is not None]
    for i, r in numbered:
        if key not in r:
            raise DataError(f"data file {path}, record {i}: no field '{key}' (data.prompt_key)")
    return [r[key] for _, r in numbered]


def _read_parquet(path: str, key: str) -> list[Any]:
    import pyarrow.parquet as pq

    _parquet_rows(path, key)
    return pq.read_table(path, columns=[key]).column(key).to_pylist()


def _load_saved(source: Source):
    from datasets import DatasetDict, load_from_disk

    try:
        data = load_from_disk(os.path.expanduser(source.path))
    except (OSError, ValueError) as e:
        raise DataError(f"dataset folder {source.path}: cannot load it: {_first_line(e)}") from e
    if isinstance(data, DatasetDict):
        if source.split not in data:
            raise DataError(
                f"dataset folder {source.path} has no split '{source.split}'; splits: {', '.join(data)}"
            )
        data = data[source.split]
    return data


def _load_hub(source: Source):
    """A hub dataset: its snapshot (``gkd train`` fetched it; HF_HUB_OFFLINE=1 reads the cache alone)
    loaded by ``datasets`` with the source's config and split."""
    from datasets import load_dataset

    from gkd.data.hub import local_dataset

    folder = local_dataset(source.path, source.revision, f"dataset {source.path}")
    try:
        return load_dataset(folder, source.config, split=source.split)
    except Exception as e:  # datasets raises many types (ValueError for a bad split, DatasetGenerationError)
        raise DataError(
            f"dataset {source.path} (config {source.config}, split {source.split}): cannot load it: "
            f"{_first_line(e)}"
        ) from e


def read_source(source: Source) -> list[tuple[str, list[Any]]]:
    """The prompt column of ``source`` as ``[(where, values)]``, one entry per file (``where`` names it in
    errors: ``data file X`` or ``dataset X``)."""
    key = source.prompt_key
    if source.kind == "files":
        return [
            (f"data file {f}", _read_json(f, key) if _is_json(f) else _read_parquet(f, key))
            for f in expand_files(source.path)
        ]
    data = _load_saved(source) if source.kind == "disk" else _load_hub(source)
    where = f"dataset {source.path}"
    if key not in data.column_names:
        raise _missing(f"{where} (split {source.split})", key, data.column_names)
    return [(where, list(data[key]))]
