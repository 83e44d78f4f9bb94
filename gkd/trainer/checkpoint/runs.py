"""Which run an output folder's checkpoints belong to, and whether a resume may use them.

Every run has a run id: a fresh run draws one, a resumed run keeps its checkpoint's. It is written at the
start into ``OUTPUT_DIR/run_id`` and into each checkpoint's ``meta.json`` (``run_id``); checkpoints written
before run ids existed carry none and count as the folder's run.
:func:`gkd.trainer.checkpoint.list_checkpoints` (hence ``resume=auto`` and the ``keep_last`` pruning)
considers the folder's run only.

:func:`start_run` (trainer rank 0, before anything is loaded) removes what interrupted saves and exports
left (``checkpoints/.tmp-*``, ``final.new``, ``final_adapter.new``, ``.tmp-final*``), refuses a folder
holding another run's checkpoints (``resume=never`` with any checkpoint there; a resume whose run differs
from some of them), and writes the run id. :func:`config_drift` compares a resumed checkpoint's config
with this run's: keys that decide which prompts make a batch (``DATA_ORDER_KEYS``) are refused, other
changes are warned about. ``gkd train`` runs the same checks (:func:`check_resume`) before it starts
anything, so a refusal is one line and exit status 2.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

from gkd.trainer.checkpoint.folders import CheckpointError, checkpoint_root, list_checkpoints, resolve_resume

log = logging.getLogger("gkd.checkpoint")

__all__ = [
    "DATA_ORDER_KEYS",
    "RUN_ID_FILE",
    "check_drift",
    "check_resume",
    "checkpoint_run_id",
    "clean_leftovers",
    "config_drift",
    "plan_run",
    "read_run_id",
    "start_run",
]

RUN_ID_FILE = "run_id"
# data keys that decide which prompts form batch b: a resume that changes them would train other batches
DATA_ORDER_KEYS = (
    "data.train_files", "data.prompt_key", "data.sources", "data.chat_template_kwargs", "data.system_prompt",
    "data.response_key", "data.max_prompt_length", "data.truncation", "data.train_batch_size", "data.seed",
    "data.shuffle",
)  # fmt: skip
# keys that differ between a run and its resumption by their nature (where it runs, how it resumes)
_NOT_DRIFT = ("trainer.resume", "trainer.output_dir")
_NOT_DRIFT_SUFFIX = ("_port",)


def read_run_id(output_dir: str | os.PathLike) -> str | None:
    """The run id recorded in ``OUTPUT_DIR/run_id`` (None: none yet)."""
    try:
        return (Path(output_dir) / RUN_ID_FILE).read_text().strip() or None
    except OSError:
        return None


def checkpoint_run_id(path: str | os.PathLike) -> str | None:
    """A checkpoint's run id (None: written before run ids, or unreadable meta.json)."""
    try:
        return json.loads((Path(path) / "meta.json").read_text()).get("run_id")
    except (OSError, ValueError):
        return None


def clean_leftovers(output_dir: str | os.PathLike) -> list[Path]:
    """Remove the temporary folders interrupted saves and exports left (nothing writes at start-up)."""
    out = Path(output_dir)
    found = [p for p in (out / "final.new", out / "final_adapter.new") if p.exists()]
    found += sorted(out.glob(".tmp-final*"))
    root = checkpoint_root(out)
    found += sorted(root.glob(".tmp-*")) if root.is_dir() else []
    for p in found:
        shutil.rmtree(p) if p.is_dir() else p.unlink()
        log.info("removed %s, left by an interrupted checkpoint or export", p)
    return found


def plan_run(resume: str, output_dir: str | os.PathLike) -> tuple[Path | None, str]:
    """(checkpoint to resume or None, this run's id) for ``trainer.resume`` in ``output_dir``; reads only.
    Raises :class:`CheckpointError` (one line: what is there, what to do) when the folder holds
    checkpoints of another run."""
    out = Path(output_dir)
    every = list_checkpoints(out, run=None)
    if resume == "never" and every:
        raise CheckpointError(
            f"trainer.output_dir={out} holds {len(every)} checkpoint(s) of an earlier run (newest "
            f"{every[-1][1].name}) and trainer.resume=never starts a new one: use another output_dir, "
            "trainer.resume=auto to continue it, or move its checkpoints away"
        )
    recorded = read_run_id(out)
    if resume == "auto" and recorded is None and every:  # run_id file lost: the newest checkpoint's run
        recorded = checkpoint_run_id(every[-1][1])
    path = (
        resolve_resume(resume, out) if resume != "auto" or recorded is None else _newest_of(every, recorded)
    )
    if resume == "never":
        recorded = None  # a new run
    run_id = (checkpoint_run_id(path) if path is not None else None) or recorded or uuid.uuid4().hex[:16]
    foreign = [p.name for _, p in every if checkpoint_run_id(p) not in (None, run_id)]
    if foreign:
        raise CheckpointError(
            f"trainer.output_dir={out} holds checkpoints of another run ({', '.join(foreign[:3])}"
            f"{' ...' if len(foreign) > 3 else ''}, not run {run_id}): use another output_dir or move "
            "them away"
        )
    return path, run_id


def _newest_of(every: list[tuple[int, Path]], run_id: str) -> Path | None:
    mine = [p for _, p in every if checkpoint_run_id(p) in (None, run_id)]
    return mine[-1] if mine else None


def start_run(resume: str, output_dir: str | os.PathLike) -> tuple[Path | None, str]:
    """Trainer rank 0 at start-up: :func:`clean_leftovers`, :func:`plan_run`, then ``OUTPUT_DIR/run_id``
    holds this run's id (checkpoints written from now on carry it)."""
    out = Path(output_dir)
    if out.is_dir():
        clean_leftovers(out)
    path, run_id = plan_run(resume, out)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / f".{RUN_ID_FILE}.{os.getpid()}"
    tmp.write_text(run_id + "\n")
    os.replace(tmp, out / RUN_ID_FILE)
    log.info("run %s%s", run_id, f", resuming {path}" if path is not None else "")
    return path, run_id


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for k, v in value.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: value}


def config_drift(saved_yaml: str, current_yaml: str) -> tuple[list[str], list[str]]:
    """(refused, warned): ``key: saved -> now`` for every key whose value changed since the checkpoint,
    split by :data:`DATA_ORDER_KEYS` (and their sub-keys). An empty or unreadable saved config: none."""
    import yaml

    try:
        saved, now = _flatten(yaml.safe_load(saved_yaml) or {}), _flatten(yaml.safe_load(current_yaml) or {})
    except yaml.YAMLError:
        return [], []
    refused, warned = [], []
    for key in sorted(set(saved) | set(now)):
        a, b = saved.get(key, "<unset>"), now.get(key, "<unset>")
        if a == b or key in _NOT_DRIFT or key.endswith(_NOT_DRIFT_SUFFIX):
            continue
        change = f"{key}: {a!r} -> {b!r}"
        is_data = any(key == k or key.startswith(k + ".") for k in DATA_ORDER_KEYS)
        (refused if is_data else warned).append(change)
    return refused, warned


def drift_error(path: Path, refused: list[str]) -> CheckpointError:
    return CheckpointError(
        f"resuming {path} with other data settings would train other batches ({'; '.join(refused)}): "
        "set them back, or start a new run (another trainer.output_dir, or trainer.resume=never)"
    )


def check_drift(path: Path, cfg, *, warn: bool = True) -> str | None:
    """Compare the config saved in checkpoint ``path`` with ``cfg``: changed data keys raise
    :class:`CheckpointError`; other changes are one warning line (logged when ``warn``), returned."""
    from gkd.config import to_yaml

    saved = Path(path) / "config.yaml"
    if not saved.is_file():
        return None
    refused, warned = config_drift(saved.read_text(), to_yaml(cfg))
    if refused:
        raise drift_error(path, refused)
    line = f"resuming {path} with changed settings: {'; '.join(warned)}" if warned else None
    if line and warn:
        log.warning("%s", line)
    return line


def check_resume(cfg) -> str | None:
    """What ``gkd train`` checks before it starts anything: the folder's runs (:func:`plan_run`) and the
    resumed checkpoint's config (:func:`check_drift`); returns the warning line (None: nothing changed)."""
    path, _ = plan_run(cfg.trainer.resume, cfg.trainer.output_dir)
    return check_drift(path, cfg, warn=False) if path is not None else None
