"""A tiny Llama student built from a config and saved to a temporary folder (never downloaded)."""

import pytest
import torch

VOCAB = 320
MAX_LEN = 128


def tiny_config():
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=MAX_LEN,
        tie_word_embeddings=False,
    )


def save_tiny_student(path) -> str:
    from transformers import LlamaForCausalLM

    torch.manual_seed(4321)
    model = LlamaForCausalLM(tiny_config())
    with torch.no_grad():  # peakier distributions: greedy decoding is then far from ties
        model.lm_head.weight.mul_(4.0)
    model.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def student_dir(tmp_path_factory):
    return save_tiny_student(tmp_path_factory.mktemp("tiny-student"))


def random_prompts(n, seed=0, max_len=12):
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(1, max_len + 1, (n,), generator=g).tolist()
    return [torch.randint(0, VOCAB, (k,), generator=g).tolist() for k in lens]


def assert_samples_equal(got, want, atol=1e-5):
    assert len(got) == len(want)
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        assert g.prompt_ids == w.prompt_ids, i
        assert g.response_ids == w.response_ids, f"prompt {i}: responses differ"
        assert g.finish_reason == w.finish_reason and g.policy_version == w.policy_version, i
        assert g.response_logprobs.dtype == torch.float32
        torch.testing.assert_close(g.response_logprobs, w.response_logprobs, atol=atol, rtol=0)


@pytest.fixture(autouse=True)
def _one_intra_op_thread():
    """Tiny models gain nothing from intra-op threads (and a shared 2-core machine punishes them)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
