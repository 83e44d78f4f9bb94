"""A tiny Llama student built from a config and saved to a temporary folder (never downloaded)."""

import pytest
import torch

from tests.tiny_llama import SavedTinyLlama, one_intra_op_thread

STUDENT = SavedTinyLlama(vocab=320, max_len=128, seed=4321, head_scale=4.0)
VOCAB, MAX_LEN = STUDENT.vocab, STUDENT.max_len
student_dir = STUDENT.dir_fixture("student_dir", "tiny-student")


def random_prompts(n, seed=0, max_len=12):
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(1, max_len + 1, (n,), generator=g).tolist()
    return [torch.randint(0, VOCAB, (k,), generator=g).tolist() for k in lens]


def response_logits(model, sample):
    """float32 logits ``[R, V]`` of a transformers forward pass over prompt + response, at the positions
    that predict the sample's response tokens."""
    full = torch.tensor([sample.prompt_ids + sample.response_ids])
    with torch.no_grad():
        return model(full).logits[0, len(sample.prompt_ids) - 1 : -1].float()


def assert_samples_equal(got, want, atol=1e-5):
    assert len(got) == len(want)
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        assert g.prompt_ids == w.prompt_ids, i
        assert g.response_ids == w.response_ids, f"prompt {i}: responses differ"
        assert g.finish_reason == w.finish_reason and g.policy_version == w.policy_version, i
        assert g.response_logprobs.dtype == torch.float32
        torch.testing.assert_close(g.response_logprobs, w.response_logprobs, atol=atol, rtol=0)


_one_intra_op_thread = pytest.fixture(autouse=True)(one_intra_op_thread)
