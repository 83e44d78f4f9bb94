"""A non-finite loss or gradient norm skips the optimizer step (weights and optimizer state untouched,
``actor/skipped_steps`` = 1, the ranks agree through one all-reduce), and more than
``trainer.max_skipped_steps`` skipped steps in a row stop the run with one line."""

from __future__ import annotations

import math
import tempfile
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from gkd.config import ConfigError, load_config
from gkd.trainer.skips import SkipGuard, TooManySkippedSteps
from gkd.trainer.step import any_rank, build_optimizer, pack_micro_batches, train_step
from tests.test_trainer_step import _cfg, make_samples, teacher_outputs, tiny_llama
from tests.tiny_llama import one_intra_op_thread
from tests.transport.helpers import free_port

_one_thread = pytest.fixture(autouse=True, scope="module")(one_intra_op_thread)


def _setup():
    student = tiny_llama(0)
    samples = make_samples(7, 4)
    teacher = teacher_outputs(tiny_llama(1), samples)
    cfg = _cfg(lr=3e-3, warmup_steps=0, clip_grad=1.0)
    optimizer, sched = build_optimizer(student, cfg.optim, total_steps=8)
    return student, optimizer, sched, pack_micro_batches(samples, teacher, 30), cfg


def _weights(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def test_a_nan_gradient_skips_the_step_and_leaves_the_weights_unchanged():
    student, optimizer, sched, mbs, cfg = _setup()
    train_step(student, optimizer, sched, mbs, cfg)  # one good step: the optimizer has moments
    before, moments = _weights(student), {k: v["exp_avg"].clone() for k, v in optimizer.state.items()}
    lr_before = optimizer.param_groups[0]["lr"]
    param = student.model.layers[0].mlp.up_proj.weight
    hook = param.register_hook(lambda g: g * math.nan)  # one parameter's gradient turns NaN
    m = train_step(student, optimizer, sched, mbs, cfg)
    hook.remove()
    assert m["actor/skipped_steps"] == 1.0 and math.isnan(m["actor/grad_norm"])
    after = _weights(student)
    assert all(torch.equal(before[n], after[n]) for n in before), "a skipped step changed the weights"
    assert all(torch.equal(moments[k], v["exp_avg"]) for k, v in optimizer.state.items())
    assert all(p.grad is None for p in student.parameters())  # the NaN gradients are dropped
    assert sched.last_epoch == 2 and optimizer.param_groups[0]["lr"] == lr_before  # the schedule advances
    good = train_step(student, optimizer, sched, mbs, cfg)  # the next finite step trains again
    assert good["actor/skipped_steps"] == 0.0 and math.isfinite(good["actor/grad_norm"])
    assert not torch.equal(param, after["model.layers.0.mlp.up_proj.weight"])
    assert all(torch.isfinite(p).all() for p in student.parameters())


def test_more_than_max_skipped_steps_in_a_row_stops():
    guard = SkipGuard(2)
    for b, skipped in enumerate([1, 1, 0, 1, 1]):  # a good step ends the streak
        guard.after(b, {"actor/skipped_steps": float(skipped)})
    with pytest.raises(TooManySkippedSteps, match=r"3 optimizer steps in a row \(batches 3..5\).*_steps=2"):
        guard.after(5, {"actor/skipped_steps": 1.0})
    assert guard.total == 5
    with pytest.raises(TooManySkippedSteps, match="max_skipped_steps=0"):
        SkipGuard(0).after(0, {"actor/skipped_steps": 1.0})


def test_max_skipped_steps_is_checked_at_load():
    required = ["model.student_path=/m", "teacher.model_path=/t", "data.train_files=[x.parquet]"]
    with pytest.raises(ConfigError, match="trainer.max_skipped_steps=-1: must be >= 0"):
        load_config([], [*required, "trainer.max_skipped_steps=-1"])
    assert load_config([], required).trainer.max_skipped_steps == 3


def _agree_worker(rank: int, port: int, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        flags = [any_rank(rank == 1), any_rank(False), any_rank(rank == 0)]
        torch.save(torch.tensor(flags), f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_ranks_agree_on_a_skip_one_of_them_sees():
    with tempfile.TemporaryDirectory() as out, pytest.MonkeyPatch.context() as mpatch:
        mpatch.setenv("OMP_NUM_THREADS", "1")
        ctx = mp.spawn(_agree_worker, args=(free_port(), out), nprocs=2, join=False)
        deadline = time.monotonic() + 120
        while not ctx.join(timeout=1):
            if time.monotonic() > deadline:
                for p in ctx.processes:
                    p.kill()
                pytest.fail("the gloo ranks did not finish within 120 s")
        for r in range(2):
            assert torch.load(f"{out}/rank{r}.pt", weights_only=True).tolist() == [True, False, True]
