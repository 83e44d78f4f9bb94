"""One tokenizer, embeddings padded to different sizes (gkd/data/vocab.py): preflight compares tokenizers, not
``config.vocab_size``; the teacher never names a padded row and the rollout never samples one; a
different tokenizer is refused in one line naming both folders; every generation-config eos id stops."""

from __future__ import annotations

import json
import math
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gkd.config import load_config
from gkd.data.vocab import _length_bound, load_tokenizer, stop_token_ids, tokenizer_identity
from gkd.demo.tiny import tiny_llama, tokenizer
from gkd.launch.preflight import check_tokenizers
from gkd.rollout.hf_engine import HFRolloutEngine
from gkd.rollout.types import SamplingConfig
from gkd.services.inputs import InputError
from gkd.teacher.hf_engine import HFTeacherEngine
from gkd.teacher.types import TeacherOutput
from gkd.teacher.vllm_engine import mask_padded_ids
from tests.tiny_run import ROOT, train_argv

TOKENS = 262  # the tokenizer's length; the student's embedding has 264 rows, the teacher's 320


def _boost_padded(model, factor: float) -> None:
    """Scale the output rows past the tokenizer, so that an engine that did not mask them would pick them."""
    with torch.no_grad():
        model.get_output_embeddings().weight[TOKENS:] *= factor


def _save(path: Path, rows: int, *, hidden: int, seed: int, boost: float = 1.0, vocab: int = TOKENS) -> str:
    model = tiny_llama(rows, hidden=hidden, layers=2, seed=seed, head_scale=1.0)
    model.generation_config.eos_token_id = [1, 5]  # the tokenizer's </s> and a turn-end id
    _boost_padded(model, boost)
    model.save_pretrained(path)
    tokenizer(vocab).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def pair(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("pair")
    return {
        "student": _save(root / "student", 264, hidden=32, seed=1),
        "teacher": _save(root / "teacher", 320, hidden=64, seed=2, boost=3.0),
        "other": _save(root / "other", 320, hidden=32, seed=3, vocab=TOKENS + 8),
    }


def _cfg(student: str, teacher: str):
    return load_config(
        [],
        [
            f"model.student_path={student}",
            f"teacher.model_path={teacher}",
            "teacher.launch=true",
            "data.train_files=[x.parquet]",
        ],
    )


def test_preflight_compares_tokenizers_not_embedding_sizes(pair):
    assert json.loads(Path(pair["teacher"], "config.json").read_text())["vocab_size"] == 320
    check_tokenizers(_cfg(pair["student"], pair["teacher"]))  # 264 vs 320 rows, one tokenizer: fine
    with pytest.raises(InputError) as e:
        check_tokenizers(_cfg(pair["student"], pair["other"]))
    line = str(e.value)
    assert "\n" not in line and pair["student"] in line and pair["other"] in line
    assert "different tokenizers" in line and f"{TOKENS} tokens vs" in line
    a, b = tokenizer_identity(pair["student"]), tokenizer_identity(pair["teacher"])
    assert a == b and a.length == TOKENS


def test_the_same_tokenizer_files_are_checked_without_loading_a_tokenizer(pair, tmp_path, monkeypatch):
    """transformers' import alone takes seconds before `gkd train` could start a child: same bytes in the
    tokenizer files, embeddings above the bound read from them: no tokenizer loaded."""
    assert _length_bound(Path(pair["student"])) >= TOKENS == len(load_tokenizer(pair["student"]))
    special = tmp_path / "special"  # a special token named only by its text counts towards the bound
    shutil.copytree(pair["student"], special)
    cfg = json.loads((special / "tokenizer_config.json").read_text())
    (special / "tokenizer_config.json").write_text(json.dumps({**cfg, "pad_token": "<my-pad>"}))
    assert _length_bound(special) == _length_bound(Path(pair["student"])) + 1

    def no_loading(folder):
        raise AssertionError(f"a tokenizer was loaded: {folder}")

    monkeypatch.setattr("gkd.data.vocab.load_tokenizer", no_loading)
    check_tokenizers(_cfg(pair["student"], pair["teacher"]))  # 264 and 320 rows >= the bound
    with pytest.raises(AssertionError, match="a tokenizer was loaded"):  # other files: the full check
        check_tokenizers(_cfg(pair["student"], pair["other"]))


def test_preflight_refuses_an_embedding_smaller_than_the_tokenizer(pair, tmp_path):
    small = _save(tmp_path / "small", 256, hidden=32, seed=4)
    with pytest.raises(
        InputError, match=r"teacher.model_path=.*vocab_size 256 is smaller than .* 262 tokens"
    ):
        check_tokenizers(_cfg(pair["student"], small))


def test_the_teacher_never_names_a_padded_row(pair):
    engine = HFTeacherEngine.from_pretrained(pair["teacher"], max_top_k=32)
    assert engine.vocab_size == 320 and engine.token_ids == TOKENS
    assert engine.info()["token_ids"] == TOKENS
    seqs = [([5, 9, 17], list(range(20, 60))), ([3], [7, 8, 9, 10])]
    requested = [torch.tensor([[300, 4]] * 40), torch.tensor([[319, 4]] * 4)]  # padded ids requested
    unmasked = HFTeacherEngine(engine.model, max_top_k=32)  # every row: the control
    assert any(bool((o.topk_ids >= TOKENS).any()) for o in unmasked.score(seqs, 16))
    for out in engine.score(seqs, 16):
        assert int(out.topk_ids.max()) < TOKENS and torch.isfinite(out.topk_logprobs).all()
        assert torch.isfinite(out.token_logprobs).all()
        # the distribution is over the real tokens: the top-16 hold at most all of its mass
        assert float(out.topk_logprobs.exp().sum(-1).max()) <= 1 + 1e-5
    for out in engine.score(seqs, 16, requested_ids=requested):
        padded = out.topk_ids >= TOKENS
        assert bool(padded.any()) and torch.isinf(out.topk_logprobs[padded]).all()  # unused slots


def test_vllm_teacher_rows_naming_padded_ids_become_unused_slots():
    out = TeacherOutput(
        torch.tensor([[5, 300], [263, 7]], dtype=torch.int32),
        torch.tensor([[-0.1, -0.2], [-0.3, -0.4]], dtype=torch.float16),
        torch.tensor([-0.1, -0.4]),
    )
    masked = mask_padded_ids(out, TOKENS)
    assert masked.topk_ids.tolist() == [[5, 0], [0, 7]]
    assert torch.isinf(masked.topk_logprobs[0, 1]) and torch.isinf(masked.topk_logprobs[1, 0])
    assert masked.topk_logprobs[0, 0] == torch.tensor(-0.1, dtype=torch.float16)


def test_the_rollout_never_samples_a_padded_row(pair, tmp_path):
    path = _save(tmp_path / "wide_student", 320, hidden=32, seed=5, boost=6.0)
    engine = HFRolloutEngine.from_pretrained(path)
    assert engine.token_ids == TOKENS and engine.vocab_size == 320
    prompts = [[5, 9, 17], [3], [40, 41, 42, 43], [7, 7]] * 4
    s = SamplingConfig(max_new_tokens=24, temperature=1.0, seed=3, return_topk=8)
    control = HFRolloutEngine(engine.model).generate(prompts, s)  # every row may be sampled
    assert any(t >= TOKENS for x in control for t in x.response_ids)
    for x in engine.generate(prompts, s):
        assert max(x.response_ids) < TOKENS and int(x.topk_ids.max()) < TOKENS


def test_every_generation_config_eos_id_stops_the_rollout(pair):
    assert stop_token_ids(pair["student"], 1) == (1, 5)
    assert stop_token_ids(pair["student"], 1, extra=(9,)) == (9, 1, 5)
    engine = HFRolloutEngine.from_pretrained(pair["student"])
    assert engine.stop_ids == (1, 5)
    prompts = [[5, 9, 17], [3], [40, 41, 42, 43], [7, 7]] * 4
    s = SamplingConfig(max_new_tokens=40, temperature=1.0, seed=2)
    free = HFRolloutEngine(engine.model, token_ids=TOKENS).generate(prompts, s)  # no stop ids: the control
    hit = [i for i, x in enumerate(free) if 5 in x.response_ids]
    assert hit, "the control never sampled id 5: pick another seed"
    out = engine.generate(prompts, s)  # the request names no stop id: the model's own end ids stop it
    for i, (a, b) in enumerate(zip(out, free, strict=True)):
        ends = [j for j, t in enumerate(b.response_ids) if t in (1, 5)]
        if ends:
            assert a.finish_reason == "stop" and a.response_ids == b.response_ids[: ends[0] + 1], i
        else:
            assert a.finish_reason == "length"


def test_validation_and_the_vllm_rollout_stop_on_the_same_ids(pair):
    from gkd.rollout.vllm_engine import _folder_stop_ids
    from gkd.trainer.validation import Validator

    cfg = load_config([], [f"model.student_path={pair['student']}", "data.train_files=[x.parquet]"])
    v = Validator(cfg, [[1, 2]], None, None, lambda s, o: (0.0, 1), eos_id=1)
    assert v.sampling.stop_token_ids == (1, 5)
    assert _folder_stop_ids(pair["student"], no_tokenizer=False) == (1, 5)  # generation config, then eos


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_gkd_train_from_hub_ids_with_a_teacher_padded_further_than_the_student(pair, tmp_path):
    """The Qwen2.5-7B -> 1.5B situation in miniature, named as a new user would: student, teacher and
    prompts are hub ids (a local huggingface_hub cache under HF_HOME, HF_HUB_OFFLINE=1), one tokenizer,
    320 vs 264 embedding rows, a teacher whose padded rows would rank high. ``gkd train`` resolves the ids
    once, starts, trains, and its losses are finite."""
    from tests.test_hub import MAIN, cache_repo

    hub = tmp_path / "home" / "hub"
    cache_repo(hub, "model", "acme/student", Path(pair["student"]), MAIN)
    cache_repo(hub, "model", "acme/teacher", Path(pair["teacher"]), MAIN)
    data = tmp_path / "prompts"
    data.mkdir()
    (data / "train.jsonl").write_text(
        "".join(json.dumps({"prompt": f"the quick fox {i}"}) + "\n" for i in range(8))
    )
    cache_repo(hub, "dataset", "acme/prompts", data, MAIN)
    tiny = {"student": "acme/student", "teacher": "acme/teacher", "prompts": "acme/prompts"}
    out = tmp_path / "run"
    ports = [_free_port() for _ in range(5)]
    argv = train_argv(tiny, out, ports, "trainer.total_steps=3", "trainer.save_freq=0",
                      "teacher.top_k=8", "rollout.max_new_tokens=8", "logging.progress_bar=false",
                      "trainer.nproc_per_node=1")  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "home")}
    env.pop("HF_HUB_CACHE", None)
    proc = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-6000:]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [0, 1, 2]
    assert all(math.isfinite(r["actor/kl_loss"]) for r in records)
    teacher_log = (out / "logs" / "teacher.log").read_text()
    assert str(hub / "models--acme--teacher" / "snapshots" / MAIN) in teacher_log + proc.stdout + proc.stderr


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
