"""``gkd export CHECKPOINT OUT [--dtype D]``: a ``files`` checkpoint (full, tied, LoRA) -> a Hugging Face
folder that transformers loads with the trained model's logits, in one file or several shards, in the
student's dtype or ``--dtype``; bad paths are one line and status 2. (The ``dcp`` layout:
tests/test_checkpoint_sharded.py.)"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from gkd.cli import main as cli
from gkd.config import Config, ConfigError, LoRAConfig, load_config, to_yaml
from gkd.trainer.checkpoint import save_checkpoint
from gkd.trainer.export import export_checkpoint
from gkd.trainer.step import build_optimizer
from tests.test_checkpoint import CFG, _step
from tests.test_checkpoint_sharded import _save_student
from tests.test_trainer_step import tiny_llama

IDS = torch.tensor([[1, 5, 9, 2, 7, 3]])


@pytest.fixture(autouse=True)
def _one_thread():
    from tests.tiny_llama import one_intra_op_thread

    yield from one_intra_op_thread()


@pytest.fixture(scope="module")
def teacher():
    return tiny_llama(1)


def _trained(
    tmp_path: Path, teacher, *, tie: bool = False, lora: LoRAConfig | None = None, bf16: bool = False
):
    """(the trained student, its checkpoint): two steps from a student folder saved in ``tmp_path``."""
    student = tmp_path / "student"
    _save_student(student, tie=tie)
    if bf16:  # a bf16 hub model: config.json says so
        from transformers import AutoModelForCausalLM

        AutoModelForCausalLM.from_pretrained(student, dtype=torch.bfloat16).save_pretrained(student)
    model = tiny_llama(3, tie=tie)
    if lora is not None:
        from gkd.trainer.lora import apply_lora

        torch.manual_seed(0)
        model = apply_lora(model, lora)
    opt, sched = build_optimizer(model, CFG.optim, 6)
    for _ in range(2):
        _step(model, opt, sched, teacher)
    cfg = Config()
    cfg.model.student_path = str(student)
    if lora is not None:
        cfg.model.lora = lora
    path = save_checkpoint(tmp_path / "run", 2, model=model, optimizer=opt, lr_scheduler=sched,
                           config_yaml=to_yaml(cfg))  # fmt: skip
    return model.eval(), path


def _logits(folder) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder)(input_ids=IDS).logits


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_export_of_a_checkpoint_loads_with_the_trained_logits(tmp_path, teacher, tie, capsys):
    from transformers import AutoTokenizer

    model, path = _trained(tmp_path, teacher, tie=tie)
    assert cli(["export", str(path), str(tmp_path / "hf")]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "hf")
    torch.testing.assert_close(_logits(tmp_path / "hf"), model(input_ids=IDS).logits, rtol=0, atol=0)
    assert AutoTokenizer.from_pretrained(tmp_path / "hf").convert_tokens_to_ids("t5") == 5
    files = sorted(p.name for p in (tmp_path / "hf").iterdir() if p.suffix == ".safetensors")
    assert files == ["model.safetensors"]
    # several shards (and the run folder, whose newest checkpoint is taken): the same model
    export_checkpoint(path, tmp_path / "sharded", max_shard_bytes=20_000)
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    torch.testing.assert_close(_logits(tmp_path / "sharded"), model(input_ids=IDS).logits, rtol=0, atol=0)


def test_dtype_defaults_to_the_students_own_and_follows_dtype(tmp_path, teacher):
    from safetensors import safe_open

    model, path = _trained(tmp_path, teacher, bf16=True)  # trained in fp32, the student folder is bf16

    def dtypes(folder: Path) -> set[torch.dtype]:
        with safe_open(str(folder / "model.safetensors"), framework="pt") as f:
            return {f.get_tensor(k).dtype for k in f.keys()}  # noqa: SIM118

    assert cli(["export", str(tmp_path / "run"), str(tmp_path / "auto")]) == 0  # a run folder: its newest
    assert dtypes(tmp_path / "auto") == {torch.bfloat16}
    assert json.loads((tmp_path / "auto" / "config.json").read_text())["dtype"] == "bfloat16"
    assert cli(["export", str(path), str(tmp_path / "fp32"), "--dtype", "float32"]) == 0
    assert dtypes(tmp_path / "fp32") == {torch.float32}
    torch.testing.assert_close(_logits(tmp_path / "fp32"), model(input_ids=IDS).logits, rtol=0, atol=0)


def test_export_of_a_lora_checkpoint_merges_the_adapter(tmp_path, teacher):
    pytest.importorskip("peft")
    lora = LoRAConfig(enabled=True, r=4, alpha=8.0)
    model, path = _trained(tmp_path, teacher, lora=lora)
    assert cli(["export", str(path), str(tmp_path / "hf"), "--dtype", "float32"]) == 0
    torch.testing.assert_close(_logits(tmp_path / "hf"), model(input_ids=IDS).logits, rtol=1e-5, atol=1e-6)
    assert (tmp_path / "hf_adapter" / "adapter_config.json").is_file()


def test_bad_paths_are_one_line_and_status_2(tmp_path, teacher, capsys):
    assert cli(["export", str(tmp_path / "nothing"), str(tmp_path / "hf")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"gkd export: error: {tmp_path / 'nothing'}: not a checkpoint")
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    _, path = _trained(tmp_path, teacher)
    cfg = load_config([str(path / "config.yaml")], check=False)
    cfg.model.student_path = str(tmp_path / "moved")
    (path / "config.yaml").write_text(to_yaml(cfg))
    capsys.readouterr()  # the student folder's progress bars
    assert cli(["export", str(path), str(tmp_path / "hf")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--student" in err and "moved" in err
    assert cli(["export", str(path), str(tmp_path / "hf"), "--student", str(tmp_path / "student")]) == 0
    assert not (tmp_path / "moved").exists()


def test_export_dtype_config_key_is_checked():
    base = ["model.student_path=x", "data.train_files=[x.parquet]"]
    assert load_config([], [*base, "trainer.export_dtype=bfloat16"]).trainer.export_dtype == "bfloat16"
    with pytest.raises(ConfigError, match=r"trainer.export_dtype='int8': expected one of auto, float32"):
        load_config([], [*base, "trainer.export_dtype=int8"])
