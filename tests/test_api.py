"""The Python API: ``gkd.distill`` drives a tiny run through the same launcher as ``gkd train`` and returns
its folder, final metrics and exported model; ``gkd.Config`` built in code equals the YAML with the same
values; bad keys, bad values and bad inputs are one-line errors of one type; ``import gkd`` stays cheap."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest

import gkd
from gkd.config import ConfigError, LoRAConfig, TrainerConfig, load_config
from tests.tiny_run import tiny_fixture
from tests.transport.helpers import free_port

ROOT = Path(__file__).resolve().parents[1]

tiny = tiny_fixture(num_prompts=16)


def test_import_gkd_loads_neither_torch_nor_the_config_machinery():
    code = "import sys, gkd; gkd.__version__; print(' '.join(sorted(sys.modules)))"
    loaded = set(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                                check=True, cwd=ROOT).stdout.split())  # fmt: skip
    assert not {"torch", "omegaconf", "gkd.api", "gkd.config", "gkd.launch.run"} & loaded
    assert {"distill", "Config", "TrainerConfig"} <= set(dir(gkd))
    with pytest.raises(AttributeError, match="no attribute 'NoSuchThing'"):
        gkd.NoSuchThing  # noqa: B018


YAML = """\
model:
  student_path: /models/student
  lora:
    enabled: true
    r: 4
teacher:
  launch: true
  model_path: /models/teacher
  top_k: 16
trainer:
  total_steps: 3
  threads: 2
data:
  train_files: [a.parquet, b.jsonl]
  chat_template_kwargs: {enable_thinking: false}
"""


def test_a_config_built_in_code_equals_the_yaml_with_the_same_values(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(YAML)
    from_yaml = load_config([str(path)], check=False)
    in_code = gkd.Config(
        model={"student_path": "/models/student", "lora": LoRAConfig(enabled=True, r=4)},
        teacher={"launch": True, "model_path": "/models/teacher", "top_k": 16},
        trainer=TrainerConfig(total_steps=3, threads=2),
        data={"train_files": ["a.parquet", "b.jsonl"], "chat_template_kwargs": {"enable_thinking": False}},
    )
    assert in_code == from_yaml
    assert gkd.Config.load(str(path), ["optim.lr=1e-5"]).optim.lr == 1e-5
    # overrides in code, with the command line's syntax, equal the same overrides on the YAML
    got = in_code.override("optim.lr=2e-5", "data.train_files=c.parquet,d.parquet")
    assert got == load_config(
        [str(path)], ["optim.lr=2e-5", "data.train_files=c.parquet,d.parquet"], check=False
    )
    assert in_code.optim.lr != 2e-5  # the original is left as it was


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: gkd.Config(model={"student_pth": "x"}),
         "Config(...): unknown config key 'model.student_pth'; valid keys in 'model': student_path, "),
        (lambda: gkd.Config(trainer={"total_steps": "three"}),
         "Config(...): bad value for config key 'trainer.total_steps'"),
        (lambda: gkd.Config(model="x"), "Config(model=...): expected a mapping of model.* keys"),
        (lambda: gkd.Config().override("trainer.total_step=3"),
         "override: unknown config key 'trainer.total_step'; valid keys in 'trainer': "),
        (lambda: gkd.Config(trainer=TrainerConfig(total_steps="three")).override(),
         "Config: bad value for config key 'trainer.total_steps'"),
    ],
)  # fmt: skip
def test_a_bad_key_or_value_in_code_is_one_line_naming_it(make, message):
    with pytest.raises(ConfigError) as e:
        make()
    assert str(e.value).startswith(message) and "\n" not in str(e.value)


def _tiny_cfg(tiny: dict[str, str]) -> dict:
    """The tiny run as a dict of sections (every port free), on top of configs/cpu_tiny.yaml's values."""
    return {
        "model": {"student_path": tiny["student"]},
        "teacher": {"launch": True, "model_path": tiny["teacher"], "top_k": 8, "server_port": free_port(),
                    "backend_port": free_port()},
        "rollout": {"launch": True, "max_new_tokens": 8, "server_port": free_port(),
                    "backend_port": free_port(), "weight_port": free_port()},
        "trainer": {"nproc_per_node": 1, "total_steps": 3, "save_freq": 0, "test_freq": 3},
        "optim": {"lr": 5e-3},
        "data": {"train_files": [tiny["prompts"]], "val_files": [tiny["prompts"]], "val_max_samples": 4,
                 "max_prompt_length": 32, "max_response_length": 8, "train_batch_size": 4,
                 "truncation": "left", "micro_batch_tokens": 256},
        "logging": {"progress_bar": False},
    }  # fmt: skip


@pytest.mark.parametrize(
    ("config", "overrides", "message"),
    [
        ({"modle": {}}, [], "distill(config): unknown config key 'modle'; valid sections: model, "),
        ({}, ["trainer.total_steps"], "override 'trainer.total_steps' is not of the form section.key=value"),
        ({}, "trainer.total_steps=3", "distill(overrides='trainer.total_steps=3'): expected a list"),
        (42, [], "distill(config): expected a gkd.Config, a dict of sections or YAML paths, got int"),
        ("missing.yaml", [], "config file missing.yaml not found"),
    ],
)
def test_distill_refuses_bad_input_in_one_line(config, overrides, message, tmp_path):
    with pytest.raises(gkd.DistillError) as e:
        gkd.distill(config, overrides, out=tmp_path / "run")
    assert str(e.value).startswith(message) and "\n" not in str(e.value), str(e.value)
    assert e.value.status == 2 and not (tmp_path / "run").exists()


def test_distill_names_a_missing_model_before_anything_starts(tiny, tmp_path):
    cfg = _tiny_cfg(tiny)
    cfg["teacher"]["model_path"] = str(tmp_path / "no-teacher")
    with pytest.raises(gkd.DistillError, match="teacher.model_path") as e:
        gkd.distill(cfg, out=tmp_path / "run")
    assert "\n" not in str(e.value) and not (tmp_path / "run" / "logs").exists()


def test_distill_dry_run_prints_the_plan_and_writes_nothing(tiny, tmp_path, capsys):
    result = gkd.distill(_tiny_cfg(tiny), ["trainer.threads=2"], out=tmp_path / "run", dry_run=True)
    out = capsys.readouterr().out
    assert "  trainer  rank 0" in out and "OMP_NUM_THREADS=2" in out, out
    assert result.run_dir == (tmp_path / "run").resolve() and result.metrics == {} and result.steps == 0
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_distill_runs_a_tiny_run_from_python(tiny, tmp_path):
    """Three steps of the CPU tiny run, built as a dict in code: the launcher starts both services and the
    trainer; the result names the folder, the last step's metrics, the final evaluation and the export."""
    out = tmp_path / "run"
    result = gkd.distill(_tiny_cfg(tiny), ["trainer.scheduler=sync"], out=out)

    assert result.run_dir == out.resolve() and result.steps == 3
    records = result.records()
    assert [r["step"] for r in records] == [0, 1, 2] and result.metrics == records[-1]
    assert math.isfinite(result.metrics["actor/kl_loss"]) and result.metrics["actor/num_sequences"] == 4
    assert result.final_eval["val/num_samples"] == 4 and math.isfinite(result.final_eval["val/kl"])
    assert result.final_eval["val/kl"] == records[-1]["val/kl"]
    assert (result.final_model / "model.safetensors").is_file() and result.final_adapter is None
    assert [p.name for p in result.checkpoints] == ["step_000003"]
    # the run folder keeps the config the launcher and its children read; it reruns with gkd train
    assert result.config_files == ((out / "config.yaml").resolve(),)
    assert load_config([str(result.config_files[0])]) == result.config
    assert result.config.trainer.scheduler == "sync" and result.config.trainer.output_dir == str(out)
    assert (out / "logs" / "trainer.log").is_file()


def test_yaml_paths_and_overrides_go_to_the_launcher_as_given(tmp_path, monkeypatch):
    """YAML paths are not rewritten: the launcher gets the files and overrides ``gkd train`` would."""
    from gkd.launch import run as launch

    path = tmp_path / "c.yaml"
    path.write_text(YAML)
    seen = {}

    def fake_run(paths, overrides, **kw):
        seen.update(paths=list(paths), overrides=list(overrides), dry_run=kw["dry_run"])
        return 3

    monkeypatch.setattr(launch, "run", fake_run)
    with pytest.raises(gkd.DistillError) as e:
        gkd.distill([path], ["optim.lr=1e-5"], out=tmp_path / "run")
    run = f"trainer.output_dir={tmp_path / 'run'}"
    assert seen == {"paths": [str(path)], "overrides": ["optim.lr=1e-5", run], "dry_run": False}
    assert e.value.status == 3 and str(e.value).startswith("the run failed (status 3); its logs: ")
