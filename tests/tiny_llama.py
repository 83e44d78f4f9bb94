"""Tiny Llama models built from a config for the engine tests (never downloaded), the one-thread fixture
body and the random token sequences those tests share. The benchmarks build their (larger) Llamas with
``tiny_config`` too.

head_dim = 64 / 2 = 32: the smallest vLLM's CPU attention accepts, so the vLLM tests use them too.
"""

from collections.abc import Iterator
from dataclasses import dataclass

import pytest
import torch


def tiny_config(
    vocab: int,
    max_len: int,
    *,
    hidden: int = 64,
    intermediate: int = 128,
    layers: int = 2,
    heads: int = 2,
    kv_heads: int = 1,
    tie: bool = False,
    **extra,
):
    """A Llama config (2 layers by default); the defaults are the engine tests' (head_dim 32); ``extra``
    goes to ``LlamaConfig`` as is."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=max_len,
        tie_word_embeddings=tie,
        **extra,
    )


def tiny_llama(seed: int, vocab: int, max_len: int, **config):
    """A ``LlamaForCausalLM`` in eval mode, random weights from ``seed`` (``config``: ``tiny_config``'s)."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(tiny_config(vocab, max_len, **config)).eval()


def save_tiny_llama(path, *, vocab: int, max_len: int, seed: int, head_scale: float) -> str:
    """Random weights from ``seed``; the lm_head is scaled by ``head_scale`` for peakier distributions
    (well-separated top-k ids, greedy decoding far from ties)."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_config(vocab, max_len))
    with torch.no_grad():
        model.lm_head.weight.mul_(head_scale)
    model.save_pretrained(path)
    return str(path)


def one_intra_op_thread():
    """Fixture body: tiny models gain nothing from intra-op threads, and on a busy 2-core machine an OpenMP
    team that waits for a descheduled thread makes each matmul ~50x slower. Restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@dataclass(frozen=True)
class SavedTinyLlama:
    """One saved tiny model of a test package: its sizes, its seed and lm_head scale (see save_tiny_llama)."""

    vocab: int
    max_len: int
    seed: int
    head_scale: float

    def save(self, path) -> str:
        return save_tiny_llama(
            path, vocab=self.vocab, max_len=self.max_len, seed=self.seed, head_scale=self.head_scale
        )

    def dir_fixture(self, name: str, folder: str):
        """A session fixture ``name``: the model saved once under a temporary ``folder``; returns its path."""

        def saved(tmp_path_factory) -> str:
            return self.save(tmp_path_factory.mktemp(folder))

        return pytest.fixture(scope="session", name=name)(saved)


def random_pairs(
    g: torch.Generator, n: int, vocab: int, max_prompt: int, max_response: int
) -> Iterator[tuple[list[int], list[int]]]:
    """``n`` (prompt ids, response ids) pairs of random lengths in [1, max] drawn from ``g``, lazily: a caller
    may draw more from ``g`` between two pairs."""
    for _ in range(n):
        plen = int(torch.randint(1, max_prompt + 1, (1,), generator=g))
        rlen = int(torch.randint(1, max_response + 1, (1,), generator=g))
        yield (
            torch.randint(0, vocab, (plen,), generator=g).tolist(),
            torch.randint(0, vocab, (rlen,), generator=g).tolist(),
        )
