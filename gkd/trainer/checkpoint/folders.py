"""Where a run's checkpoints are and which to resume from: the folder side of :mod:`gkd.trainer.checkpoint`,
without torch, so that ``gkd train`` checks an output folder (``gkd.trainer.checkpoint.runs.check_resume``)
before it starts any child. ``gkd.trainer.checkpoint`` re-exports every name here."""

from __future__ import annotations

import os
import re
from pathlib import Path

_STEP_DIR = re.compile(r"^step_(\d+)$")
_TMP_PREFIX = ".tmp-"


class CheckpointError(RuntimeError):
    """A checkpoint cannot be found, read or used; the message names the path."""


def checkpoint_root(output_dir: str | os.PathLike) -> Path:
    """Where a run's checkpoints live: ``OUTPUT_DIR/checkpoints``."""
    return Path(output_dir) / "checkpoints"


def _is_complete(path: Path) -> bool:
    return path.is_dir() and _STEP_DIR.match(path.name) is not None and (path / "meta.json").is_file()


def list_checkpoints(output_dir: str | os.PathLike, *, run: bool | None = True) -> list[tuple[int, Path]]:
    """Complete checkpoints of a run as (step, path), oldest first. ``run=True``: those of the run named in
    ``OUTPUT_DIR/run_id`` only (``gkd.trainer.checkpoint.runs``; checkpoints without a run id count as its
    own); ``None``: every one in the folder."""
    root = checkpoint_root(output_dir)
    if not root.is_dir():
        return []
    found = [
        (int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name)) and _is_complete(p)
    ]
    if run:
        from gkd.trainer.checkpoint.runs import checkpoint_run_id, read_run_id

        if (mine := read_run_id(output_dir)) is not None:
            found = [(s, p) for s, p in found if checkpoint_run_id(p) in (None, mine)]
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
