"""The vLLM teacher engine's settings from the config, on CPU with a stand-in ``vllm`` module
(tests/fake_vllm.py; the real engine runs in tests/teacher/test_vllm_engine.py, vLLM CI stage)."""

from gkd.cli import _engine_spec, build_parser
from gkd.config import load_config
from gkd.launch.run import teacher_command
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


def test_generate_request_and_reply_shaping(monkeypatch, tiny_model_dir):
    """The vLLM teacher's generate: one SamplingParams per prompt (seeds by index, logprobs=top_k, the draw's
    temperature over the scoring one), and each answer's per-position dicts -> the score rows."""
    from types import SimpleNamespace

    import torch

    from gkd.teacher.types import GenerateSettings
    from gkd.teacher.vllm_engine import VLLMTeacherEngine

    fake_vllm.install(monkeypatch)
    engine = VLLMTeacherEngine(tiny_model_dir, max_top_k=8)
    seen = {}

    def entry(actual, top):  # {id: Logprob}: the top-k with ranks 1..k, and the sampled token
        d = {t: SimpleNamespace(logprob=-0.5 * (r + 1), rank=r + 1) for r, t in enumerate(top)}
        d.setdefault(actual, SimpleNamespace(logprob=-9.0, rank=50))
        return d

    def generate(requests, params, use_tqdm=False):
        seen["requests"], seen["params"] = requests, params
        answers = [([7, 3], "stop"), ([4, 4, 4], "length")]
        return [
            SimpleNamespace(
                outputs=[
                    SimpleNamespace(
                        token_ids=ids, finish_reason=why, logprobs=[entry(t, [4, 7]) for t in ids]
                    )
                ]
            )
            for ids, why in answers
        ]

    engine._pump.close()  # the requests go to this stand-in instead of vLLM's engine
    engine._pump = SimpleNamespace(run=lambda requests, params, **how: generate(requests, params))
    settings = GenerateSettings(max_new_tokens=3, temperature=1.0, top_p=0.9, seed=5, stop_token_ids=(3,))
    out = engine.generate([[1, 2], [9]], settings, top_k=2, temperature=1.0)
    assert [r["prompt_token_ids"] for r in seen["requests"]] == [[1, 2], [9]]
    assert [p["seed"] for p in seen["params"]] == [5, 6]
    p = seen["params"][0]
    assert p["logprobs"] == 2 and p["max_tokens"] == 3 and p["top_p"] == 0.9 and p["stop_token_ids"] == [3]
    assert [a.response_ids for a in out] == [[7, 3], [4, 4, 4]]
    assert [a.finish_reason for a in out] == ["stop", "length"]
    assert torch.equal(out[0].output.topk_ids, torch.tensor([[4, 7], [4, 7]], dtype=torch.int32))
    assert torch.allclose(out[0].output.token_logprobs, torch.tensor([-1.0, -9.0]))
    assert torch.allclose(out[1].output.topk_logprobs, torch.tensor([[-0.5, -1.0]] * 3))
