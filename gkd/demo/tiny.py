"""Tiny random models for tests, ``configs/cpu_tiny.yaml`` and ``gkd demo --tiny``: a byte-level BPE tokenizer
trained on the spot (with a chat template), small Llama configs with random weights. Nothing is downloaded.
"""

from __future__ import annotations

from pathlib import Path

TEMPLATE = (
    "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<s>assistant:{% endif %}"
)


def tokenizer(vocab_size: int = 300):
    """A byte-level BPE (``vocab_size`` tokens, at least 259) trained on a synthetic corpus, with a chat
    template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = [f"user assistant: the quick brown fox {i} jumps over the lazy dog" for i in range(200)]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<s>", "</s>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(corpus, trainer)
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    hf.chat_template = TEMPLATE
    return hf


def tiny_llama(vocab: int, *, hidden: int, layers: int, seed: int, head_scale: float):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=256,  # the demo's prompts (max_prompt_length 128) plus their answers
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        model.lm_head.weight.mul_(head_scale)
    return model


def build(root: str | Path, *, num_prompts: int = 32) -> dict[str, str]:
    """Write ``root/student``, ``root/teacher``, ``root/prompts.parquet`` and ``root/val.parquet`` (8
    held-out prompts of the same kind, for validation); returns their paths."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    root = Path(root)
    tok = tokenizer()
    paths = {"student": root / "student", "teacher": root / "teacher", "prompts": root / "prompts.parquet"}
    paths["val"] = root / "val.parquet"
    student = tiny_llama(len(tok), hidden=32, layers=2, seed=1, head_scale=1.0)
    teacher = tiny_llama(len(tok), hidden=64, layers=2, seed=2, head_scale=4.0)  # sharper: a KL to learn
    for name, model in (("student", student), ("teacher", teacher)):
        model.save_pretrained(paths[name])
        tok.save_pretrained(paths[name])
    words = ["quick", "brown", "fox", "lazy", "dog", "jumps"]
    prompts = [f"the {words[i % 6]} {words[(i * 5) % 6]} {i}" for i in range(num_prompts + 8)]
    root.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"prompt": prompts[:num_prompts]}), paths["prompts"])
    pq.write_table(pa.table({"prompt": prompts[num_prompts:]}), paths["val"])
    return {k: str(v) for k, v in paths.items()}


def tiny_teacher(path: str | Path) -> Path:
    """A tiny random teacher (4 layers, sharpened head) with the tiny tokenizer, saved at ``path``; the
    demo's ``--tiny`` student is cut from it like the real one (a subset of its layers)."""
    path = Path(path)
    tok = tokenizer()
    model = tiny_llama(len(tok), hidden=64, layers=4, seed=2, head_scale=4.0)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path
