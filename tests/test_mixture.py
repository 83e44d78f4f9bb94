"""GKD's mixture of answer sources (``loss.lmbda``, ``loss.seq_kd``): the per-batch draw is a pure function
of (seed, batch) (a resumed run draws the same), the schedule, the importance weights of answers without
behaviour log-probs, and tiny ``gkd train`` runs that train on student, teacher and dataset answers."""

import json
import math
import os
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from gkd.config import ConfigError, load_config
from gkd.trainer.sources import batch_source, lmbda_at, uniform_draw
from gkd.trainer.step import importance_weights
from tests.tiny_run import ROOT, tiny_fixture, train_argv
from tests.transport.helpers import free_port

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
RUN_TIMEOUT_S = 300


def _loss(**kw):
    base = dict(lmbda=1.0, seq_kd=True, lmbda_schedule="constant", lmbda_start=0.0, lmbda_steps=0)
    return SimpleNamespace(**{**base, **kw})


def test_draw_depends_on_seed_and_batch_only():
    lo = _loss(lmbda=0.5)
    first = [batch_source(lo, 7, b) for b in range(400)]
    assert first == [batch_source(lo, 7, b) for b in range(400)]  # a resumed run draws the same
    assert first[200:] == [batch_source(lo, 7, b) for b in range(200, 400)]  # in any order
    assert first != [batch_source(lo, 8, b) for b in range(400)]
    share = first.count("student") / len(first)
    assert 0.42 < share < 0.58, share
    assert set(first) == {"student", "teacher"}
    assert set(batch_source(_loss(lmbda=0.3, seq_kd=False), 0, b) for b in range(50)) == {"student", "data"}
    assert all(batch_source(_loss(lmbda=1.0), 0, b) == "student" for b in range(50))
    assert all(batch_source(_loss(lmbda=0.0), 0, b) == "teacher" for b in range(50))
    assert all(0 <= uniform_draw(3, b) < 1 for b in range(100))


def test_linear_schedule():
    lo = _loss(lmbda=1.0, lmbda_schedule="linear", lmbda_start=0.0, lmbda_steps=10)
    assert [lmbda_at(lo, b) for b in (0, 5, 10, 20)] == [0.0, 0.5, 1.0, 1.0]
    assert batch_source(lo, 0, 0) == "teacher" and batch_source(lo, 0, 10) == "student"


def test_answers_without_behaviour_logprobs_weigh_one():
    logq = torch.tensor([-1.0, -2.0, -0.5, -0.1])
    logmu = torch.tensor([-1.5, -2.0, float("nan"), float("nan")])
    tok = importance_weights(logq, logmu, [2, 2], "token", 2.0)
    torch.testing.assert_close(tok, torch.tensor([math.exp(0.5), 1.0, 1.0, 1.0]))
    seq = importance_weights(logq, logmu, [2, 2], "sequence", 2.0)
    torch.testing.assert_close(seq, torch.tensor([math.exp(0.5), math.exp(0.5), 1.0, 1.0]))


@pytest.mark.parametrize(
    "overrides, key",
    [
        (["loss.lmbda=1.5"], "loss.lmbda"),
        (["loss.lmbda=0.5", "loss.seq_kd=false"], "loss.seq_kd"),
        (["loss.lmbda_schedule=linear"], "loss.lmbda_steps"),
        (["loss.lmbda=0.5", "loss.name=sampled_reverse_kl"], "loss.lmbda"),
        (["teacher.generate.top_p=0"], "teacher.generate.top_p"),
        (["teacher.generate.max_new_tokens=0"], "teacher.generate.max_new_tokens"),
    ],
)
def test_config_checks_name_the_key(overrides, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config([], ["model.student_path=S", "data.train_files=[p]", *overrides])


# ------------------------------------------------------------------------------------- tiny runs


tiny = tiny_fixture()


def _train(tiny, out: Path, *overrides: str) -> list[dict]:
    ports = [free_port() for _ in range(5)]
    common = ("teacher.top_k=8", "rollout.max_new_tokens=8", "optim.lr=5e-3", "logging.progress_bar=false")
    argv = train_argv(tiny, out, ports, *common, *overrides)
    proc = subprocess.run(argv, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    assert proc.returncode == 0, proc.stderr[-6000:]
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_half_teacher_answers_train_and_resume_draws_the_same(tiny, tmp_path):
    out = tmp_path / "run"
    args = (
        "loss.lmbda=0.5",
        "trainer.scheduler=one_step_off",
        "trainer.seed=3",
        "teacher.generate.temperature=1.0",
    )
    first = _train(tiny, out, *args, "trainer.total_steps=4", "trainer.save_freq=4")
    # resumed at 4: metrics.jsonl keeps the first run's records, nothing repeated or skipped
    records = _train(
        tiny, out, *args, "trainer.total_steps=10", "trainer.save_freq=10", "trainer.resume=auto"
    )
    assert [r["step"] for r in records] == list(range(10)) and records[:4] == first
    lo = load_config([], ["model.student_path=S", "data.train_files=[p]", "loss.lmbda=0.5"]).loss
    want = [batch_source(lo, 3, b) for b in range(10)]
    assert [r["batch/student"] for r in records] == [float(s == "student") for s in want]
    assert {"student", "teacher"} <= set(want)
    for r, s in zip(records, want, strict=True):
        assert f"actor/kl_loss_{s}" in r and r[f"actor/kl_loss_{s}"] == r["actor/kl_loss"]
        assert ("staleness/max" in r) == (s == "student")
        if s == "student":
            assert 0 <= r["staleness/max"] <= 1
    for s in ("student", "teacher"):  # the loss falls on both sources
        kl = [r[f"actor/kl_loss_{s}"] for r in records if f"actor/kl_loss_{s}" in r]
        assert kl[-1] < kl[0], (s, kl)


@pytest.mark.slow
def test_dataset_answers_are_scored_by_the_teacher(tiny, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    data = tmp_path / "qa.parquet"
    prompts = pq.read_table(tiny["prompts"]).column("prompt").to_pylist()
    pq.write_table(
        pa.table({"prompt": prompts, "answer": [f"the fox {i}" for i in range(len(prompts))]}), data
    )
    records = _train(
        {**tiny, "prompts": str(data)},
        tmp_path / "run",
        "loss.lmbda=0.0",
        "loss.seq_kd=false",
        "data.response_key=answer",
        "loss.is_correction=token",  # no behaviour log-probs: weight 1, no NaN
        "trainer.total_steps=4",
        "trainer.save_freq=4",
    )
    assert [r["batch/student"] for r in records] == [0.0] * 4
    kl = [r["actor/kl_loss_data"] for r in records]
    assert all(math.isfinite(x) for x in kl) and kl[-1] < kl[0], kl
