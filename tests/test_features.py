"""The trainer's user-facing extras: Weights & Biases (offline), completion logs, throughput figures
(``gkd.metrics.records``), several samples per prompt (``rollout.n``) and periodic validation
(``gkd.trainer.validation``), the last two also through one ``gkd train`` run on tiny models
(configs/cpu_tiny_full.yaml's keys).
"""

from __future__ import annotations

import json
import math
import struct
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from gkd.data.prompts import batch_seed, repeat_prompts
from gkd.metrics.records import MetricsLogger, WandbRun, completion_rows, service_throughput, training_flops
from gkd.rollout.types import Sample
from gkd.teacher.types import TeacherOutput
from gkd.trainer.validation import evaluation_due

ROOT = Path(__file__).resolve().parents[1]


def _wandb_records(run_dir: Path):
    """The records of an offline run's ``run-*.wandb`` file (LevelDB log blocks of protobuf records)."""
    from wandb.proto import wandb_internal_pb2 as pb

    (path,) = run_dir.glob("wandb/offline-run-*/run-*.wandb")
    data, block = path.read_bytes(), 32768
    assert data[:4] == b":W&B"
    pos, pending = 7, b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # block trailer: padding
            pos += left
            continue
        _crc, n, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0:
            pos += left
            continue
        body, pos = data[pos + 7 : pos + 7 + n], pos + 7 + n
        pending = body if kind in (1, 2) else pending + body
        if kind in (1, 4):  # full, or last piece
            record = pb.Record()
            record.ParseFromString(pending)
            yield record


def _history(run_dir: Path) -> list[dict[str, float]]:
    rows = []
    for r in _wandb_records(run_dir):
        if r.WhichOneof("record_type") == "history":
            rows.append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item})
    return rows


def _sample(prompt, response, lps, version=3) -> Sample:
    return Sample(prompt, response, torch.tensor(lps), "length", version)


def _teacher(ids, lps, token_lps, service_s=0.0) -> TeacherOutput:
    return TeacherOutput(
        torch.tensor(ids, dtype=torch.int32), torch.tensor(lps), torch.tensor(token_lps), service_s=service_s
    )


def test_wandb_offline_run_holds_the_metrics_config_and_tables(tmp_path):
    pytest.importorskip("wandb")
    run = WandbRun(tmp_path, project="p", mode="offline", config={"optim": {"lr": 0.5}})
    with MetricsLogger(tmp_path, progress=False, wandb=run) as logger:
        for step in range(3):
            logger.log(step, {"actor/kl_loss": 1.0 / (step + 1)})
        logger.log_completions(2, [{"prompt": "a", "response": "b", "kl_mean": 0.5, "kl_per_token": [0.5]}])
    history = _history(tmp_path)
    kl = [h["actor/kl_loss"] for h in history if "actor/kl_loss" in h]
    assert kl == pytest.approx([1.0, 0.5, 1 / 3])
    assert any("completions/nrows" in h for h in history)  # the text table
    configs = [r.run.config for r in _wandb_records(tmp_path) if r.WhichOneof("record_type") == "run"]
    assert any(
        item.key == "optim" and json.loads(item.value_json) == {"lr": 0.5} for item in configs[0].update
    )
    assert json.loads((tmp_path / "completions.jsonl").read_text())["step"] == 2
    # a resumed run continues the same W&B run
    assert (tmp_path / "wandb_run_id").read_text().strip() in str(next(tmp_path.glob("wandb/offline-run-*")))


def test_completion_rows_kl_and_top1_agreement():
    s = _sample([5, 6], [1, 2, 3], [-1.0, -2.0, -0.5])
    # teacher top-2 per position; the top-1 (largest log-prob, whatever its column) is 1, 9, 3
    t = _teacher([[1, 4], [8, 9], [7, 3]], [[-0.1, -3.0], [-2.0, -0.2], [-4.0, -0.1]], [-0.1, -5.0, -0.1])
    (row,) = completion_rows([s, s], [t, t], lambda ids: " ".join(map(str, ids)), n=1)
    assert row["prompt"] == "5 6" and row["response"] == "1 2 3" and row["policy_version"] == 3
    assert row["kl_per_token"] == pytest.approx([-0.9, 3.0, -0.4])
    assert row["kl_mean"] == pytest.approx(1.7 / 3)
    assert row["top1_agreement"] == pytest.approx(2 / 3)


def test_service_throughput_and_flops():
    samples = [_sample([1] * 4, [2] * 6, [0.0] * 6), _sample([1] * 2, [2] * 2, [0.0] * 2)]
    samples[0].extra["service_s"] = samples[1].extra["service_s"] = 0.5  # one request of 1 s
    outs = [
        _teacher([[0]] * 6, [[0.0]] * 6, [0.0] * 6, 0.25),
        _teacher([[0]] * 2, [[0.0]] * 2, [0.0] * 2, 0.25),
    ]
    m = service_throughput(samples, outs)
    assert m["perf/rollout_tokens_per_s"] == pytest.approx(8 / 1.0)
    assert m["perf/teacher_tokens_per_s"] == pytest.approx(14 / 0.5)
    assert m["teacher/support_width"] == 1.0 and m["teacher/union_share"] == 0.0
    unreported = service_throughput([_sample([1], [2], [0.0])], [_teacher([[0]], [[0.0]], [0.0])])
    assert not [k for k in unreported if k.startswith("perf/")]  # no seconds reported: no throughput
    union = _teacher([[0, 1, 2]] * 2, [[0.0] * 3] * 2, [0.0] * 2)
    union.support = "union"
    m = service_throughput(samples[:2], [union, outs[1]])
    assert m["teacher/support_width"] == 3.0 and m["teacher/union_share"] == 0.5
    # a count by hand: h=4, 1 head of 4, ffn 8, vocab 10
    cfg = SimpleNamespace(hidden_size=4, num_hidden_layers=1, num_attention_heads=1, intermediate_size=8,
                          vocab_size=10)  # fmt: skip
    per_token = 6 * (4 * 4 * 4 + 3 * 4 * 8)  # q, k, v, o + gate, up, down
    want = per_token * 5 + 6 * 4 * (3**2 + 2**2) + 6 * 4 * 10 * 3
    assert training_flops(cfg, [3, 2], 3) == want


def test_evaluation_due_every_test_freq_and_at_the_end():
    assert [d for d in range(1, 12) if evaluation_due(d, 5, 11)] == [5, 10, 11]
    assert not any(evaluation_due(d, 0, 11) for d in range(12))


def test_rollout_n_gives_distinct_responses_and_global_token_normalisation():
    from gkd.config import LossConfig, OptimConfig
    from gkd.rollout.hf_engine import HFRolloutEngine
    from gkd.rollout.types import SamplingConfig
    from gkd.trainer.step import build_optimizer, loss_on_micro_batch, pack_micro_batches, train_step
    from tests.test_trainer_step import teacher_outputs, tiny_llama

    torch.set_num_threads(1)
    student, teacher = tiny_llama(0), tiny_llama(1)
    prompts = [[3, 4, 5], [7, 8]]
    n = 3
    expanded = repeat_prompts(prompts, n)
    assert expanded == [prompts[0]] * 3 + [prompts[1]] * 3
    seed = batch_seed(0, 2, len(prompts), n)
    assert seed + len(expanded) <= batch_seed(0, 3, len(prompts), n)  # no seed shared with the next batch
    engine = HFRolloutEngine(student)
    samples = engine.generate(expanded, SamplingConfig(max_new_tokens=6, temperature=1.0, seed=seed))
    for i in range(len(prompts)):
        copies = {tuple(s.response_ids) for s in samples[i * n : (i + 1) * n]}
        assert len(copies) == n, f"prompt {i}: the {n} samples are not distinct"
    outs = teacher_outputs(teacher, samples)
    cfg = SimpleNamespace(
        loss=LossConfig(), optim=OptimConfig(lr=1e-3), model=SimpleNamespace(), rollout=None
    )
    # the n = 1 formula: the sum of every sequence's per-token losses over the total token count
    per_seq = []
    for s, o in zip(samples, outs, strict=True):
        (mb,) = pack_micro_batches([s], [o], 10_000)
        per_seq.append(loss_on_micro_batch(student, mb, cfg.loss))
    want = sum(float(t.detach()) for t, _ in per_seq) / sum(c for _, c in per_seq)
    optimizer, sched = build_optimizer(student, cfg.optim, 1)
    m = train_step(student, optimizer, sched, pack_micro_batches(samples, outs, 64), cfg)
    assert m["actor/num_sequences"] == len(prompts) * n
    assert m["actor/response_tokens"] == sum(len(s.response_ids) for s in samples)
    assert m["actor/kl_loss"] == pytest.approx(want, rel=1e-5)


@pytest.mark.slow
def test_gkd_train_with_validation_wandb_completions_and_n(tmp_path):
    """One tiny run with configs/cpu_tiny_full.yaml's features (no LoRA): val/* at steps -1, 5..8 (the
    overlapped evaluation requested after step 4), 9 and 10 (the end), finite, val/kl lower at the end
    than before training (train and val prompts of one distribution); two distinct samples per prompt;
    the offline W&B run holds the metrics; completions."""
    pytest.importorskip("wandb")
    from tests.test_train_e2e import ENV, _argv  # free ports, the tiny models' paths
    from tests.tiny_run import build_tiny

    tiny = build_tiny(tmp_path / "tiny", num_prompts=24)
    out = tmp_path / "run"
    argv = _argv(tiny, out, f"data.val_files={tiny['val']}", "trainer.total_steps=11",
                 "trainer.nproc_per_node=1", "trainer.scheduler=sync", "optim.lr=1e-2",
                 "logging.completions_every=4")  # fmt: skip
    argv[6:6] = ["--config", "configs/cpu_tiny_full.yaml"]  # after configs/cpu_tiny.yaml, before overrides
    proc = subprocess.run(argv, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-4000:]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    val = {r["step"]: r for r in records if "val/kl" in r}
    # the evaluation due after step 4 runs beside training (val.overlap) and lands in a later record;
    # the one due after step 9 is waited for (the next step is the last), and so is the final one
    (mid,) = set(val) - {-1, 9, 10}
    assert sorted(val) == [-1, mid, 9, 10] and 5 <= mid <= 8 and val[mid]["val/requested_step"] == 4
    for r in val.values():
        for key in ("val/kl", "val/teacher_token_logprob", "val/response_len/mean", "val/wall_s"):
            assert math.isfinite(r[key]), (r["step"], key)
    assert val[10]["val/kl"] < val[-1]["val/kl"]
    assert val[10]["val/policy_version"] == 11  # the final evaluation answers with the final weights
    train = [r for r in records if r["step"] >= 0]
    assert all(r["actor/num_sequences"] == 2 * r["actor/num_prompts"] for r in train)
    assert all(0 < r["perf/mfu"] < 1 and r["perf/rollout_tokens_per_s"] > 0 for r in train)
    rows = [json.loads(line) for line in (out / "completions.jsonl").read_text().splitlines()]
    assert sorted({r["step"] for r in rows}) == [3, 7] and all(len(r["kl_per_token"]) > 0 for r in rows)
    kl = [h["actor/kl_loss"] for h in _history(out) if "actor/kl_loss" in h]
    assert kl == pytest.approx([r["actor/kl_loss"] for r in train])
