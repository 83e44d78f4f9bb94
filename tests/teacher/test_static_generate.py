"""The teacher's ``generate`` through the static-cache decode steps (gkd/rollout/static_decode.py; eager on
CPU, one CUDA graph replay per token on a GPU): the answers and their top-k rows of the transformers path."""

import pytest
import torch

from gkd.teacher.hf_engine import HFTeacherEngine
from gkd.teacher.types import GenerateSettings
from tests.teacher.conftest import VOCAB, assert_outputs_equal


def _prompts(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [
        torch.randint(1, VOCAB, (int(torch.randint(1, 12, (1,), generator=g)),), generator=g).tolist()
        for _ in range(n)
    ]


@pytest.mark.parametrize("temperature,stops", [(0.0, ()), (1.0, (5, 17))])
def test_static_generate_gives_the_transformers_path_s_answers(tiny_model_dir, temperature, stops):
    static = HFTeacherEngine.from_pretrained(tiny_model_dir, max_top_k=16, static_cache=True)
    plain = HFTeacherEngine.from_pretrained(tiny_model_dir, max_top_k=16, static_cache=False)
    assert static.static_steps is not None and plain.static_steps is None
    prompts = _prompts(6, seed=2)
    settings = GenerateSettings(max_new_tokens=9, temperature=temperature, seed=7, stop_token_ids=stops)
    got = static.generate(prompts, settings, top_k=8)
    want = plain.generate(prompts, settings, top_k=8)
    assert [a.response_ids for a in got] == [a.response_ids for a in want]
    assert [a.finish_reason for a in got] == [a.finish_reason for a in want]
    assert_outputs_equal([a.output for a in got], [a.output for a in want], atol=2e-5)
    assert len(static.static_steps) >= 1  # the static steps did decode


def test_static_cache_is_refused_for_a_model_without_llama_layers():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=32, n_layer=1, n_head=2, n_positions=64))
    with pytest.raises(ValueError, match="static_cache=True: this model cannot use the static decode steps"):
        HFTeacherEngine(model, static_cache=True)
    assert HFTeacherEngine(model).static_steps is None
