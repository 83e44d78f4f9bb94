"""Tiny Llama models built from a config for the engine tests (never downloaded), and the one-thread
fixture body those tests share.

head_dim = 64 / 2 = 32: the smallest vLLM's CPU attention accepts, so the vLLM tests use them too.
"""

import torch


def tiny_config(
    vocab: int,
    max_len: int,
    *,
    hidden: int = 64,
    intermediate: int = 128,
    heads: int = 2,
    kv_heads: int = 1,
    tie: bool = False,
):
    """A 2-layer Llama config; the defaults are the engine tests' (head_dim 32)."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=2,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=max_len,
        tie_word_embeddings=tie,
    )


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
