"""A tiny Llama teacher built from a config and saved to a temporary folder (never downloaded).

head_dim = 64 / 2 = 32: the smallest vLLM's CPU attention accepts, so the vLLM tests use it too
(tests/tiny_llama.py builds it).
"""

import pytest
import torch

from tests.tiny_llama import SavedTinyLlama, one_intra_op_thread, random_pairs

TEACHER = SavedTinyLlama(vocab=300, max_len=256, seed=1234, head_scale=8.0)
VOCAB, MAX_LEN = TEACHER.vocab, TEACHER.max_len
save_tiny_model = TEACHER.save
tiny_model_dir = TEACHER.dir_fixture("tiny_model_dir", "tiny-teacher")


def random_sequences(n, seed=0, max_prompt=20, max_response=24):
    return list(random_pairs(torch.Generator().manual_seed(seed), n, VOCAB, max_prompt, max_response))


def assert_outputs_equal(got, want, atol=1e-5):
    assert len(got) == len(want)
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        assert g.topk_ids.dtype == torch.int32 and g.topk_ids.shape == w.topk_ids.shape, i
        assert torch.equal(g.topk_ids, w.topk_ids), f"sequence {i}: top-k ids differ"
        torch.testing.assert_close(g.topk_logprobs.float(), w.topk_logprobs.float(), atol=atol, rtol=0)
        torch.testing.assert_close(g.token_logprobs, w.token_logprobs, atol=atol, rtol=0)


_one_intra_op_thread = pytest.fixture(autouse=True)(one_intra_op_thread)
