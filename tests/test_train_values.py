"""``gkd train`` with a teacher whose weights are broken (its final norm weight is NaN, so every log-prob
it computes is NaN): the run stops before its first step with one line naming the teacher worker, exits
non-zero and exports nothing. Before the value checks this run trained on nothing for every step
(``actor/kl_loss`` 0.0, ``actor/grad_norm`` 0.0), wrote ``final/`` and exited 0."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.tiny_run import tiny_fixture, train_argv
from tests.transport.helpers import free_port

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
RUN_TIMEOUT_S = 240

tiny = tiny_fixture()


def nan_norm_copy(teacher: str | Path, dest: Path) -> Path:
    """A copy of the teacher folder whose final norm weight is NaN."""
    shutil.copytree(teacher, dest)
    weights = dest / "model.safetensors"
    state = load_file(weights)
    state["model.norm.weight"] = torch.full_like(state["model.norm.weight"], float("nan"))
    save_file(state, weights, metadata={"format": "pt"})
    return dest


@pytest.mark.slow
def test_a_nan_teacher_stops_the_run_before_step_one(tiny, tmp_path):
    teacher = nan_norm_copy(tiny["teacher"], tmp_path / "nan_teacher")
    out = tmp_path / "out"
    argv = train_argv(
        {**tiny, "teacher": str(teacher)},
        out,
        [free_port() for _ in range(5)],
        "teacher.top_k=8",
        "rollout.max_new_tokens=8",
        "trainer.nproc_per_node=1",
        "trainer.total_steps=4",
        "logging.progress_bar=false",
    )
    proc = subprocess.run(argv, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    text = proc.stdout + proc.stderr
    assert proc.returncode != 0, text[-6000:]
    lines = [line for line in text.splitlines() if "PhaseFailed: score of batch 0" in line]
    assert lines, text[-6000:]
    assert "teacher worker" in lines[0] and "refuses to send its reply" in lines[0], lines[0]
    assert "topk_logprobs has" in lines[0] and "non-finite" in lines[0], lines[0]
    assert not (out / "final").exists()
    metrics = out / "metrics.jsonl"
    assert not metrics.exists() or not metrics.read_text().strip(), "a step was trained on NaN replies"
