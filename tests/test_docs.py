"""The documentation stays true: the GPU quick-start configs plan as their comments say (``--dry-run``
with ``GKD_FAKE_GPUS``, nothing downloaded), ``scripts/setup.sh gpu`` installs the vllm extra,
``docs/configuration.md`` matches the config dataclasses, the commands the README gives for services on
machines of their own run verbatim, and the links between the documents resolve."""

from __future__ import annotations

import dataclasses
import json
import os
import shlex
import subprocess
import sys
import tomllib

import pytest

from tests.tiny_run import ROOT, load_script, tiny_fixture

gen = load_script("gen_config_docs")


def _table_rows(lines: list[str]) -> list[tuple[str, str]]:
    """(role, CUDA_VISIBLE_DEVICES) of each row of the printed plan, cut at the header's column starts (a
    cell may hold a space: "ranks 0-3")."""
    header = next(line for line in lines if line.split()[:2] == ["role", "worker"])
    start, end = header.index("CUDA_VISIBLE_DEVICES"), None
    rest = header[start:].split()
    if len(rest) > 1:  # more columns after it
        end = header.index(rest[1], start)
    rows = [line for line in lines if line.startswith(("  trainer ", "  rollout ", "  teacher "))]
    return [(row.split()[0], row[start:end].strip()) for row in rows]


def _command(line: str) -> tuple[dict[str, str], list[str]]:
    """A printed command: its leading NAME=value environment, then its argv."""
    words = shlex.split(line)
    env = {}
    while words and "=" in words[0] and words[0].split("=", 1)[0].isupper():
        name, value = words.pop(0).split("=", 1)
        env[name] = value
    return env, words


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
    commands = {line.split(": ", 1)[0]: _command(line.split(": ", 1)[1]) for line in lines
                if line.split(":")[0] in ("trainer", "rollout", "teacher")}  # fmt: skip
    channel = next(line.rsplit(": ", 1)[1] for line in lines if "weight channel" in line)
    return {"rows": _table_rows(lines), "commands": commands, "channel": channel, "out": done.stdout}


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
    lines = (ROOT / config).read_text().splitlines()
    assert lines[0] == f"# gkd train --config {config}"  # the command that runs it comes first
    dry_run = f"GKD_FAKE_GPUS={gpus} gkd train --config {config} --dry-run"
    assert any(dry_run in line for line in lines if line.startswith("#")), f"{config}: no {dry_run!r}"
    assert f"`{config}`" in (ROOT / "README.md").read_text()  # in the README's table
    plan = _dry_run(config, gpus, tmp_path)
    first = f"GPU plan for this node: {gpus} GPU(s) (GKD_FAKE_GPUS={gpus})"
    assert plan["out"].startswith(first), plan["out"]
    assert plan["rows"] == rows, plan["out"]
    assert plan["channel"] == channel
    cmds = plan["commands"]
    (trainer_env, trainer), (_, rollout), (_, teacher) = cmds["trainer"], cmds["rollout"], cmds["teacher"]
    assert trainer_env["CUDA_VISIBLE_DEVICES"] == rows[0][1]
    for name in ("rollout", "teacher"):
        env, argv = cmds[name]
        mine = ",".join(devices for role, devices in rows if role == name)
        assert env["CUDA_VISIBLE_DEVICES"] == mine and _flag(argv, "--gpus") == mine, argv
        assert _flag(argv, "--device") == "cuda" and _flag(argv, "--dtype") == "bfloat16"
    assert (_flag(rollout, "--backend"), _flag(teacher, "--backend")) == backends
    assert _flag(rollout, "--weight-backend") == channel
    assert (_flag(rollout, "--model"), _flag(teacher, "--model")) == models  # hub ids: fetched at run time
    if gpus > 1:
        assert _flag(rollout, "--gpu-memory-utilization") == "0.85"  # a vLLM engine on a GPU of its own
    if gpus == 8:
        assert _flag(trainer, "--nproc-per-node") == "4"
        assert _flag(teacher, "--gpu-memory-utilization") == "0.8"


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
    """docs/configuration.md equals what the generator writes from gkd/config/schema.py now."""
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
    # meanings: the comment on the field's line, else gkd/config/help.py
    weight = "relative share of the training prompts drawn from this source |"
    assert table["data.sources[].weight"][3] == weight
    assert table["optim.lr"][3] == "peak learning rate |"


def test_a_key_without_a_description_fails_the_generator(monkeypatch):
    """A new key with no comment and no HELP entry: the generator names it instead of writing a blank."""
    import gkd.config.help as config_help

    help_text = dict(config_help.HELP)
    del help_text["trainer.nnodes"]  # trainer.nnodes has no comment in gkd/config/schema.py
    monkeypatch.setattr(config_help, "HELP", help_text)
    with pytest.raises(gen.MissingHelp, match=r"^trainer\.nnodes: no description; add a comment"):
        gen.render()
    monkeypatch.setattr(config_help, "HELP", {**config_help.HELP, "trainer.gone": "x"})
    with pytest.raises(gen.MissingHelp, match=r"trainer\.gone: gkd/config/help.py's HELP describes a key"):
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


# ------------------------------------------------------------- services on machines of their own, verbatim

SERVICES_MARK = "<!-- docs-test: services-on-their-own-machines"
tiny = tiny_fixture(num_prompts=16)


def marked_commands(text: str, mark: str = SERVICES_MARK) -> list[str]:
    """The commands of the ```bash block right after ``mark``: comment lines dropped, continuation lines
    joined, each command as written."""
    after = text.split(mark, 1)[1].split("\n", 1)[1]
    assert after.startswith("```bash\n"), f"{mark}: no ```bash block right after it"
    block = after[len("```bash\n") :].split("```", 1)[0]
    commands, current = [], ""
    for line in block.splitlines():
        if not current and (not line.strip() or line.lstrip().startswith("#")):
            continue
        current += line.strip()
        if current.endswith("\\"):
            current = current[:-1].rstrip() + " "
        else:
            commands.append(current)
            current = ""
    return commands


def test_the_marked_commands_are_read_as_written():
    text = 'x\n<!-- m -->\n```bash\n# a comment\ngkd a --b 1 \\\n  --c "$D"\n\ngkd e\n```\nafter\n'
    assert marked_commands(text, "<!-- m -->") == ['gkd a --b 1 --c "$D"', "gkd e"]


def _service_ports(commands: list[str]) -> dict[str, int]:
    """The documented port numbers; they must be the config's defaults (the trainer line relies on it)."""
    from gkd.config import RolloutConfig, TeacherConfig

    teacher, rollout = shlex.split(commands[0]), shlex.split(commands[1])
    ports = {
        "teacher": int(_flag(teacher, "--port")),
        "teacher_backend": int(_flag(teacher, "--backend-port")),
        "rollout": int(_flag(rollout, "--port")),
        "rollout_backend": int(_flag(rollout, "--backend-port")),
        "weights": int(_flag(rollout, "--weight-channel").rsplit(":", 1)[1]),
    }
    t, r = TeacherConfig(), RolloutConfig()
    assert ports == {"teacher": t.server_port, "teacher_backend": t.backend_port, "rollout": r.server_port,
                     "rollout_backend": r.backend_port, "weights": r.weight_port}  # fmt: skip
    return ports


@pytest.mark.slow
def test_services_on_their_own_machines_run_as_the_readme_says(tiny, tmp_path):
    """The README's three commands (teacher, rollout, trainer on machines of their own), run verbatim with
    every host 127.0.0.1, the tiny models and a config of the test's; only the documented port numbers are
    moved to free ports (so parallel runs do not collide)."""
    import re
    import secrets

    from gkd.config import load_config, to_yaml
    from gkd.launch.run import wait_healthy
    from gkd.rollout.client import RolloutClient
    from gkd.services.transport.process import stop_children
    from gkd.teacher.client import TeacherClient
    from tests.transport.helpers import free_port

    commands = marked_commands((ROOT / "README.md").read_text())
    assert [c.split()[:3] for c in commands] == [["gkd", "teacher", "serve"], ["gkd", "rollout", "serve"],
                                                 ["gkd", "train", "--config"]]  # fmt: skip
    assert all("--host" in shlex.split(c) for c in commands[:2])
    documented = _service_ports(commands)
    ports = {name: free_port() for name in documented}
    moved = {str(documented[n]): str(ports[n]) for n in documented}
    commands = [re.sub(r"\b(\d{4,5})\b", lambda m: moved.get(m[1], m[1]), c) for c in commands]

    out = tmp_path / "run"
    config = tmp_path / "run.yaml"
    overrides = [f"model.student_path={tiny['student']}", f"teacher.model_path={tiny['teacher']}",
                 f"data.train_files=[{tiny['prompts']}]", f"trainer.output_dir={out}",
                 "trainer.total_steps=2", "rollout.max_new_tokens=8", "trainer.nproc_per_node=1",
                 "trainer.save_freq=0", "logging.progress_bar=false",
                 f"teacher.server_port={ports['teacher']}", f"rollout.server_port={ports['rollout']}",
                 f"rollout.weight_port={ports['weights']}"]  # fmt: skip
    config.write_text(to_yaml(load_config(["configs/cpu_tiny.yaml"], overrides)))
    bin_dir = tmp_path / "bin"  # `gkd` is this interpreter's gkd (the tree under test)
    bin_dir.mkdir()
    (bin_dir / "gkd").write_text(f'#!/bin/sh\nexec "{sys.executable}" -m gkd.cli "$@"\n')
    (bin_dir / "gkd").chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "OMP_NUM_THREADS": "1",
           "HF_HUB_OFFLINE": "1", "TEACHER_HOST": "127.0.0.1", "ROLLOUT_HOST": "127.0.0.1",
           "TRAINER_HOST": "127.0.0.1", "TEACHER": tiny["teacher"], "STUDENT": tiny["student"],
           "CONFIG": str(config), "GKD_CHANNEL_TOKEN": secrets.token_hex(32)}  # fmt: skip
    services = []
    try:
        for command, client_cls, port in [(commands[0], TeacherClient, ports["teacher"]),
                                          (commands[1], RolloutClient, ports["rollout"])]:  # fmt: skip
            log = open(tmp_path / f"{command.split()[1]}.log", "wb")  # noqa: SIM115 (closed with the process)
            services.append(subprocess.Popen(["bash", "-c", f"exec {command}"], cwd=tmp_path, env=env,
                                             stdout=log, stderr=subprocess.STDOUT))  # fmt: skip
            with client_cls(f"127.0.0.1:{port}", timeout_s=5, retries=0) as client:
                wait_healthy(command.split()[1], services[-1], lambda c=client: c.info(timeout_s=2), 1, 180)
        done = subprocess.run(["bash", "-c", commands[2]], cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=600)  # fmt: skip
        assert done.returncode == 0, done.stderr[-4000:]
    finally:
        stop_children(list(reversed(services)))
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    steps = [r for r in records if "actor/kl_loss" in r]
    assert [r["step"] for r in steps] == [0, 1]
    assert (out / "final" / "model.safetensors").is_file()


def _anchors(markdown: str) -> set[str]:
    """GitHub's anchors for the headings of ``markdown``: lower case, punctuation dropped, spaces to -."""
    import re

    heads = [line.lstrip("#").strip() for line in markdown.splitlines() if re.match(r"#{1,6} ", line)]
    return {re.sub(r"[^\w\- ]", "", h.lower()).replace(" ", "-") for h in heads}


def test_links_between_the_documents_resolve():
    """Every relative link in README.md and docs/*.md names a file that exists, and a heading in it."""
    import re

    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    checked = 0
    for page in pages:
        for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
            if target.startswith(("http://", "https://", "mailto:")):
                continue
            path, _, anchor = target.partition("#")
            file = (page.parent / path).resolve() if path else page
            assert file.is_file(), f"{page.name}: link to {target}: no such file"
            if anchor:
                assert anchor in _anchors(file.read_text()), f"{page.name}: link to {target}: no such heading"
            checked += 1
    assert checked >= 10
