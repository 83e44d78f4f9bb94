"""A tiny Llama teacher built from a config and saved to a temporary folder (never downloaded).

head_dim = 64 / 2 = 32: the smallest vLLM's CPU attention accepts, so the vLLM tests use it too.
"""

import pytest
import torch

VOCAB = 300
MAX_LEN = 256


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


def save_tiny_model(path) -> str:
    from transformers import LlamaForCausalLM

    torch.manual_seed(1234)
    model = LlamaForCausalLM(tiny_config())
    with torch.no_grad():  # sharper distributions than the default init: top-k ids are then well separated
        model.lm_head.weight.mul_(8.0)
    model.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("tiny-teacher"))


def random_sequences(n, seed=0, max_prompt=20, max_response=24):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        plen = int(torch.randint(1, max_prompt + 1, (1,), generator=g))
        rlen = int(torch.randint(1, max_response + 1, (1,), generator=g))
        out.append(
            (
                torch.randint(0, VOCAB, (plen,), generator=g).tolist(),
                torch.randint(0, VOCAB, (rlen,), generator=g).tolist(),
            )
        )
    return out


def assert_outputs_equal(got, want, atol=1e-5):
    assert len(got) == len(want)
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        assert g.topk_ids.dtype == torch.int32 and g.topk_ids.shape == w.topk_ids.shape, i
        assert torch.equal(g.topk_ids, w.topk_ids), f"sequence {i}: top-k ids differ"
        torch.testing.assert_close(g.topk_logprobs.float(), w.topk_logprobs.float(), atol=atol, rtol=0)
        torch.testing.assert_close(g.token_logprobs, w.token_logprobs, atol=atol, rtol=0)


@pytest.fixture(autouse=True)
def _one_intra_op_thread():
    """Tiny models gain nothing from intra-op threads, and on a busy 2-core machine an OpenMP team that
    waits for a descheduled thread makes each matmul ~50x slower. Restored after each test."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
