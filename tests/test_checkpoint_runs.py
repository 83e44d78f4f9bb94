"""Run ids in an output folder (``gkd.trainer.checkpoint.runs``): checkpoints carry their run's id; pruning
and ``resume=auto`` see the folder's run only; another run's checkpoints are refused in one line (exit 2 from
``gkd train``); leftovers of interrupted saves and exports are removed at start; a resume that changes data
keys is refused, other changes are one warning line. The carried batches survive the checkpoint."""

from __future__ import annotations

import json
import logging
import os
import subprocess
from pathlib import Path

import pytest
import torch
from torch import nn

from gkd.config import load_config, to_yaml
from gkd.rollout.types import Sample
from gkd.trainer.checkpoint import CheckpointError, latest, list_checkpoints, load_checkpoint, save_checkpoint
from gkd.trainer.checkpoint.carried import decode_carried, encode_carried
from gkd.trainer.checkpoint.runs import (
    RUN_ID_FILE,
    checkpoint_run_id,
    config_drift,
    plan_run,
    start_run,
)
from gkd.trainer.scheduler import Carried
from tests.tiny_run import tiny_fixture, train_argv
from tests.transport.helpers import free_port

ROOT = Path(__file__).resolve().parents[1]

tiny = tiny_fixture(num_prompts=8)


def _save(out: Path, step: int, **kw) -> Path:
    return save_checkpoint(out, step, model=nn.Linear(2, 2), keep_last=kw.pop("keep_last", 5), **kw)


def _as_other_run(out: Path, run_id: str, *steps: int) -> None:
    """Checkpoints ``steps`` written by a run ``run_id`` into ``out`` (then ``out``'s run id is restored)."""
    out.mkdir(parents=True, exist_ok=True)
    mine = (out / RUN_ID_FILE).read_text() if (out / RUN_ID_FILE).exists() else None
    (out / RUN_ID_FILE).write_text(run_id)
    for step in steps:
        _save(out, step)
    if mine is None:
        (out / RUN_ID_FILE).unlink()
    else:
        (out / RUN_ID_FILE).write_text(mine)


def test_a_fresh_run_writes_its_id_and_every_checkpoint_carries_it(tmp_path):
    path, run_id = start_run("auto", tmp_path)
    assert path is None and (tmp_path / RUN_ID_FILE).read_text().strip() == run_id
    assert checkpoint_run_id(_save(tmp_path, 3)) == run_id
    assert plan_run("auto", tmp_path) == (tmp_path / "checkpoints" / "step_000003", run_id)  # resumes it


def test_resume_never_in_a_folder_with_checkpoints_is_refused_in_one_line(tmp_path):
    _as_other_run(tmp_path, "0ld", 5)
    with pytest.raises(CheckpointError) as e:
        start_run("never", tmp_path)
    msg = str(e.value)
    assert "\n" not in msg and f"trainer.output_dir={tmp_path}" in msg and "step_000005" in msg
    assert "trainer.resume=auto" in msg
    assert not (tmp_path / RUN_ID_FILE).exists()  # nothing written for a refused run


def test_pruning_and_resume_auto_ignore_another_runs_checkpoints(tmp_path):
    start_run("auto", tmp_path)
    for step in (1, 2):
        _save(tmp_path, step, keep_last=2)
    _as_other_run(tmp_path, "other", 9)  # e.g. copied in: newer step, another run
    assert latest(tmp_path).name == "step_000002"  # resume=auto would not load the other run
    _save(tmp_path, 3, keep_last=2)  # pruning counts this run's checkpoints only
    assert [s for s, _ in list_checkpoints(tmp_path)] == [2, 3]
    assert [s for s, _ in list_checkpoints(tmp_path, run=None)] == [2, 3, 9]
    with pytest.raises(CheckpointError, match=r"checkpoints of another run \(step_000009"):
        plan_run("auto", tmp_path)  # a new start in this folder is refused: the steps would collide


def test_checkpoints_from_before_run_ids_are_resumed_and_adopted(tmp_path):
    _save(tmp_path, 4)  # no run_id file, no run id in meta.json
    path, run_id = start_run("auto", tmp_path)
    assert path.name == "step_000004" and run_id
    assert checkpoint_run_id(_save(tmp_path, 5)) == run_id
    assert [s for s, _ in list_checkpoints(tmp_path)] == [4, 5]


def test_leftovers_of_interrupted_saves_and_exports_are_removed_with_a_log_line(tmp_path, caplog):
    (tmp_path / "final.new").mkdir()
    (tmp_path / "final.new" / "model.safetensors").write_bytes(b"half")
    tmp_ckpt = tmp_path / "checkpoints" / ".tmp-step_000003-123"
    tmp_ckpt.mkdir(parents=True)
    with caplog.at_level(logging.INFO, logger="gkd.checkpoint"):
        start_run("auto", tmp_path)
    assert not (tmp_path / "final.new").exists() and not tmp_ckpt.exists()
    removed = [r.getMessage() for r in caplog.records if r.getMessage().startswith("removed ")]
    assert len(removed) == 2 and "interrupted checkpoint or export" in removed[0]


def test_config_drift_refuses_data_keys_and_warns_about_others():
    base = load_config([str(ROOT / "configs" / "cpu_tiny.yaml")], [])
    changed = load_config(
        [str(ROOT / "configs" / "cpu_tiny.yaml")],
        ["data.seed=7", "optim.lr=0.5", "trainer.output_dir=/elsewhere", "rollout.server_port=1"],
    )
    refused, warned = config_drift(to_yaml(base), to_yaml(changed))
    assert refused == ["data.seed: 0 -> 7"]
    assert warned == ["optim.lr: 0.001 -> 0.5"]  # where it runs and its ports are no drift
    assert config_drift(to_yaml(base), to_yaml(base)) == ([], [])


def test_carried_batches_round_trip_through_a_weights_only_checkpoint(tmp_path):
    s = Sample([1, 2], [3, 4, 5], torch.tensor([-0.5, -1.0, -0.25]), "stop", 7, {"service_s": 0.5})
    t = Sample([1], [6], torch.tensor([-2.0]), "length", 7, {"source": "teacher"}, torch.tensor([[6, 2]]))
    carried = [Carried(9, 7, [s, t])]
    path = _save(
        tmp_path, 9, scheduler_state={"next_batch": 9, "version": 9, "carried": encode_carried(carried)}
    )
    back = decode_carried(load_checkpoint(path, model=nn.Linear(2, 2)).scheduler_state["carried"])
    assert [(c.batch, c.min_version) for c in back] == [(9, 7)]
    for a, b in zip(back[0].result, [s, t], strict=True):
        assert (a.prompt_ids, a.response_ids, a.finish_reason, a.policy_version, a.extra) == (
            b.prompt_ids, b.response_ids, b.finish_reason, b.policy_version, b.extra
        )  # fmt: skip
        assert torch.equal(a.response_logprobs, b.response_logprobs)
        assert (a.topk_ids is None) == (b.topk_ids is None)
    assert torch.equal(back[0].result[1].topk_ids, t.topk_ids)


def _gkd_train(tiny, out: Path, *overrides: str) -> subprocess.CompletedProcess:
    argv = train_argv(tiny, out, [free_port() for _ in range(5)], *overrides)
    return subprocess.run(argv, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True,
                          text=True, timeout=120)  # fmt: skip


def test_gkd_train_refuses_another_runs_folder_and_a_data_change_before_starting(tiny, tmp_path):
    out = tmp_path / "run"
    cfg = load_config([str(ROOT / "configs" / "cpu_tiny.yaml")], [f"data.train_files={tiny['prompts']}"])
    _as_other_run(out, "0ld", 4)
    (out / "checkpoints" / "step_000004" / "config.yaml").write_text(to_yaml(cfg))
    proc = _gkd_train(tiny, out, "trainer.resume=never")
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert len(lines) == 1 and "trainer.resume=never starts a new one" in lines[0], proc.stderr[-3000:]
    assert not (out / "logs").exists()  # refused before anything started

    proc = _gkd_train(tiny, out, "trainer.resume=auto", "data.train_batch_size=2")
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert len(lines) == 1 and "data.train_batch_size: 4 -> 2" in lines[0], proc.stderr[-3000:]
    assert json.loads((out / "checkpoints" / "step_000004" / "meta.json").read_text())["run_id"] == "0ld"
