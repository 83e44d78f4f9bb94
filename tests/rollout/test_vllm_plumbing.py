"""The vLLM rollout engine's settings and weight-update steps, on CPU with a stand-in ``vllm`` module
(tests/fake_vllm.py; the real engine runs in tests/rollout/test_vllm_engine.py, vLLM CI stage)."""

import pytest
import torch

from gkd.cli import build_parser
from gkd.config import load_config
from gkd.launch.run import rollout_command
from gkd.rollout.service import _spec
from gkd.rollout.types import SamplingConfig
from tests import fake_vllm


@pytest.fixture
def fake(monkeypatch):
    return fake_vllm.install(monkeypatch)


def _engine(student_dir):
    from gkd.rollout.vllm_engine import VLLMRolloutEngine

    return VLLMRolloutEngine(student_dir)


def _full_state(engine):
    return [(name, torch.zeros(p.shape, dtype=p.dtype)) for name, p in engine.parameters_spec().items()]


def test_config_knobs_reach_vllm_through_the_launcher_and_the_cli(fake, student_dir):
    overrides = [f"model.student_path={student_dir}", "data.train_files=[p]", "teacher.model_path=T"]
    overrides += ["rollout.max_num_batched_tokens=4096", "rollout.enforce_eager=true"]
    cfg = load_config(["configs/gpu_example.yaml"], overrides)
    args = build_parser().parse_args(rollout_command(cfg, ["4", "5"])[3:])  # after `python -m gkd.cli`
    _spec(args).build()
    kwargs = fake.created[-1].kwargs
    assert {k: kwargs.get(k) for k in ("dtype", "tensor_parallel_size", "gpu_memory_utilization")} == {
        "dtype": "bfloat16",  # rollout.dtype: the dtype the trainer's weights arrive in
        "tensor_parallel_size": 1,
        "gpu_memory_utilization": 0.85,
    }
    assert kwargs["max_model_len"] == 2048  # data.max_prompt_length + data.max_response_length
    assert kwargs["max_num_batched_tokens"] == 4096 and kwargs["enforce_eager"] is True


def test_in_place_update_waits_for_the_copies_then_resets_the_prefix_cache(fake, student_dir):
    engine = _engine(student_dir)
    llm = fake.created[-1]
    state = _full_state(engine)
    assert engine.load_weights(state, version=3) == len(state)
    assert llm.events == [("load", len(state)), ("sync", "cuda:0"), "reset"]  # in this order
    assert engine.policy_version == 3


def test_no_device_sync_for_parameters_on_the_host(fake, student_dir, monkeypatch):
    monkeypatch.setattr(fake, "device", torch.device("cpu"))
    engine = _engine(student_dir)
    engine.load_weights(_full_state(engine), version=1)
    assert [e for e in fake.created[-1].events if e[0] == "sync"] == []


def test_a_refused_prefix_cache_reset_fails_loudly_and_stops_serving(fake, student_dir):
    engine = _engine(student_dir)
    fake.created[-1].reset_ok = False
    with pytest.raises(
        RuntimeError, match="vLLM refused to reset its prefix cache after loading policy version 2"
    ):
        engine.load_weights(_full_state(engine), version=2)
    assert engine.policy_version == 0  # the new version was not announced
    with pytest.raises(RuntimeError, match="no longer serves"):
        engine.generate([[1, 2, 3]], SamplingConfig(max_new_tokens=2, temperature=0))
