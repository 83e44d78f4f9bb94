"""The documentation stays true: the GPU quick-start configs plan as their comments say (``--dry-run``
with ``GKD_FAKE_GPUS``, nothing downloaded), ``scripts/setup.sh gpu`` installs the vllm extra,
``docs/configuration.md`` matches the config dataclasses, and the commands the docs give for services on
their own nodes run verbatim."""

from __future__ import annotations

import dataclasses
import os
import shlex
import subprocess
import sys
import tomllib

import pytest

from tests.tiny_run import ROOT, load_script

gen = load_script("gen_config_docs")


def _dry_run(config: str, gpus: int, tmp_path) -> dict:
    """``GKD_FAKE_GPUS=gpus gkd train --config config --dry-run`` offline, with an empty hub cache: the
    printed plan rows and commands."""
    env = {k: v for k, v in os.environ.items() if k not in ("CUDA_VISIBLE_DEVICES", "GKD_FAKE_GPUS")}
    env.update(GKD_FAKE_GPUS=str(gpus), HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"), OMP_NUM_THREADS="1")
    argv = [sys.executable, "-m", "gkd.cli", "train", "--config", config, "--dry-run"]
    done = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert not (tmp_path / "hf").exists() or not any((tmp_path / "hf").rglob("*")), "the dry run fetched"
    lines = done.stdout.splitlines()
    rows = [line.split() for line in lines if line.startswith(("  trainer ", "  rollout ", "  teacher "))]
    commands = {line.split(": ", 1)[0]: shlex.split(line.split(": ", 1)[1]) for line in lines
                if line.split(":")[0] in ("trainer", "rollout", "teacher")}  # fmt: skip
    channel = next(line.rsplit(": ", 1)[1] for line in lines if "weight channel" in line)
    return {"rows": [(r[0], r[-1]) for r in rows], "commands": commands, "channel": channel, "out": done.stdout}


def _flag(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


@pytest.mark.parametrize(
    ("config", "gpus", "rows", "channel", "backends", "models"),
    [
        # one GPU: all three roles on GPU 0, hf engines, gloo (NCCL refuses two ranks on one GPU)
        ("configs/gpu_1x.yaml", 1, [("trainer", "0"), ("rollout", "0"), ("teacher", "0")], "gloo",
         ("hf", "hf"), ("Qwen/Qwen2.5-0.5B-Instruct", "Qwen/Qwen2.5-1.5B-Instruct")),
        # two GPUs: the vLLM rollout alone on GPU 1, the hf teacher beside the trainer on GPU 0
        ("configs/gpu_2x.yaml", 2, [("trainer", "0"), ("rollout", "1"), ("teacher", "0")], "nccl",
         ("vllm", "hf"), ("Qwen/Qwen2.5-0.5B-Instruct", "Qwen/Qwen2.5-1.5B-Instruct")),
        # eight: 4 FSDP2 trainer ranks, two vLLM rollout engines, two vLLM teacher engines, all disjoint
        ("configs/gpu_8x.yaml", 8,
         [("trainer", "0,1,2,3"), ("rollout", "4"), ("rollout", "5"), ("teacher", "6"), ("teacher", "7")],
         "nccl", ("vllm", "vllm"), ("Qwen/Qwen2.5-1.5B-Instruct", "Qwen/Qwen2.5-7B-Instruct")),
    ],
)  # fmt: skip
def test_gpu_quick_starts_plan_as_documented(config, gpus, rows, channel, backends, models, tmp_path):
    plan = _dry_run(config, gpus, tmp_path)
    assert plan["out"].startswith(f"GPU plan for this node: {gpus} GPU(s) (GKD_FAKE_GPUS={gpus})"), plan["out"]
    assert plan["rows"] == rows, plan["out"]
    assert plan["channel"] == channel
    cmds = plan["commands"]
    trainer, rollout, teacher = cmds["trainer"], cmds["rollout"], cmds["teacher"]
    assert trainer[0] == f"CUDA_VISIBLE_DEVICES={rows[0][1]}"
    for name, argv in (("rollout", rollout), ("teacher", teacher)):
        mine = ",".join(devices for role, devices in rows if role == name)
        assert argv[0] == f"CUDA_VISIBLE_DEVICES={mine}" and _flag(argv, "--gpus") == mine, argv
        assert _flag(argv, "--device") == "cuda" and _flag(argv, "--dtype") == "bfloat16"
    assert (_flag(rollout, "--backend"), _flag(teacher, "--backend")) == backends
    assert _flag(rollout, "--weight-backend") == channel
    assert (_flag(rollout, "--model"), _flag(teacher, "--model")) == models  # hub ids: fetched at run time
    if gpus > 1:
        assert _flag(rollout, "--gpu-memory-utilization") == "0.85"  # a vLLM engine on a GPU of its own
    if gpus == 8:
        assert _flag(trainer, "--nproc-per-node") == "4" and _flag(teacher, "--gpu-memory-utilization") == "0.8"


def _setup(word: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "GKD_SETUP_PRINT": "1", "PYTHON": sys.executable}
    return subprocess.run(["bash", "scripts/setup.sh", word], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=60)  # fmt: skip


def test_setup_gpu_installs_the_vllm_extra():
    done = _setup("gpu")
    assert done.returncode == 0, done.stderr
    install = next(line for line in done.stdout.splitlines() if "--no-build-isolation -e" in line)
    extras = install.rsplit(".[", 1)[1].rstrip("]").split(",")
    known = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert "vllm" in extras and set(extras) <= set(known), install
    assert any(req.startswith("vllm==") for req in known["vllm"])  # pinned


def test_setup_refuses_an_unknown_extra_in_one_line():
    done = _setup("gpus")
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr.strip().splitlines() == [done.stderr.strip()]
    assert "unknown extra gpus" in done.stderr and "use gpu or one of" in done.stderr


# ------------------------------------------------------------------------------ configuration reference


def test_configuration_reference_is_current():
    """docs/configuration.md equals what the generator writes from gkd/config.py now."""
    expected = gen.render()
    current = (ROOT / "docs" / "configuration.md").read_text()
    assert current == expected, f"docs/configuration.md is stale; run: {gen.COMMAND}"


def test_configuration_reference_lists_every_key_with_type_default_and_meaning():
    from gkd.config import Config

    text = gen.render()
    table = {line.split(" | ")[0].strip("| `"): line.split(" | ") for line in text.splitlines()
             if line.startswith("| `")}  # fmt: skip
    keys = [k for k in gen._all_keys(Config) if "." in k]  # not the sections themselves
    assert len(keys) > 100 and set(keys) == set(table)
    assert table["trainer.scheduler"][2] == "`one_step_off`"  # the default
    assert table["loss.name"][1].startswith("`forward_kl` \\| `reverse_kl`")  # the choices
    # meanings: the comment on the field's line, else gkd/config_help.py
    assert table["data.sources[].weight"][3] == "relative share of the training prompts drawn from this source |"
    assert table["optim.lr"][3] == "peak learning rate |"


def test_a_key_without_a_description_fails_the_generator(monkeypatch):
    """A new key with no comment and no HELP entry: the generator names it instead of writing a blank."""
    import gkd.config_help as config_help

    help_text = dict(config_help.HELP)
    del help_text["trainer.nnodes"]  # trainer.nnodes has no comment in gkd/config.py
    monkeypatch.setattr(config_help, "HELP", help_text)
    with pytest.raises(gen.MissingHelp, match=r"^trainer\.nnodes: no description; add a comment"):
        gen.render()
    monkeypatch.setattr(config_help, "HELP", {**config_help.HELP, "trainer.gone": "x"})
    with pytest.raises(gen.MissingHelp, match=r"trainer\.gone: gkd/config_help.py's HELP describes a key"):
        gen.render()

    @dataclasses.dataclass
    class Section:
        documented: int = 1  # on its line
        bare: int = 2

    missing: list[str] = []
    source = "class Section:\n    # above it\n    documented: int = 1  # on its line\n    bare: int = 2\n"
    rows = gen.rows(Section, "s", gen.field_comments(source), {}, missing)
    assert missing == ["s.bare"]
    assert rows[0] == ("`s.documented`", "`int`", "`1`", "above it on its line")


def test_the_generator_cli_reports_a_stale_file(tmp_path, monkeypatch):
    monkeypatch.setattr(gen, "OUT", tmp_path / "configuration.md")
    (tmp_path / "configuration.md").write_text("old\n")
    assert gen.main(["--check"]) == 1
    assert gen.main([]) == 0 and gen.main(["--check"]) == 0
