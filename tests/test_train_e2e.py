"""``gkd train`` end to end on CPU: the launcher starts a teacher service (transformers engine) and a rollout
service (CPU engine, weight channel) and runs torchrun; tiny random student and a different, sharper
teacher (``scripts/make_cpu_tiny.py``), both with one byte-level BPE tokenizer, nothing downloaded.

Checked: every DESIGN.md metric on every step, each batch trained once and in order, staleness exactly
``k`` after warm-up, KL to the teacher falls, spans in trace.json, checkpoints, the final HF folder; a
resumed run (here with another k) continues at the checkpoint with no gap and no repeat.
"""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from gkd.metrics import metric_names

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}  # tiny models; spare the shared cores
RUN_TIMEOUT_S = 240


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, str]:
    spec = importlib.util.spec_from_file_location("make_cpu_tiny", ROOT / "scripts" / "make_cpu_tiny.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.build(tmp_path_factory.mktemp("tiny"), num_prompts=24)


def _train(tiny: dict[str, str], out: Path, *overrides: str) -> list[dict]:
    ports = [_free_port() for _ in range(5)]
    argv = [sys.executable, "-m", "gkd.cli", "train", "--config", "configs/cpu_tiny.yaml"]
    argv += [
        f"model.student_path={tiny['student']}",
        f"teacher.model_path={tiny['teacher']}",
        f"data.train_files={tiny['prompts']}",
        f"trainer.output_dir={out}",
        f"teacher.server_port={ports[0]}",
        f"teacher.backend_port={ports[1]}",
        f"rollout.server_port={ports[2]}",
        f"rollout.backend_port={ports[3]}",
        f"rollout.weight_port={ports[4]}",
        "teacher.top_k=8",
        "rollout.max_new_tokens=8",
        "optim.lr=5e-3",
        "logging.progress_bar=false",
        *overrides,
    ]
    proc = subprocess.run(argv, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    assert proc.returncode == 0, proc.stderr[-6000:]
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _check_staleness(records: list[dict], k: int, start: int = 0) -> None:
    for r in records:
        b = r["step"]
        want = min(k, b - start)  # the first k batches of a run all use the version it started with
        assert r["staleness/max"] == r["staleness/mean"] == want, (b, r["staleness/max"], want)
        assert r["rollout/policy_version"] == b - want


def test_gkd_train_two_ranks_one_step_off(tiny, tmp_path):
    out = tmp_path / "run"
    steps = 6
    records = _train(
        tiny, out, "trainer.scheduler=one_step_off", f"trainer.total_steps={steps}", "trainer.save_freq=3"
    )

    assert [r["step"] for r in records] == list(range(steps))  # each batch trained once, in order
    assert [r["data/batch"] for r in records] == list(range(steps))
    for r in records:
        missing = [n for n in metric_names(1) if n not in r]
        assert not missing, (r["step"], missing)
        assert r["actor/num_sequences"] == 4 and r["perf/throughput_tokens_per_s"] > 0
    _check_staleness(records, k=1)
    kl = [r["actor/kl_loss"] for r in records]
    assert sum(kl[-2:]) < 0.85 * sum(kl[:2]), kl  # the student moves towards the teacher

    events = json.loads((out / "trace.json").read_text())["traceEvents"]
    names = {e["name"] for e in events if e.get("ph") == "X"}
    assert {"generate", "score", "update", "sync"} <= names, names
    ckpts = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert ckpts == ["step_000003", "step_000006"], ckpts
    final = out / "final"
    assert (final / "model.safetensors").is_file() and (final / "config.json").is_file()
    assert (final / "tokenizer.json").is_file()


def test_gkd_train_two_step_off_then_resumed_in_sync_mode_without_gap_or_repeat(tiny, tmp_path):
    out = tmp_path / "run"
    common = ["trainer.nproc_per_node=1", "trainer.save_freq=2"]
    first = _train(tiny, out, *common, "trainer.scheduler=two_step_off", "trainer.total_steps=4")
    assert [r["step"] for r in first] == [0, 1, 2, 3]
    _check_staleness(first, k=2)
    assert all("timing/wait_prev_prev_teacher" in r for r in first)

    # the staleness is not part of the resume state: continue the same run with k = 0 (sync)
    both = _train(
        tiny, out, *common, "trainer.scheduler=sync", "trainer.total_steps=6", "trainer.resume=auto"
    )
    assert [r["step"] for r in both] == list(range(6))  # steps 4, 5 appended, 0..3 kept, none repeated
    assert both[:4] == first
    _check_staleness(both[4:], k=0, start=4)
    assert all(not any(n not in r for n in metric_names(0)) for r in both[4:])
    assert both[4]["actor/lr"] == pytest.approx(5e-3)  # the LR schedule continued (warmup was 2 steps)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_000004", "step_000006"]
