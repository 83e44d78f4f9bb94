"""The Python API: :func:`distill` runs what ``gkd train`` runs (the same launcher: the GPU and thread
plan, the teacher and rollout services, the trainer) from a :class:`~gkd.config.Config`, a dict of
sections or YAML files, and returns a :class:`DistillResult` read from what the run wrote::

    import gkd

    cfg = gkd.Config(
        model={"student_path": "Qwen/Qwen2.5-0.5B-Instruct"},
        teacher={"launch": True, "model_path": "Qwen/Qwen2.5-1.5B-Instruct"},
        rollout={"launch": True},
        data={"train_files": ["prompts.jsonl"]},
    )
    result = gkd.distill(cfg, ["trainer.total_steps=100"], out="runs/first")
    result.metrics["actor/kl_loss"], result.final_model

A run that cannot start (a bad key or value, a missing file, a port in use, a GPU plan that does not
fit) or does not finish raises :class:`DistillError` with one line, the same line ``gkd train`` prints.
One node per call; several nodes start ``gkd train`` on each (it reads Slurm's environment the same way).
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gkd.config import Config, ConfigError, from_mapping, load_config, to_yaml, validate

__all__ = ["DistillError", "DistillResult", "distill", "read_metrics"]

ConfigLike = Config | Mapping[str, Any] | str | os.PathLike | Sequence[str | os.PathLike]


class DistillError(RuntimeError):
    """A run that did not start or did not finish; the message is one line. ``status``: what ``gkd train``
    would have exited with (2: a bad input); ``run_dir``: the run's folder when it got that far."""

    def __init__(self, message: str, status: int = 2, run_dir: Path | None = None):
        super().__init__(message)
        self.status = status
        self.run_dir = run_dir


@dataclass(frozen=True)
class DistillResult:
    """What a finished run left in ``run_dir`` (``trainer.output_dir``)."""

    run_dir: Path
    config: Config  # the resolved configuration the run used
    config_files: tuple[Path, ...]  # what the launcher and its children read (`gkd train --config` them)
    metrics: dict[str, float] = field(default_factory=dict)  # the last training step's metrics.jsonl record
    final_eval: dict[str, float] = field(default_factory=dict)  # val/* of the last evaluation (test_freq)
    final_model: Path | None = None  # the exported Hugging Face folder, run_dir/final
    final_adapter: Path | None = None  # model.lora: the adapter alone, run_dir/final_adapter
    checkpoints: tuple[Path, ...] = ()  # complete checkpoints, oldest first

    @property
    def steps(self) -> int:
        """Training steps done (the last record's step + 1; 0 when none was logged)."""
        return int(self.metrics["step"]) + 1 if "step" in self.metrics else 0

    def records(self) -> list[dict[str, Any]]:
        """Every metrics.jsonl record, in order (validation before training is step -1)."""
        return read_metrics(self.run_dir)


def read_metrics(run_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """The records of ``run_dir/metrics.jsonl`` (NaN and Infinity as written); [] when there is none."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _config_files(config: ConfigLike) -> tuple[list[str], Config | None]:
    """YAML files as given, or (a Config or a dict) ``None`` files and the Config to write out."""
    if isinstance(config, Config):
        return [], config
    if isinstance(config, Mapping):
        return [], from_mapping(config, "distill(config)")
    if isinstance(config, str | os.PathLike):
        return [os.fspath(config)], None
    if isinstance(config, Sequence) and all(isinstance(p, str | os.PathLike) for p in config):
        return [os.fspath(p) for p in config], None
    raise ConfigError(
        "distill(config): expected a gkd.Config, a dict of sections or YAML paths, got "
        f"{type(config).__name__}"
    )


def _prepare(
    config: ConfigLike, overrides: Sequence[str], out: str | os.PathLike | None, scratch: Path | None
) -> tuple[list[str], list[str], Config]:
    """The YAML files and overrides the launcher gets, and the resolved config (checked). A Config or a
    dict is written out as YAML, since the children read files: to ``trainer.output_dir/config.yaml``
    (the run folder keeps it), or into ``scratch`` when given (a dry run writes nothing of its own)."""
    if isinstance(overrides, str):
        raise ConfigError(f"distill(overrides={overrides!r}): expected a list of key=value strings")
    overrides = [*overrides, *([f"trainer.output_dir={os.fspath(out)}"] if out is not None else [])]
    paths, built = _config_files(config)
    if built is None:
        return paths, overrides, load_config(paths, overrides)
    cfg = built.override(*overrides)  # also checks the types of a Config built from dataclasses
    validate(cfg)
    folder = scratch if scratch is not None else Path(cfg.trainer.output_dir)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "config.yaml"
    path.write_text(to_yaml(cfg))
    return [str(path)], [], cfg


def distill(
    config: ConfigLike,
    overrides: Sequence[str] = (),
    *,
    out: str | os.PathLike | None = None,
    dry_run: bool = False,
) -> DistillResult:
    """Run a distillation on this node as ``gkd train`` would and return what it wrote.

    ``config``: a :class:`~gkd.config.Config`, a dict of sections (``{"model": {...}, ...}``), or one or
    more YAML paths; ``overrides``: ``key=value`` strings applied last; ``out``: the run folder
    (``trainer.output_dir``). ``dry_run``: print the plan and the commands, start nothing (the result has
    no metrics). Raises :class:`DistillError` (one line) when the run cannot start or fails."""
    from gkd.launch import run as launch
    from gkd.launch.nodes import NodeError
    from gkd.launch.placement import PlacementError
    from gkd.launch.roster import RosterError
    from gkd.weights.membership import ChannelAuthError

    refused = (ConfigError, launch.LaunchError, PlacementError, NodeError, RosterError, ChannelAuthError)
    with contextlib.ExitStack() as stack:
        scratch = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="gkd-"))) if dry_run else None
        try:
            paths, overrides, cfg = _prepare(config, overrides, out, scratch)
            node = _node(cfg)
            status = launch.run(paths, overrides, node=node, dry_run=dry_run)
        except refused as e:
            raise DistillError(str(e)) from None
    run_dir = Path(cfg.trainer.output_dir).resolve()
    if status != 0:
        raise DistillError(_failure(run_dir, status, node.multi, node.node_rank), status, run_dir)
    if dry_run:  # nothing ran: no metrics, and a folder left by an earlier run is not this run's
        return DistillResult(run_dir=run_dir, config=cfg, config_files=())
    return _result(run_dir, cfg, paths)


def _node(cfg: Config):
    """This node, as ``gkd train`` without node flags finds it (Slurm's environment, else the config)."""
    from gkd.launch.nodes import node_spec

    return node_spec(
        nnodes=None,
        node_rank=None,
        rdzv_endpoint=None,
        host=None,
        config_nnodes=cfg.trainer.nnodes,
        env=os.environ,
    )


def _failure(run_dir: Path, status: int, multi: bool, node_rank: int) -> str:
    """One line for a run that stopped: its status, the trainer log's last error line, where the logs are."""
    from gkd.launch.run import last_error_line

    logs = run_dir / "logs" / (f"node{node_rank}" if multi else "")
    last = last_error_line(logs / "trainer.log")
    why = "was interrupted" if status == 130 else f"failed (status {status})"
    return f"the run {why}" + (f"; last error: {last}" if last else "") + f"; its logs: {logs}"


def _result(run_dir: Path, cfg: Config, paths: Sequence[str]) -> DistillResult:
    records = [r for r in read_metrics(run_dir) if r.get("step", -1) >= 0]
    last = records[-1] if records else {}
    evaluated = [r for r in records if "val/kl" in r]
    final_eval = {k: v for k, v in evaluated[-1].items() if k.startswith("val/")} if evaluated else {}
    checkpoints: tuple[Path, ...] = ()
    if (run_dir / "checkpoints").is_dir():
        from gkd.trainer.checkpoint import list_checkpoints

        checkpoints = tuple(p for _, p in list_checkpoints(run_dir))

    def folder(name: str) -> Path | None:
        return run_dir / name if (run_dir / name).is_dir() else None

    return DistillResult(
        run_dir=run_dir,
        config=cfg,
        config_files=tuple(Path(p).resolve() for p in paths),
        metrics=dict(last),
        final_eval=final_eval,
        final_model=folder("final"),
        final_adapter=folder("final_adapter"),
        checkpoints=checkpoints,
    )
