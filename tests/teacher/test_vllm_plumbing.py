"""The vLLM teacher engine's settings from the config, on CPU with a stand-in ``vllm`` module
(tests/fake_vllm.py; the real engine runs in tests/teacher/test_vllm_engine.py, vLLM CI stage)."""

from gkd.cli import _engine_spec, build_parser
from gkd.config import load_config
from gkd.launch import teacher_command
from tests import fake_vllm


def test_config_knobs_reach_vllm_through_the_launcher_and_the_cli(monkeypatch, tiny_model_dir):
    fake = fake_vllm.install(monkeypatch)
    overrides = ["model.student_path=S", "data.train_files=[p]", f"teacher.model_path={tiny_model_dir}"]
    cfg = load_config(["configs/gpu_example.yaml"], [*overrides, "teacher.enforce_eager=true"])
    args = build_parser().parse_args(teacher_command(cfg, ["6", "7"])[3:])  # after `python -m gkd.cli`
    engine = _engine_spec(args).build()
    kwargs = fake.created[-1].kwargs
    assert kwargs["dtype"] == "bfloat16"  # teacher.dtype auto on GPUs, not float32
    assert kwargs["gpu_memory_utilization"] == 0.8 and kwargs["max_num_batched_tokens"] == 8192
    assert kwargs["tensor_parallel_size"] == 1 and kwargs["enforce_eager"] is True
    assert kwargs["max_logprobs"] == 128  # 2 x teacher.top_k: room for top-(K + M) with requested ids
    # prompt + response tokens, plus the one token vLLM must generate
    assert kwargs["max_model_len"] == 2048 + 1 and engine.max_len == 2048


def test_standalone_serve_defaults_leave_prompt_logprob_headroom(monkeypatch, tiny_model_dir):
    fake = fake_vllm.install(monkeypatch)
    args = build_parser().parse_args(["teacher", "serve", "--model", tiny_model_dir, "--backend", "vllm"])
    _engine_spec(args).build()
    assert fake.created[-1].kwargs["gpu_memory_utilization"] == 0.8
    assert "max_model_len" not in fake.created[-1].kwargs  # vLLM's default: the model's
