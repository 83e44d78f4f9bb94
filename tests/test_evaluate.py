"""``gkd eval``: the answer statistics, and the command on the tiny models (JSON structure, KL >= 0, the KL
of a model with itself is 0, a gkd checkpoint folder gives the figures of the model it holds)."""

import json

import pytest
import torch

from gkd.cli import main
from gkd.evaluate import answer_stats, loops


def test_repetition_detects_a_constructed_loop():
    looping = [5, 6, 7, 8, 9, 5, 6, 7, 8, 1]  # the 4-gram 5 6 7 8 comes back
    fresh = list(range(20))
    assert loops(looping) and not loops(fresh) and not loops([1, 2, 3, 1, 2, 3])  # 3-grams do not count
    assert loops([4] * 5)
    st = answer_stats([looping, fresh, [1, 1]])
    assert st["looping"] == 1 and st["repetition"] == pytest.approx(1 / 3)
    assert st["mean_length"] == pytest.approx(32 / 3)
    # 29 bigrams; distinct: 6 of the loop's 9, 15 of fresh's 19 (5-6 ... 8-9 were seen), and (1, 1)
    assert st["distinct_2"] == pytest.approx((6 + 15 + 1) / 29)
    assert answer_stats([[3] * 10])["distinct_2"] == pytest.approx(1 / 9)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from gkd.demo.tiny import build

    return build(tmp_path_factory.mktemp("tiny"), num_prompts=8)


def _eval(capsys, *argv):
    status = main(["eval", *argv])
    out = capsys.readouterr()
    return status, out.out, out.err


def test_gkd_eval_reports_the_figures_in_json(tiny, tmp_path, capsys):
    out = tmp_path / "report.json"
    common = ("--data", tiny["val"], "--n", "6", "--max-new-tokens", "8")
    status, text, _ = _eval(
        capsys, tiny["student"], "--teacher", tiny["teacher"], *common, "--json", str(out)
    )
    assert status == 0 and "KL(teacher || student)" in text and "looping" in text
    r = json.loads(out.read_text())
    assert r["prompts"] == 6 and len(r["samples"]) == 5
    for kind in ("on_policy", "off_policy"):
        assert r[kind]["kl"] > 0.01 and r[kind]["reverse_kl"] > 0.01 and r[kind]["tokens"] > 0
    assert r["teacher_logprob_of_greedy"] < 0
    assert 0 <= r["repetition"] <= 1 and 0 < r["distinct_2"] <= 1 and 1 <= r["mean_length"] <= 8
    assert {"prompt", "student", "teacher"} <= set(r["samples"][0])

    self_out = tmp_path / "self.json"
    status, _, _ = _eval(
        capsys, tiny["teacher"], "--teacher", tiny["teacher"], *common, "--json", str(self_out)
    )
    me = json.loads(self_out.read_text())
    assert status == 0
    for kind in ("on_policy", "off_policy"):
        assert abs(me[kind]["kl"]) < 1e-5 and abs(me[kind]["reverse_kl"]) < 1e-5


def test_gkd_eval_reads_a_gkd_checkpoint(tiny, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    from gkd.trainer.checkpoint import save_checkpoint

    model = AutoModelForCausalLM.from_pretrained(tiny["student"], dtype=torch.float32)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))  # not the student_path's weights
    trained = tmp_path / "trained"
    model.save_pretrained(trained)
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(tiny["student"]).save_pretrained(trained)
    ck = save_checkpoint(
        tmp_path / "run", 3, model=model, config_yaml=f"model:\n  student_path: {tiny['student']}\n"
    )
    common = ("--teacher", tiny["teacher"], "--data", tiny["val"], "--n", "4", "--max-new-tokens", "6")
    _eval(capsys, str(ck), *common, "--json", str(tmp_path / "ck.json"))
    _eval(capsys, str(trained), *common, "--json", str(tmp_path / "hf.json"))
    _eval(capsys, tiny["student"], *common, "--json", str(tmp_path / "base.json"))
    ck_r, hf_r, base = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("ck", "hf", "base"))
    assert ck_r["off_policy"]["kl"] == pytest.approx(hf_r["off_policy"]["kl"], abs=1e-6)
    assert ck_r["off_policy"]["kl"] != pytest.approx(base["off_policy"]["kl"], abs=1e-4)


def test_bad_inputs_are_one_line(tiny, tmp_path, capsys):
    status, _, err = _eval(capsys, str(tmp_path / "nope"))
    assert status == 2 and "not a Hugging Face model folder" in err and len(err.strip().splitlines()) == 1
    status, _, err = _eval(capsys, tiny["student"], "--data", str(tmp_path / "none.parquet"))
    assert status == 2 and "--data" in err and "no such file" in err
    status, _, err = _eval(capsys, tiny["student"], "--data", tiny["val"], "--prompt-key", "question")
    assert status == 2 and "no column 'question'" in err
    status, _, err = _eval(capsys, tiny["student"], "--n", "0")
    assert status == 2 and "--n" in err
