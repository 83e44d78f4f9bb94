"""A tiny Llama teacher built from a config and saved to a temporary folder (never downloaded).

head_dim = 64 / 2 = 32: the smallest vLLM's CPU attention accepts, so the vLLM tests use it too
(tests/tiny_llama.py builds it).
"""

import pytest
import torch

from tests.tiny_llama import one_intra_op_thread, save_tiny_llama
from tests.tiny_llama import tiny_config as _tiny_config

VOCAB = 300
MAX_LEN = 256


def tiny_config():
    return _tiny_config(VOCAB, MAX_LEN)


def save_tiny_model(path) -> str:
    return save_tiny_llama(path, vocab=VOCAB, max_len=MAX_LEN, seed=1234, head_scale=8.0)


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


_one_intra_op_thread = pytest.fixture(autouse=True)(one_intra_op_thread)
