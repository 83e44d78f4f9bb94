"""Helpers the GPU proof run's steps share: ports, subprocesses, CUDA timing, a tiny random Qwen2 model,
random teacher batches and a background weight sender."""

from __future__ import annotations

import socket
import statistics
import subprocess
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]  # the repository


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _sh(cmd: list[str], *, log=None, timeout: float | None = None, env=None) -> int:
    print("$ " + " ".join(cmd), flush=True)
    return subprocess.run(
        cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT if log else None, timeout=timeout, env=env
    ).returncode


def _gbps(nbytes: int, seconds: float) -> float:
    return round(nbytes / seconds / 1e9, 2)


def _on_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


def _sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _cuda_time(fn, reps: int = 5) -> float:
    """Median seconds of ``fn()`` over ``reps`` runs after one warm-up, timed with CUDA events (a host
    clock on a machine without CUDA, where the steps run small as a smoke test of their code)."""
    import torch

    fn()
    times = []
    for _ in range(reps):
        if not torch.cuda.is_available():
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
            continue
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


def _tiny_qwen(vocab: int, hidden: int, layers: int, intermediate: int, heads: int, kv_heads: int):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=4096,
        tie_word_embeddings=True,
    )
    return Qwen2ForCausalLM(cfg)


def random_batch(vocab: int, k: int, seed: int, rows: int = 16) -> tuple[list, list]:
    """``rows`` random samples (24 prompt + 96 response tokens) and teacher top-``k`` outputs for them."""
    import torch

    from gkd.rollout.types import Sample
    from gkd.teacher.types import TeacherOutput

    g = torch.Generator().manual_seed(seed)
    samples, teachers = [], []
    for _ in range(rows):
        prompt = torch.randint(3, vocab, (24,), generator=g).tolist()
        resp = torch.randint(3, vocab, (96,), generator=g).tolist()
        samples.append(Sample(prompt, resp, torch.full((96,), -8.0), "length", 0))
        ids = torch.stack([torch.randperm(vocab, generator=g)[:k] for _ in range(96)]).int()
        lp = torch.log_softmax(torch.randn(96, k, generator=g) * 2, -1) - 0.05
        teachers.append(TeacherOutput(ids, lp.sort(-1, descending=True).values, lp[:, 0]))
    return samples, teachers


def start_sender(tx, source, dtype) -> tuple[threading.Thread, list[BaseException]]:
    """Version 1 of ``source`` sent on the weight group ``tx`` (16 MiB buckets of ``dtype``) from a started
    thread; returns it and the list its error lands in (for the receiving side to raise)."""
    from gkd.weights.transfer import WeightSender

    errors: list[BaseException] = []

    def send():
        try:
            sender = WeightSender(tx, source, dtype=dtype, bucket_bytes=16 << 20)
            sender.handshake()
            sender.sync(1)
            sender.close()
        except BaseException as e:  # reported by the receiving side
            errors.append(e)

    thread = threading.Thread(target=send, daemon=True)
    thread.start()
    return thread, errors
