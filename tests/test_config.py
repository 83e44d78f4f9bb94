"""Structured config: defaults <- YAML <- key=value; unknown keys, bad types and bad choices name the key."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from gkd.config import Config, ConfigError, load_config, parse_scheduler, to_yaml

ROOT = Path(__file__).resolve().parents[1]
REQUIRED = ["model.student_path=/m", "data.train_files=/d.parquet"]


def _load(*overrides, paths=()):
    return load_config(list(paths), [*REQUIRED, *overrides])


def test_defaults_are_typed_dataclasses():
    cfg = _load()
    assert isinstance(cfg, Config)
    assert cfg.trainer.scheduler == "one_step_off" and cfg.trainer.staleness == 1
    assert cfg.loss.name == "forward_kl" and cfg.loss.tail == "bucket"
    assert cfg.data.train_files == ["/d.parquet"]  # a scalar for a list key becomes a one-element list
    assert isinstance(cfg.optim.lr, float)


def test_yaml_then_overrides(tmp_path):
    y = tmp_path / "run.yaml"
    y.write_text("optim:\n  lr: 3.0e-5\n  schedule: cosine\ndata:\n  train_files: [a.parquet, b.parquet]\n")
    cfg = load_config([str(y)], ["optim.lr=1e-4", "model.student_path=/m", "trainer.total_steps=7"])
    assert cfg.optim.lr == pytest.approx(1e-4)  # the override wins over the file
    assert cfg.optim.schedule == "cosine"  # the file wins over the default
    assert cfg.data.train_files == ["a.parquet", "b.parquet"]
    assert cfg.trainer.total_steps == 7
    assert load_config([str(y)], ["model.student_path=/m", "data.train_files=[x,y]"]).data.train_files == [
        "x",
        "y",
    ]


def test_round_trip_through_yaml(tmp_path):
    cfg = _load("trainer.scheduler=3", "loss.name=jsd", "loss.beta=0.25")
    p = tmp_path / "resolved.yaml"
    p.write_text(to_yaml(cfg))
    assert load_config([str(p)]) == cfg


@pytest.mark.parametrize(
    "override, section, valid",
    [
        ("model.dtyp=float32", "model", "student_path, param_dtype, compute_dtype, gradient_checkpointing"),
        ("trainer.schedular=sync", "trainer", "scheduler"),
        ("data.batch_size=4", "data", "train_batch_size"),
    ],
)
def test_unknown_key_lists_valid_keys(override, section, valid):
    key = override.split("=")[0]
    with pytest.raises(ConfigError, match=rf"unknown config key '{re.escape(key)}'") as e:
        _load(override)
    assert f"valid keys in '{section}': " in str(e.value) and valid in str(e.value)


@pytest.mark.parametrize("key", ["model.dtype", "model.autocast"])
def test_removed_precision_keys_name_their_replacements(tmp_path, key):
    want = rf"'{key}' was removed; use model.param_dtype \(master weights and optimizer state.*" + (
        r"model.compute_dtype \(forward/backward"
    )
    with pytest.raises(ConfigError, match="command line override: " + want):
        _load(f"{key}=bfloat16")
    y = tmp_path / "old.yaml"
    y.write_text(f"model:\n  {key.split('.')[1]}: bfloat16\n")
    with pytest.raises(ConfigError, match=f"config file {re.escape(str(y))}: " + want) as e:
        load_config([str(y)], ["model.student_path=m", "data.train_files=x.parquet"])
    assert "\n" not in str(e.value)


def test_unknown_section_and_unknown_key_in_yaml_name_the_file(tmp_path):
    with pytest.raises(
        ConfigError, match="valid sections: model, teacher, rollout, trainer, loss, optim, data"
    ):
        _load("optimizer.lr=1")
    y = tmp_path / "bad.yaml"
    y.write_text("teacher:\n  port: 1\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: unknown config key 'teacher\.port'.*server_port"):
        load_config([str(y)], REQUIRED)
    with pytest.raises(ConfigError, match=r"missing\.yaml not found"):
        load_config([str(tmp_path / "missing.yaml")])
    with pytest.raises(ConfigError, match="not of the form section.key=value"):
        _load("optim.lr")


@pytest.mark.parametrize(
    "override, key",
    [
        ("optim.lr=fast", "optim.lr"),
        ("data.train_batch_size=2.5", "data.train_batch_size"),
        ("model.gradient_checkpointing=maybe", "model.gradient_checkpointing"),
    ],
)
def test_type_errors_name_the_key(override, key):
    with pytest.raises(ConfigError, match=rf"bad value for config key '{re.escape(key)}'"):
        _load(override)


@pytest.mark.parametrize(
    "override, message",
    [
        ("loss.name=kl", "loss.name='kl': expected one of forward_kl, reverse_kl, jsd, sampled_reverse_kl"),
        ("loss.tail=all", "loss.tail='all': expected one of bucket, renorm, none"),
        ("rollout.backend=sglang", "rollout.backend='sglang': expected one of hf, vllm"),
        ("trainer.strategy=deepspeed", "trainer.strategy='deepspeed': expected one of ddp, fsdp2"),
        ("data.truncation=middle", "data.truncation='middle': expected one of error, left, right"),
        ("optim.schedule=linear", "optim.schedule='linear': expected one of constant, cosine"),
        ("rollout.top_p=0", "rollout.top_p=0.0: must lie in (0, 1]"),
        ("teacher.launch=true", "teacher.model_path='': required when teacher.launch"),
        ("trainer.resume=/no/such/ckpt", "trainer.resume='/no/such/ckpt': expected auto, never or the path"),
        ("data.micro_batch_tokens=100", "data.micro_batch_tokens=100: must hold one full sequence"),
    ],
)
def test_choices_and_ranges_name_the_key(override, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        _load(override)


def test_required_keys():
    with pytest.raises(ConfigError, match="model.student_path='': required"):
        load_config([], ["data.train_files=x"])
    with pytest.raises(ConfigError, match=r"data.train_files=\[\]: required"):
        load_config([], ["model.student_path=/m"])


@pytest.mark.parametrize(
    "value, k", [("sync", 0), ("one_step_off", 1), ("two_step_off", 2), ("3", 3), (5, 5), ("0", 0)]
)
def test_scheduler_parsing(value, k):
    assert parse_scheduler(value) == k
    assert _load(f"trainer.scheduler={value}").trainer.staleness == k


@pytest.mark.parametrize("value", ["async", "-1", "1.5", "two"])
def test_bad_scheduler(value):
    with pytest.raises(
        ConfigError, match="trainer.scheduler=.*expected one of sync, one_step_off, two_step_off"
    ):
        _load(f"trainer.scheduler={value}")


@pytest.mark.parametrize("name", ["cpu_tiny.yaml", "gpu_example.yaml"])
def test_shipped_configs_load_and_first_comment_is_the_command(name):
    path = ROOT / "configs" / name
    first = path.read_text().splitlines()[0]
    assert first == f"# gkd train --config configs/{name}"
    cfg = load_config([str(path)], check=False)
    # everything but paths that only exist on a prepared machine must validate
    cfg.trainer.resume = "auto"
    from gkd.config import validate

    validate(cfg)
