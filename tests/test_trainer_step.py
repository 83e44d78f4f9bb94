"""Trainer building blocks: token-budget micro-batches, the fused loss against a full-logits reference,
global token normalisation (micro-batch splits and 2 gloo ranks), and a few real optimizer steps."""

from __future__ import annotations

import math
import socket
import tempfile
import warnings
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
from transformers import LlamaForCausalLM

from gkd.config import LossConfig, OptimConfig
from gkd.kernels.reference import topk_distill_loss_reference
from gkd.kernels.sampled import sampled_reverse_kl_loss
from gkd.rollout.types import Sample
from gkd.teacher.types import TeacherOutput
from gkd.trainer.checkpoint import gather_rng_states
from gkd.trainer.step import (
    accumulate_gradients,
    build_optimizer,
    loss_on_micro_batch,
    lr_factor,
    pack_micro_batches,
    train_step,
)
from tests.ranks import run_ranks
from tests.tiny_llama import one_intra_op_thread, random_pairs, tiny_config

V, K = 67, 6


_one_thread = pytest.fixture(autouse=True, scope="module")(one_intra_op_thread)


def tiny_llama(seed: int, dtype=torch.float32, tie: bool = False) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = tiny_config(V, 64, hidden=32, intermediate=48, heads=4, kv_heads=2, tie=tie)
    return LlamaForCausalLM(cfg).to(dtype)


def make_samples(seed: int, n: int, *, max_prompt: int = 6, max_response: int = 8) -> list[Sample]:
    g = torch.Generator().manual_seed(seed)
    return [
        Sample(
            prompt_ids=prompt,
            response_ids=response,
            response_logprobs=-torch.rand(len(response), generator=g) * 3 - 0.5,  # drawn before the next pair
            finish_reason="length",
            policy_version=i,
        )
        for i, (prompt, response) in enumerate(random_pairs(g, n, V, max_prompt, max_response))
    ]


@torch.no_grad()
def teacher_outputs(teacher: LlamaForCausalLM, samples: list[Sample], k: int = K) -> list[TeacherOutput]:
    """The teacher's top-k at each response position, as the teacher service returns it."""
    outs = []
    for s in samples:
        ids = torch.tensor([s.prompt_ids + s.response_ids])
        logp = torch.log_softmax(teacher(input_ids=ids).logits[0].float(), dim=-1)
        p, r = len(s.prompt_ids), len(s.response_ids)
        rows = logp[p - 1 : p - 1 + r]  # [R, V]
        lp, top = rows.topk(k, dim=-1)
        tok = rows.gather(1, torch.tensor(s.response_ids)[:, None])[:, 0]
        outs.append(TeacherOutput(topk_ids=top.to(torch.int32), topk_logprobs=lp.half(), token_logprobs=tok))
    return outs


def grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


# --------------------------------------------------------------------------------------- micro-batches


@pytest.mark.parametrize("budget", [13, 20, 47, 10_000])
def test_pack_respects_budget_and_covers_every_response_token_once(budget):
    samples = make_samples(1, 11)
    samples[3].response_ids, samples[3].response_logprobs = [], torch.zeros(0)  # skipped: no loss term
    teacher = [
        TeacherOutput(
            topk_ids=torch.randint(0, V, (len(s.response_ids), K), dtype=torch.int32),
            topk_logprobs=-torch.rand(len(s.response_ids), K),
            token_logprobs=-torch.rand(len(s.response_ids)),
        )
        for s in samples
    ]
    mbs = pack_micro_batches(samples, teacher, budget)
    seen = set()
    for mb in mbs:
        assert mb.padded_tokens <= budget
        assert mb.input_ids.shape == mb.attention_mask.shape
        for n in range(mb.num_tokens):
            b, c = int(mb.rows[n]), int(mb.cols[n])
            i = mb.sample_index[b]
            s, t = samples[i], teacher[i]
            j = c - (len(s.prompt_ids) - 1)
            assert (i, j) not in seen
            seen.add((i, j))
            context = s.prompt_ids + s.response_ids
            assert int(mb.input_ids[b, c]) == context[c]  # the position sees the token before target j
            assert mb.attention_mask[b, : c + 1].all()
            assert int(mb.target_ids[n]) == s.response_ids[j]
            assert torch.equal(mb.teacher_ids[n], t.topk_ids[j])
            assert torch.equal(mb.teacher_logprobs[n], t.topk_logprobs[j])
            assert float(mb.teacher_token_logprobs[n]) == float(t.token_logprobs[j])
            assert float(mb.rollout_logprobs[n]) == float(s.response_logprobs[j])
        for b, i in enumerate(mb.sample_index):  # padding is masked
            n_real = len(samples[i].prompt_ids) + len(samples[i].response_ids) - 1
            assert int(mb.attention_mask[b].sum()) == n_real
    assert seen == {(i, j) for i, s in enumerate(samples) for j in range(len(s.response_ids))}
    if budget == 10_000:
        assert len(mbs) == 1


def test_pack_errors_name_the_problem():
    samples = make_samples(2, 3)
    teacher = teacher_outputs(tiny_llama(1), samples)
    with pytest.raises(ValueError, match="micro_batch_tokens"):
        pack_micro_batches(samples, teacher, 3)
    teacher[1] = TeacherOutput(
        teacher[1].topk_ids[:-1], teacher[1].topk_logprobs[:-1], teacher[1].token_logprobs
    )
    with pytest.raises(ValueError, match="sample 1"):
        pack_micro_batches(samples, teacher, 100)


# ---------------------------------------------------------------------------------------------- loss


CASES = [
    ("forward_kl", "bucket", False),
    ("reverse_kl", "renorm", True),
    ("jsd", "bucket", False),
    ("forward_kl", "none", False),
]


def _loss_grads_and_logits(student, samples, teacher, cfg):
    """``loss_on_micro_batch`` over the samples as one micro-batch, with its gradients (then zeroed), and
    the student's full logits at the loss rows for a reference to backpropagate through:
    (micro-batch, loss, tokens, gradients, logits)."""
    (mb,) = pack_micro_batches(samples, teacher, 1000)
    total, n = loss_on_micro_batch(student, mb, cfg)
    total.backward()
    got = grads(student)
    student.zero_grad()
    logits = student(input_ids=mb.input_ids, attention_mask=mb.attention_mask).logits[mb.rows, mb.cols]
    return mb, total, n, got, logits


@pytest.mark.parametrize("name,tail,tie", CASES)
def test_loss_on_micro_batch_matches_full_logits_reference(name, tail, tie):
    student = tiny_llama(0, torch.float64, tie=tie)
    samples = make_samples(3, 5)
    teacher = teacher_outputs(tiny_llama(1), samples)
    cfg = LossConfig(name=name, tail=tail, beta=0.3, temperature=1.3)
    mb, total, n, got, logits = _loss_grads_and_logits(student, samples, teacher, cfg)
    ref = topk_distill_loss_reference(
        logits,
        mb.teacher_ids,
        mb.teacher_logprobs.double(),
        loss=name,
        tail=tail,
        beta=0.3,
        temperature=1.3,
        reduction="sum",
    )
    ref.backward()
    assert n == sum(len(s.response_ids) for s in samples)
    torch.testing.assert_close(total, ref, rtol=1e-9, atol=1e-10)
    want = grads(student)
    assert got.keys() == want.keys()
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=1e-7, atol=1e-10, msg=key)


def test_sampled_reverse_kl_uses_rollout_logprobs_against_full_logits_reference():
    student = tiny_llama(0, torch.float64)
    samples = make_samples(4, 4)
    teacher = teacher_outputs(tiny_llama(1), samples)
    cfg = LossConfig(name="sampled_reverse_kl", temperature=0.7)
    mb, total, _, got, logits = _loss_grads_and_logits(student, samples, teacher, cfg)
    logq = torch.log_softmax(logits / 0.7, dim=-1).gather(1, mb.target_ids[:, None])[:, 0]
    ref = sampled_reverse_kl_loss(logq, mb.rollout_logprobs.double(), mb.teacher_token_logprobs.double())
    ref.backward()
    torch.testing.assert_close(total, ref, rtol=1e-9, atol=1e-10)
    for key, g in grads(student).items():
        torch.testing.assert_close(got[key], g, rtol=1e-7, atol=1e-10, msg=key)


# ------------------------------------------------------------------------------------- normalisation


def _grads_for(model, samples, teacher, budget, cfg, **kw):
    model.zero_grad(set_to_none=True)
    mbs = pack_micro_batches(samples, teacher, budget)
    accumulate_gradients(model, mbs, cfg, **kw)
    return grads(model), len(mbs)


def test_gradient_is_independent_of_micro_batch_split():
    student = tiny_llama(0, torch.float64)
    samples = make_samples(5, 8)
    teacher = teacher_outputs(tiny_llama(1), samples)
    cfg = LossConfig()
    longest = max(len(s.prompt_ids) + len(s.response_ids) - 1 for s in samples)
    small, n_small = _grads_for(student, samples, teacher, longest, cfg)
    big, n_big = _grads_for(student, samples, teacher, 10_000, cfg)
    assert n_small > 3 and n_big == 1
    for key in big:
        torch.testing.assert_close(small[key], big[key], rtol=1e-10, atol=1e-13, msg=key)

    # the test can fail: averaging per-micro-batch means (the verl/TRL bug) gives another gradient
    student.zero_grad(set_to_none=True)
    mbs = pack_micro_batches(samples, teacher, longest)
    for mb in mbs:
        total, n = loss_on_micro_batch(student, mb, cfg)
        (total / n / len(mbs)).backward()
    naive = grads(student)
    assert max(float((naive[k] - big[k]).abs().max() / big[k].abs().max()) for k in big) > 1e-3


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    import faulthandler
    from datetime import timedelta

    faulthandler.dump_traceback_later(90, exit=False)  # a stuck rank shows where it is in the test output
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        timeout=timedelta(seconds=60),
    )
    try:
        torch.set_num_threads(1)
        samples = make_samples(6, 7)
        teacher = teacher_outputs(tiny_llama(1), samples)
        mine = slice(0, 2) if rank == 0 else slice(2, 7)  # uneven token counts on purpose
        # rank 1: several micro-batches (DDP no_sync path); rank 0 one, padded with zero-weight ones
        budget = 10_000 if rank == 0 else 16
        cfg = LossConfig()
        plain = tiny_llama(0, torch.float64)
        g_plain, _ = _grads_for(plain, samples[mine], teacher[mine], budget, cfg, group=None)
        ddp = torch.nn.parallel.DistributedDataParallel(tiny_llama(0, torch.float64))
        ddp.zero_grad(set_to_none=True)
        mbs = pack_micro_batches(samples[mine], teacher[mine], budget)
        loss_sum, n = accumulate_gradients(ddp, mbs, cfg)
        g_ddp = {k.removeprefix("module."): v for k, v in grads(ddp).items()}
        torch.manual_seed(100 + rank)
        rng = gather_rng_states()  # for the checkpoint: every rank's states, no pickling
        result = {"plain": g_plain, "ddp": g_ddp, "loss_sum": loss_sum, "n": n, "rng": rng}
        torch.save(result, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()
        faulthandler.cancel_dump_traceback_later()


def test_two_gloo_ranks_average_to_the_single_process_gradient():
    samples = make_samples(6, 7)
    teacher = teacher_outputs(tiny_llama(1), samples)
    cfg = LossConfig()
    student = tiny_llama(0, torch.float64)
    want, _ = _grads_for(student, samples, teacher, 10_000, cfg)
    with tempfile.TemporaryDirectory() as out:
        # a stuck rank's stack is printed at 90 s (faulthandler in the worker)
        run_ranks(_ddp_worker, 2, _free_port(), out, nprocs=2, timeout_s=240)
        results = [torch.load(f"{out}/rank{r}.pt", weights_only=True) for r in range(2)]
    n_total = sum(len(s.response_ids) for s in samples)
    for res in results:
        assert res["n"] == n_total
        for key in want:
            # DDP: synced by the wrapper; plain module: all-reduced by accumulate_gradients
            torch.testing.assert_close(res["ddp"][key], want[key], rtol=1e-10, atol=1e-13, msg=key)
    # the plain path all-reduces only when given a group; with group=None (default world) it must too
    for r in range(2):
        torch.manual_seed(100 + r)
        assert torch.equal(results[0]["rng"][r]["torch"], torch.get_rng_state())
    for key in want:
        torch.testing.assert_close(results[0]["plain"][key], want[key], rtol=1e-10, atol=1e-13, msg=key)


# ------------------------------------------------------------------------------------- optimisation


def _cfg(**optim) -> SimpleNamespace:
    return SimpleNamespace(loss=LossConfig(), optim=OptimConfig(**optim))


def test_train_step_lowers_kl_to_a_fixed_teacher_and_reports_metrics():
    student = tiny_llama(0)
    samples = make_samples(7, 6)
    teacher = teacher_outputs(tiny_llama(1), samples)
    cfg = _cfg(lr=3e-3, warmup_steps=2, clip_grad=1.0, weight_decay=0.01)
    optimizer, sched = build_optimizer(student, cfg.optim, total_steps=8)
    mbs = pack_micro_batches(samples, teacher, 30)
    history = [train_step(student, optimizer, sched, mbs, cfg) for _ in range(8)]
    kl = [m["actor/kl_loss"] for m in history]
    assert kl[-1] < 0.8 * kl[0], kl
    assert [m["actor/lr"] for m in history[:3]] == pytest.approx([1.5e-3, 3e-3, 3e-3])
    lens = [len(s.response_ids) for s in samples]
    m = history[0]
    assert m["response_seq_len/mean"] == pytest.approx(sum(lens) / len(lens))
    assert (m["response_seq_len/max"], m["response_seq_len/min"]) == (max(lens), min(lens))
    assert m["actor/response_tokens"] == sum(lens)
    assert m["actor/total_tokens"] == sum(lens) + sum(len(s.prompt_ids) for s in samples)
    assert m["actor/micro_batches"] == len(mbs) and m["actor/grad_norm"] > 0
    assert m["actor/tokens_imbalance"] == 1.0  # one rank holds every token


def test_lr_schedule_and_weight_decay_groups():
    factors = [lr_factor(s, warmup_steps=2, total_steps=6, schedule="cosine") for s in range(7)]
    want = [0.5, 1.0, 1.0, 0.5 * (1 + math.cos(math.pi / 4)), 0.5, 0.5 * (1 + math.cos(3 * math.pi / 4)), 0.0]
    assert factors == pytest.approx(want)
    assert lr_factor(10, warmup_steps=0, total_steps=5, schedule="constant") == 1.0
    student = tiny_llama(0)
    optimizer, _ = build_optimizer(student, OptimConfig(lr=1e-3, weight_decay=0.1), total_steps=3)
    decay, no_decay = optimizer.param_groups
    assert decay["weight_decay"] == 0.1 and all(p.dim() >= 2 for p in decay["params"])
    assert no_decay["weight_decay"] == 0.0 and all(p.dim() < 2 for p in no_decay["params"])
    with pytest.raises(ValueError, match="optim.schedule"):
        build_optimizer(student, SimpleNamespace(**{**OptimConfig().__dict__, "schedule": "linear"}), 3)


# ------------------------------------------------------------------------------------ mixed precision


def _precision_cfg(param: str, compute: str, lr: float = 1e-6) -> SimpleNamespace:
    from gkd.config import ModelConfig

    model = ModelConfig(param_dtype=param, compute_dtype=compute)
    return SimpleNamespace(loss=LossConfig(), optim=OptimConfig(lr=lr, clip_grad=0.0), model=model)


def test_compute_dtype_resolution_and_fp32_on_cpu_is_bitwise_unchanged():
    from gkd.trainer.step import autocast, autocast_dtype

    fp32, bf16 = tiny_llama(0), tiny_llama(0, dtype=torch.bfloat16)
    assert autocast_dtype(fp32, _precision_cfg("float32", "auto")) is None  # auto on CPU = fp32: no autocast
    assert (
        autocast_dtype(fp32, _precision_cfg("float32", "bfloat16")) is torch.bfloat16
    )  # explicit: on CPU too
    assert autocast_dtype(fp32, _precision_cfg("float32", "auto"), torch.device("cuda", 0)) is torch.bfloat16
    assert autocast_dtype(bf16, _precision_cfg("bfloat16", "bfloat16")) is None  # nothing to cast
    assert autocast_dtype(fp32, SimpleNamespace(loss=LossConfig())) is None  # no model section: fp32
    with warnings.catch_warnings():  # CPU-only torch warns that CUDA autocast is unavailable
        warnings.simplefilter("ignore")
        ctx = autocast(torch.device("cuda", 0), torch.bfloat16)  # built, not entered: no GPU needed
    assert isinstance(ctx, torch.autocast) and ctx.device == "cuda" and ctx.fast_dtype is torch.bfloat16
    assert isinstance(autocast("cpu", torch.bfloat16), torch.autocast)
    assert not isinstance(autocast("cpu", None), torch.autocast)

    # the default config on CPU trains exactly as before: same loss and gradients, bitwise
    samples = make_samples(2, 3)
    mb = pack_micro_batches(samples, teacher_outputs(tiny_llama(1), samples), 1000)
    a, b = tiny_llama(0), tiny_llama(0)
    accumulate_gradients(a, mb, LossConfig())
    steps = [train_step(m, *build_optimizer(m, cfg.optim, 2), mb, cfg) for m, cfg in
             [(a, _precision_cfg("float32", "float32")), (b, _precision_cfg("float32", "auto"))]]  # fmt: skip
    assert steps[0]["actor/kl_loss"] == steps[1]["actor/kl_loss"]
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))


# fp32 master weights under bf16 compute at lr 1e-6: tests/test_trainer.py (through the config, the
# student's loading and the export); under FSDP2: tests/test_trainer_fsdp2.py


def test_bf16_compute_losses_match_fp32_within_tolerance():
    """Three steps at lr 1e-3: losses (and the grad norm) of fp32 master + bf16 compute stay within 2 %
    of the all-fp32 run (bf16 keeps 8 mantissa bits: ~0.4 % per rounding, averaged over tokens)."""
    samples = make_samples(6, 16)
    mb = pack_micro_batches(samples, teacher_outputs(tiny_llama(1), samples), 200)
    runs = {}
    for compute in ("float32", "bfloat16"):
        cfg = _precision_cfg("float32", compute, lr=1e-3)
        model = tiny_llama(0)
        opt, sched = build_optimizer(model, cfg.optim, 4)
        runs[compute] = [train_step(model, opt, sched, mb, cfg) for _ in range(3)]
    for fp32, bf16 in zip(runs["float32"], runs["bfloat16"], strict=True):
        assert bf16["actor/kl_loss"] == pytest.approx(fp32["actor/kl_loss"], rel=2e-2)
        assert bf16["actor/grad_norm"] == pytest.approx(fp32["actor/grad_norm"], rel=5e-2)
    assert runs["bfloat16"][0]["actor/kl_loss"] != runs["float32"][0]["actor/kl_loss"]  # bf16 really ran
    assert runs["bfloat16"][-1]["actor/kl_loss"] < runs["bfloat16"][0]["actor/kl_loss"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="autocast is a CUDA path")
def test_bf16_autocast_on_cuda_runs_matmuls_in_bf16_and_keeps_fp32_weights():
    student = tiny_llama(0).cuda()  # fp32 master weights
    samples = make_samples(2, 4)
    mb = pack_micro_batches(samples, teacher_outputs(tiny_llama(1), samples), 1000)[0].to("cuda")
    seen = []
    hook = student.model.layers[0].mlp.down_proj.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    want, _ = loss_on_micro_batch(student, mb, LossConfig())
    got, _ = loss_on_micro_batch(student, mb, LossConfig(), compute_dtype=torch.bfloat16)
    hook.remove()
    assert seen == [torch.float32, torch.bfloat16]
    assert got.dtype == torch.float32  # the fused loss runs on hidden states cast to the fp32 lm_head
    torch.testing.assert_close(got, want, rtol=5e-2, atol=1e-3)
    got.backward()
    assert all(p.grad is None or p.grad.dtype == torch.float32 for p in student.parameters())
