"""Limits that cross services: the trainer compares the config with what the workers report before step 0
(one line naming both sides, exit 2), the config alone where it decides them (at load), and the hf rollout
engine bounds a request's length like vLLM's ``max_model_len`` (an error reply; the worker keeps serving)."""

from __future__ import annotations

import pytest

from gkd.config import ConfigError, load_config
from gkd.config.limits import LimitError, service_limits
from gkd.rollout.hf_engine import HFRolloutEngine
from gkd.rollout.service import VersionedEngine, make_handler
from gkd.rollout.types import SamplingConfig
from gkd.rollout.wire import pack_request
from gkd.trainer.recipe import check_services
from tests.test_trainer import MODEL, FakeClient, _teacher, student_dir  # noqa: F401 - a fixture
from tests.tiny_llama import tiny_llama

REQUIRED = ["model.student_path=/m", "teacher.model_path=/t", "data.train_files=[x.parquet]"]


def _cfg(*overrides: str):
    return load_config([], [*REQUIRED, *overrides])


TEACHER = {"host": "n1", "pid": 7, "max_top_k": 8, "max_len": 512}
ROLLOUT = {"host": "n2", "pid": 9, "max_len": 512}


@pytest.mark.parametrize(
    "overrides, teacher, rollout, message",
    [
        (["teacher.top_k=16"], {}, {}, r"teacher.top_k=16 exceeds teacher worker n1 pid 7's max_top_k=8"),
        (
            ["teacher.top_k=8", "loss.support=union", "rollout.return_topk=8"],
            {},
            {},
            r"rollout.return_topk \+ 1 = 9 ids per position, above teacher worker n1 pid 7's max_top_k=8: "
            r"set rollout.return_topk <= 7",
        ),
        (
            ["teacher.top_k=8", "data.max_prompt_length=400", "rollout.max_new_tokens=200"],
            {"max_len": 4096},
            {},
            r"data.max_prompt_length=400 \+ rollout.max_new_tokens=200 exceed rollout worker n2 pid 9's "
            r"max_len=512 .*rollout.max_model_len",
        ),
        (
            ["teacher.top_k=8", "data.max_prompt_length=400", "rollout.max_new_tokens=100"],
            {"max_len": 480},
            {},
            r"exceed teacher worker n1 pid 7's max_len=480 .*teacher.max_model_len",
        ),
    ],
)
def test_a_limit_the_services_do_not_serve_is_one_line_naming_both(overrides, teacher, rollout, message):
    cfg = _cfg(*overrides)
    with pytest.raises(LimitError, match=message) as err:
        service_limits(cfg, [{**TEACHER, **teacher}], [{**ROLLOUT, **rollout}])
    assert err.value.exit_code == 2 and "\n" not in str(err.value)


def test_limits_within_what_the_services_serve_pass():
    cfg = _cfg("teacher.top_k=8", "loss.support=union", "rollout.return_topk=7", "data.max_prompt_length=256")
    service_limits(cfg, [TEACHER], [ROLLOUT])  # 7 + 1 ids, 256 + 256 tokens: exactly at the limits
    service_limits(cfg, [{"max_top_k": None}], [{}])  # workers that report no limit: nothing to check


def test_check_services_raises_the_limit_and_arms_the_value_checks(student_dir):  # noqa: F811
    cfg = load_config(
        [], [f"model.student_path={student_dir}", "data.train_files=[x.parquet]", "teacher.top_k=8"]
    )
    rollout = FakeClient([{"vocab_size": 303, "max_len": 1024}])
    with pytest.raises(LimitError, match="teacher.top_k=8 exceeds .*max_top_k=4"):
        check_services(cfg, _teacher(student_dir, max_top_k=4), rollout, MODEL, 1)
    teacher = _teacher(student_dir)
    check_services(cfg, teacher, rollout, MODEL, 1)
    assert teacher.vocab_size == rollout.vocab_size == 303  # replies' ids are checked against the student's


def test_the_trainer_exits_2_on_a_limit(monkeypatch):
    import gkd.trainer.recipe

    def fail(cfg):
        raise LimitError("teacher.top_k=16 exceeds teacher worker n1 pid 7's max_top_k=8")

    monkeypatch.setattr(gkd.trainer.recipe, "train", fail)
    monkeypatch.setattr(gkd.trainer.recipe, "load_config", lambda paths, overrides: None)
    monkeypatch.setattr(gkd.trainer.recipe, "exit_with_parent", lambda: None)
    assert gkd.trainer.recipe.main([]) == 2


@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            ["teacher.launch=true", "teacher.top_k=8", "loss.support=union", "rollout.return_topk=8"],
            r"return_topk \+ 1 = 9 ids per position, above the launched teacher's max_top_k=8",
        ),
        (
            [
                "rollout.launch=true",
                "rollout.backend=vllm",
                "rollout.n_gpus_per_node=1",
                "rollout.max_model_len=300",
                "data.max_prompt_length=200",
                "rollout.max_new_tokens=128",
            ],
            r"max_prompt_length=200 \+ rollout.max_new_tokens=128 exceed the launched rollout's max_len=300",
        ),
    ],
)
def test_limits_the_config_alone_decides_fail_at_load(overrides, message):
    with pytest.raises(ConfigError, match=message):
        _cfg(*overrides)
    _cfg("teacher.launch=true", "teacher.top_k=8", "loss.support=union", "rollout.return_topk=7")


def test_the_hf_rollout_engine_bounds_request_lengths_and_keeps_serving():
    engine = HFRolloutEngine(tiny_llama(0, 320, 256), max_len=40)
    assert engine.max_len == 40
    assert HFRolloutEngine(tiny_llama(0, 320, 32)).max_len == 32  # the model's own limit is the default
    with pytest.raises(ValueError, match="max_len"):
        HFRolloutEngine(tiny_llama(0, 320, 32), max_len=1)
    with pytest.raises(
        ValueError, match=r"31 \+ the longest prompt's 10 tokens exceed this engine's max_len of 40"
    ):
        engine.generate([list(range(10))], SamplingConfig(max_new_tokens=31, seed=1))
    handle = make_handler(VersionedEngine(engine, None))
    header, tensors = pack_request([list(range(10))], SamplingConfig(max_new_tokens=10**6, seed=1))
    with pytest.raises(ValueError, match="context of 40"):  # the worker turns it into an error reply
        handle(header, tensors)
    header, tensors = pack_request([list(range(10))], SamplingConfig(max_new_tokens=30, seed=1))
    _, reply = handle(header, tensors)  # the next request is served
    assert int(reply["response_lens"][0]) >= 1
