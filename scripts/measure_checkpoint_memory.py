"""Host memory of an FSDP2 student on 4 CPU gloo ranks, before and after sharded checkpoints and the
meta-device load (one fresh set of processes per measurement, so freed-but-kept heap does not carry over):

- ``load``: the sum over ranks of each rank's peak RSS above its RSS before the student is built, for the
  full load on every rank (``from_pretrained`` then ``shard_fsdp2``) and for the meta-device load
  (``_load_student(sharded=True)`` + ``materialize_student``);
- ``save``: rank 0's peak RSS above its RSS before the save, while saving model + AdamW state in the
  background and waiting for the write: full state dicts gathered to rank 0 (gkd's format 1) against
  every rank writing its DCP shards.

    OMP_NUM_THREADS=1 python scripts/measure_checkpoint_memory.py [--hidden 1024 --layers 12 --vocab 8000]

RSS is sampled every 2 ms by a thread of each rank (psutil); one fp32 copy of the model is printed next to
the figures.
"""

from __future__ import annotations

import argparse
import faulthandler
import json
import os
import signal
import tempfile
import threading
import time
from datetime import timedelta

import psutil
import torch
import torch.distributed as dist
import torch.multiprocessing as mp


class PeakRSS:
    """The largest RSS of this process seen between ``start`` and ``stop`` (sampled on a thread)."""

    def __init__(self) -> None:
        self.proc, self.peak, self.base = psutil.Process(), 0, 0
        self._stop = threading.Event()

    def start(self) -> PeakRSS:
        self.base = self.peak = self.proc.memory_info().rss
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(0.002)

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.proc.memory_info().rss)
        return self.peak - self.base


def _cfg(student: str, out: str):
    from gkd.config import Config

    cfg = Config()
    cfg.model.student_path, cfg.trainer.strategy, cfg.trainer.output_dir = student, "fsdp2", out
    return cfg


def _student(cfg, meta: bool):
    from gkd.trainer.setup import _load_student, materialize_student, shard_fsdp2

    cpu = torch.device("cpu")
    model = _load_student(cfg, cpu, sharded=meta)[0]
    model = shard_fsdp2(model, cpu)
    materialize_student(model, cfg, cpu)
    return model


def _optimizer(model):
    """AdamW with its state allocated (one step of zero gradients at lr 0)."""
    opt = torch.optim.AdamW(model.parameters(), lr=0.0)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return opt


def _save(cfg, model, opt, sharded: bool) -> None:
    from gkd.trainer.checkpoint import full_state_dicts, gather_rng_states
    from gkd.trainer.checkpoint.writer import CheckpointWriter

    writer = CheckpointWriter(background=True)
    if sharded:
        rngs = gather_rng_states()  # a collective
        small = dict(rng_states=rngs, config_yaml="") if dist.get_rank() == 0 else None
        writer.save_sharded(cfg.trainer.output_dir, 1, model=model, optimizer=opt, rank0=small)
    else:  # format 1: gathered on rank 0, copied to host memory and written there
        weights, optim = full_state_dicts(model, opt)
        if dist.get_rank() == 0:
            writer.save(cfg.trainer.output_dir, 1, model=model, model_state=weights, optimizer_state=optim)
        del weights, optim
    writer.close()


def _warm_up(student: str) -> None:
    """What every measured path imports or builds once whatever the model size (modules, tokenizer, a
    meta-device model, FSDP2), so the figures are the model's memory."""
    import torch.distributed.checkpoint  # noqa: F401
    from torch.distributed.checkpoint import state_dict  # noqa: F401
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    AutoTokenizer.from_pretrained(student)
    with torch.device("meta"):
        AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(student))


def _rank(rank: int, port: int, what: str, student: str, out: str, result: str) -> None:
    faulthandler.register(signal.SIGUSR1)  # kill -USR1 PID: every thread's stack on stderr
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=4,
                            timeout=timedelta(minutes=10))  # fmt: skip
    cfg = _cfg(student, out)
    _warm_up(student)
    try:
        if what.startswith("load"):
            peak = PeakRSS().start()
            _student(cfg, meta=what == "load_meta")
            delta = peak.stop()
        else:
            model = _student(cfg, meta=True)
            opt = _optimizer(model)
            dist.barrier()
            peak = PeakRSS().start()
            _save(cfg, model, opt, sharded=what == "save_dcp")
            delta = peak.stop()
        deltas = [torch.zeros(1, dtype=torch.int64) for _ in range(4)]
        dist.all_gather(deltas, torch.tensor([delta]))
        if rank == 0:
            with open(result, "w") as f:
                json.dump([int(d) for d in deltas], f)
    finally:
        dist.destroy_process_group()


def main() -> None:
    from tests.tiny_llama import tiny_config

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--vocab", type=int, default=8000)
    args = p.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    from tokenizers import Tokenizer, models
    from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

    with tempfile.TemporaryDirectory() as tmp:
        student = f"{tmp}/student"
        config = tiny_config(args.vocab, 512, hidden=args.hidden, intermediate=args.hidden * 11 // 4,
                             layers=args.layers, heads=8, kv_heads=8)  # fmt: skip
        model = LlamaForCausalLM(config)
        fp32 = sum(t.numel() for t in model.state_dict().values()) * 4
        model.save_pretrained(student)
        del model
        words = Tokenizer(models.WordLevel({"a": 0}, unk_token="a"))
        PreTrainedTokenizerFast(tokenizer_object=words, unk_token="a").save_pretrained(student)
        print(f"student: {fp32 / 2**20:.0f} MiB in fp32; 4 gloo ranks")
        for what in ("load_full", "load_meta", "save_full_state_dicts", "save_dcp"):
            from tests.transport.helpers import free_port

            result = f"{tmp}/{what}.json"
            mp.spawn(_rank, args=(free_port(), what, student, f"{tmp}/out-{what}", result), nprocs=4)
            with open(result) as f:
                deltas = json.load(f)
            if what.startswith("load"):
                total, ranks = sum(deltas), [d >> 20 for d in deltas]
                print(f"{what:24s} sum over ranks of peak RSS growth {total / 2**20:7.0f} MiB "
                      f"= {total / fp32:.2f} x one fp32 copy (per rank, MiB: {ranks})")  # fmt: skip
            else:
                print(f"{what:24s} rank 0 peak RSS growth {deltas[0] / 2**20:7.0f} MiB "
                      f"= {deltas[0] / fp32:.2f} x one fp32 copy of the model")  # fmt: skip


if __name__ == "__main__":
    main()
