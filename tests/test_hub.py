"""Hub ids (gkd/data/hub.py): models and datasets resolve through huggingface_hub's cache, populated here
with a tiny model and a prompt file (HF_HUB_OFFLINE=1: nothing reaches the network), revisions pin snapshots,
HF_HOME is honoured, an id that is not cached is one line naming the key."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from gkd.config import load_config
from gkd.data.hub import HubError, is_hub_id, local_dataset, local_model, localize
from gkd.data.prompts import PromptDataset, Source
from gkd.demo.tiny import tiny_llama, tokenizer

MAIN, PINNED = "a" * 40, "b" * 40


def cache_repo(
    cache: Path, repo_type: str, repo_id: str, files: Path, commit: str, ref: str = "main"
) -> Path:
    """``files`` (a folder) as snapshot ``commit`` of ``repo_id`` in a huggingface_hub cache at ``cache``,
    with ``refs/<ref>`` pointing at it: the layout ``snapshot_download`` finds offline."""
    root = cache / f"{repo_type}s--{repo_id.replace('/', '--')}"
    snap = root / "snapshots" / commit
    shutil.copytree(files, snap, dirs_exist_ok=True)
    (root / "refs").mkdir(parents=True, exist_ok=True)
    (root / "refs" / ref).write_text(commit)
    return snap


def _tiny_model(path: Path, seed: int) -> Path:
    tiny_llama(300, hidden=32, layers=1, seed=seed, head_scale=1.0).save_pretrained(path)
    tokenizer().save_pretrained(path)
    return path


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    from huggingface_hub import constants

    hub = tmp_path / "hf" / "hub"
    hub.mkdir(parents=True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hub))
    assert constants.HF_HUB_OFFLINE  # tests/conftest.py: the hub is never reached
    return hub


def test_what_is_a_hub_id(tmp_path):
    assert is_hub_id("Qwen/Qwen2.5-1.5B-Instruct") and is_hub_id("openai-community/gpt2")
    assert not is_hub_id("gpt2") and not is_hub_id("S")  # owner/name only: a bare name is a local path
    assert not is_hub_id(str(tmp_path))  # an existing folder
    assert not is_hub_id("runs/tiny/student")  # a path (two slashes), checked as a local folder
    assert not is_hub_id("prompts.parquet") and not is_hub_id("data/x.jsonl") and not is_hub_id("./x")
    assert not is_hub_id("")


def test_models_resolve_from_the_cache_and_revisions_pin_snapshots(cache, tmp_path):
    main = cache_repo(cache, "model", "acme/tiny", _tiny_model(tmp_path / "m1", 1), MAIN)
    pinned = cache_repo(cache, "model", "acme/tiny", _tiny_model(tmp_path / "m2", 2), PINNED, ref=PINNED)
    assert Path(local_model("acme/tiny")) == main
    assert Path(local_model("acme/tiny", revision=PINNED)) == pinned
    assert local_model(str(tmp_path / "m1")) == str(tmp_path / "m1")  # a local folder stays itself
    with pytest.raises(HubError) as e:
        local_model("acme/absent", key="teacher.model_path")
    line = str(e.value)
    assert "\n" not in line
    assert line.startswith("teacher.model_path=acme/absent: no local folder of that name")
    assert "not in the local cache and HF_HUB_OFFLINE=1" in line


def test_localize_replaces_model_ids_by_folders_for_every_child(cache, tmp_path):
    student = cache_repo(cache, "model", "acme/student", _tiny_model(tmp_path / "s", 1), MAIN)
    teacher = cache_repo(cache, "model", "acme/teacher", _tiny_model(tmp_path / "t", 2), PINNED, ref=PINNED)
    prompts = tmp_path / "p"
    prompts.mkdir()
    (prompts / "train.jsonl").write_text('{"prompt": "fox"}\n')
    cache_repo(cache, "dataset", "acme/prompts", prompts, MAIN)
    overrides = ["model.student_path=acme/student", "teacher.launch=true", "teacher.model_path=acme/teacher",
                 f"teacher.revision={PINNED}", "data.train_files=acme/prompts"]  # fmt: skip
    cfg = load_config([], overrides)
    same, unchanged = localize(cfg, overrides, dry_run=True)
    assert same is cfg and unchanged == overrides  # a dry run fetches nothing
    cfg2, overrides2 = localize(cfg, overrides)
    assert Path(cfg2.model.student_path) == student and Path(cfg2.teacher.model_path) == teacher
    assert overrides2[-2:] == [f"model.student_path={student}", f"teacher.model_path={teacher}"]
    reloaded = load_config([], overrides2)  # what the trainer ranks and services load
    assert Path(reloaded.model.student_path) == student and reloaded.data.train_files == ["acme/prompts"]
    missing = load_config([], ["model.student_path=acme/student", "data.sources=[{path: acme/none}]"])
    with pytest.raises(HubError, match=r"^data.sources\[0\].path=acme/none: no local folder"):
        localize(missing, [])


def test_hub_datasets_load_by_id_config_and_split(cache, tmp_path):
    repo = tmp_path / "d"
    (repo / "data").mkdir(parents=True)
    (repo / "data" / "train.jsonl").write_text(
        "".join(json.dumps({"q": f"fox {i}"}) + "\n" for i in range(3))
    )
    (repo / "data" / "test.jsonl").write_text(json.dumps({"q": "dog"}) + "\n")
    cache_repo(cache, "dataset", "acme/prompts", repo, MAIN)
    assert Path(local_dataset("acme/prompts")).is_dir()
    tok = tokenizer()
    train = PromptDataset([Source("acme/prompts", "q")], tok)
    test = PromptDataset([Source("acme/prompts", "q", split="test")], tok)
    assert len(train) == 3 and tok.decode(test[0]) == "<s>user: dog\n<s>assistant:"
    assert train.where(2) == ("acme/prompts", 2)


def test_hf_home_is_honoured(tmp_path):
    """A fresh process with HF_HOME set finds the snapshot under HF_HOME/hub."""
    snap = cache_repo(tmp_path / "home" / "hub", "model", "acme/tiny", _tiny_model(tmp_path / "m", 1), MAIN)
    env = {**os.environ, "HF_HOME": str(tmp_path / "home"), "HF_HUB_OFFLINE": "1"}
    env.pop("HF_HUB_CACHE", None)
    code = "from gkd.data.hub import local_model; print(local_model('acme/tiny'))"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert Path(out.stdout.strip().splitlines()[-1]) == snap
