"""Rows of the GPU proof run for the code paths that never ran on a GPU before: static-cache generation
against the eager decode path, the weight channel's GPU receive path into a GPU engine, the loss's
out-of-range id guard and the reply value checks on CUDA tensors, and a sharded (DCP) save and resume on
one NCCL rank. ``gpu_steps`` dispatches to the ``step_*`` functions here; each returns
``{"status", "headline", ...figures}``. Without CUDA they run small on CPU (tests/test_gpu_check.py), which
checks everything but the device. ``generation``, ``receive`` and ``guard`` import neither zmq nor
omegaconf, so they run even when the wheels from .whl/ could not be installed.
"""

from __future__ import annotations

import dataclasses
import math
import os
import statistics
import time
from concurrent.futures import ThreadPoolExecutor

from gpu_steps.common import _free_port, _on_gpu, _sync, _tiny_qwen, random_batch, start_sender

#: The tiny model of the CPU smoke runs and of the GPU rows that need no realistic size.
SMALL = dict(hidden=64, layers=2, intermediate=128, heads=4, kv_heads=2)
MID = dict(hidden=512, layers=4, intermediate=1408, heads=8, kv_heads=2)


def _device() -> str:
    return "cuda" if _on_gpu() else "cpu"


def _prompts(n: int, vocab: int, seed: int) -> list[list[int]]:
    import torch

    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (int(torch.randint(12, 25, (1,), generator=g)),), generator=g).tolist()
            for _ in range(n)]  # fmt: skip


def _same_answers(a, b) -> tuple[int, float]:
    """(rows with identical tokens, the largest log-prob difference over those rows)."""
    rows, diff = 0, 0.0
    for x, y in zip(a, b, strict=True):
        if x.response_ids == y.response_ids:
            rows += 1
            diff = max(diff, float((x.response_logprobs - y.response_logprobs).abs().max()))
    return rows, diff


# ------------------------------------------------------------------------------------------ generation


def _tokens_per_s(engine, prompts, sampling, reps: int) -> tuple[float, float]:
    """(seconds of the first generate call, median seconds of ``reps`` more); generate ends with the
    host transfer, so its wall time is the device's."""
    t0 = time.perf_counter()
    engine.generate(prompts, sampling)
    first = time.perf_counter() - t0
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        engine.generate(prompts, sampling)
        times.append(time.perf_counter() - t0)
    return first, statistics.median(times)


def _teacher_static_equal(model, dev: str, prompts, new: int) -> bool:
    """The teacher's ``generate`` through the static steps gives the transformers path's answers and
    top-8 ids (log-probs within 1e-3), greedy and seeded-sampled (the row's uniforms on the model's
    device)."""
    import torch

    from gkd.teacher.hf_engine import HFTeacherEngine
    from gkd.teacher.types import GenerateSettings

    engines = [HFTeacherEngine(model, device=dev, static_cache=flag) for flag in (True, False)]
    for settings in (GenerateSettings(max_new_tokens=new, temperature=0.0),
                     GenerateSettings(max_new_tokens=new, temperature=1.0, seed=3)):  # fmt: skip
        got, want = [e.generate(prompts, settings, top_k=8) for e in engines]
        if not all(
            a.response_ids == b.response_ids
            and torch.equal(a.output.topk_ids, b.output.topk_ids)
            and bool((a.output.topk_logprobs - b.output.topk_logprobs).abs().max() <= 1e-3)
            for a, b in zip(got, want, strict=True)
        ):
            return False
    return True


def step_generation(args) -> dict:
    """Static-cache decode (CUDA graphs on a GPU) against the eager fused path on the e2e step's rollout
    shapes (Qwen2-0.5B-shaped, 16 prompts, 64 new tokens): greedy tokens equal in float32, tokens/s in
    bfloat16."""
    import torch

    from gkd.rollout.hf_engine import HFRolloutEngine
    from gkd.rollout.types import SamplingConfig
    from gpu_steps.e2e import E2E_VOCAB, QWEN2_05B

    gpu, dev = _on_gpu(), _device()
    shape, vocab = (QWEN2_05B, E2E_VOCAB) if gpu else (SMALL, 512)
    rows, new = (16, 64) if gpu else (4, 8)
    torch.manual_seed(0)
    with torch.device(dev):
        model = _tiny_qwen(vocab, **shape).eval()
    prompts = _prompts(rows, vocab, seed=1)
    figs: dict = {"device": dev, "rows": rows, "new_tokens": new, "vocab": vocab, "hidden": shape["hidden"]}

    def engines():
        kw = dict(device=dev, max_batch_size=rows, prepack=False)
        return HFRolloutEngine(model, static_cache=True, **kw), HFRolloutEngine(
            model, static_cache=False, **kw
        )

    static, eager = engines()
    greedy = SamplingConfig(max_new_tokens=new // 2, temperature=0.0)
    same, diff = _same_answers(static.generate(prompts, greedy), eager.generate(prompts, greedy))
    figs.update(fp32_greedy_rows_equal=f"{same}/{rows}", fp32_logprob_max_diff=diff)
    figs["teacher_fp32_equal"] = _teacher_static_equal(model, dev, prompts, new // 2)
    del static, eager  # their graphs read the float32 weights
    model.to(torch.bfloat16)
    static, eager = engines()
    sampling = SamplingConfig(max_new_tokens=new, temperature=1.0, seed=0)
    for name, engine in (("eager", eager), ("static", static)):
        first, steady = _tokens_per_s(engine, prompts, sampling, reps=3 if gpu else 1)
        figs[f"{name}_first_s"] = round(first, 3)
        figs[f"{name}_tokens_per_s"] = round(rows * new / steady, 1)
        figs[f"{name}_ms_per_step"] = round(1e3 * steady / new, 2)
    shapes = list(static.static_steps._steps.values())
    figs["static_graphs"] = sum(st.graph is not None for st in shapes) if gpu else len(shapes)
    figs["capture_errors"] = [st.capture_error for st in shapes if st.capture_error]
    figs["static_over_eager"] = round(figs["static_tokens_per_s"] / figs["eager_tokens_per_s"], 2)
    figs["bf16_sampled_rows_equal"] = _same_answers(static.generate(prompts, sampling),
                                                    eager.generate(prompts, sampling))[0]  # fmt: skip
    ok = (
        same == rows
        and diff <= 1e-3
        and figs["teacher_fp32_equal"]
        and (figs["static_over_eager"] > 1.0 and figs["static_graphs"] == 1 or not gpu)
    )
    headline = (
        f"{rows}x{new} tokens, bf16: static {figs['static_tokens_per_s']} tok/s vs eager "
        f"{figs['eager_tokens_per_s']} ({figs['static_over_eager']}x); fp32 greedy rows equal {same}/{rows}, "
        f"log-prob diff {diff:.1e}"
        + (f"; capture failed: {figs['capture_errors'][0]}" if figs["capture_errors"] else "")
    )
    return {**figs, "status": "PASS" if ok else "FAIL", "headline": headline}


# ------------------------------------------------------------------------------------------ receive


def _send_one_version(tx, source, receivers) -> list[int]:
    """Version 1 of ``source`` (fp32 on the wire) sent on ``tx`` from a thread; ``receivers`` handshake and
    receive it in threads of their own. Returns the versions they staged (the sender's error is raised)."""
    import torch

    thread, errors = start_sender(tx, source, torch.float32)
    with ThreadPoolExecutor(len(receivers)) as pool:
        for f in [pool.submit(r.handshake) for r in receivers]:
            f.result(timeout=120)
        versions = [f.result(timeout=120) for f in [pool.submit(r.receive) for r in receivers]]
    thread.join(60)
    if errors:
        raise errors[0]
    return versions


def step_receive(args) -> dict:
    """One weight version from a sender to two receivers over gloo carrying CUDA tensors, i.e. through the
    receive code of a GPU channel (NCCL needs two GPUs for two ranks): one stages in pinned host memory
    through the device bucket buffers and applies into a static-cache rollout engine whose graph was
    captured before the load, the other stages on the GPU and applies into a plain module."""
    import torch

    from gkd.rollout.hf_engine import HFRolloutEngine
    from gkd.rollout.types import SamplingConfig
    from gkd.weights.transfer import WeightReceiver, init_weight_group

    gpu, dev = _on_gpu(), _device()
    shape, vocab = (MID, 32000) if gpu else (SMALL, 512)
    port = _free_port()
    with ThreadPoolExecutor(3) as pool:
        groups = [pool.submit(init_weight_group, "127.0.0.1", port, r, 3, backend="gloo") for r in range(3)]
        tx, rx_engine, rx_module = [dataclasses.replace(f.result(timeout=60), device=torch.device(dev))
                                    for f in groups]  # fmt: skip
    models = []
    for seed in (1, 0, 2):  # the sender's weights, the engine's, the plain module's
        torch.manual_seed(seed)
        with torch.device(dev):
            models.append(_tiny_qwen(vocab, **shape).eval())
    source, target, plain = models
    engine = HFRolloutEngine(target, device=dev, prepack=False, static_cache=True)
    prompts = _prompts(4, vocab, seed=3)
    greedy = SamplingConfig(max_new_tokens=16, temperature=0.0)
    before = engine.generate(prompts, greedy)  # captures the graph on the old weights
    receivers = [
        WeightReceiver(rx_engine, target, staging="host", pin=gpu, bounce=True),
        WeightReceiver(rx_module, plain, staging="device"),
    ]
    start = time.perf_counter()
    versions = _send_one_version(tx, source, receivers)
    received = time.perf_counter() - start
    receivers[0].apply(engine)
    receivers[1].apply(plain)
    _sync()
    seconds = time.perf_counter() - start
    want = dict(source.named_parameters())
    identical = [
        all(torch.equal(p.detach(), want[n].detach()) for n, p in m.named_parameters())
        for m in (target, plain)
    ]
    after = engine.generate(prompts, greedy)
    fresh = HFRolloutEngine(source, device=dev, prepack=False, static_cache=False).generate(prompts, greedy)
    rows_equal, diff = _same_answers(after, fresh)
    # (a random tied-embedding model's greedy tokens barely depend on its weights; its log-probs do)
    changed = sum(
        a.response_ids != b.response_ids
        or not torch.allclose(a.response_logprobs, b.response_logprobs, atol=1e-3)
        for a, b in zip(before, after, strict=True)
    )
    figs = {
        "device": dev,
        "versions": versions,
        "bytes": sum(p.numel() * 4 for p in source.parameters()),
        "receive_s": round(received, 3),
        "receive_apply_s": round(seconds, 3),
        "engine_identical": identical[0],
        "module_identical": identical[1],
        "staging_pinned": all(getattr(fb, "pinned", False) for fb in receivers[0]._staging),
        "graph_after_load_rows_equal": f"{rows_equal}/{len(prompts)}",
        "graph_after_load_logprob_diff": diff,
        "answers_changed_by_load": changed,
        "graph_captured": all(st.graph is not None for st in engine.static_steps._steps.values()),
    }
    ok = (
        versions == [1, 1]
        and all(identical)
        and (figs["staging_pinned"] or not gpu)
        and rows_equal == len(prompts)
        and diff <= 1e-3
        and changed > 0
        and (figs["graph_captured"] or not gpu)
    )
    headline = (
        f"gloo/{dev} channel {figs['bytes'] / 2**20:.0f} MiB fp32 in {seconds:.2f}s; host-staged -> static "
        f"engine identical={identical[0]}, device-staged -> module identical={identical[1]}; captured graph "
        f"after the load = eager on the new weights {rows_equal}/{len(prompts)} rows"
    )
    return {**figs, "status": "PASS" if ok else "FAIL", "headline": headline}


# ------------------------------------------------------------------------------------------ guard


def _guard(dev: str) -> dict:
    """The fused loss refuses out-of-range teacher ids in one line (no device-side assert), and the next
    valid call on the same device gives bit-identical results."""
    import torch

    from gkd.kernels import fused_linear_topk_distill_loss

    n, h, vocab, k = (256, 512, 32000, 16) if dev == "cuda" else (16, 32, 300, 4)
    g = torch.Generator(device=dev).manual_seed(0)
    hidden = torch.randn(n, h, device=dev, generator=g, dtype=torch.bfloat16)
    weight = torch.randn(vocab, h, device=dev, generator=g, dtype=torch.bfloat16) * 0.05
    ids = torch.stack([torch.randperm(vocab, device=dev, generator=g)[:k] for _ in range(n)])
    lp = torch.log_softmax(torch.randn(n, k, device=dev, generator=g), -1)

    def loss(bad_ids):
        return fused_linear_topk_distill_loss(hidden, weight, bad_ids, lp, reduction="mean")

    first = loss(ids)
    messages = []
    for value in (vocab, -1, vocab + 10**6):
        bad = ids.clone()
        bad[n // 2, k - 1] = value
        try:
            loss(bad)
            messages.append(None)
        except ValueError as e:
            messages.append(str(e).splitlines()[0])
    again = loss(ids)
    _sync()
    refused = all(m is not None and "outside [0, V=" in m for m in messages)
    return {
        "guard_loss": float(first),
        "guard_refusals": messages,
        "guard_refused_all": refused,
        "guard_repeat_bitwise": bool(torch.equal(first, again)),
    }


def _reply_values(dev: str) -> dict:
    """gkd/services/values.py's checks (merged from another branch; absent: reported, not failed) on CUDA
    tensors of one score reply's size: a clean reply passes, each planted fault is named."""
    import torch

    try:
        from gkd.services import values as reply_values
    except ImportError as e:
        return {"values_status": f"not checked: gkd.services.values is not in this tree ({e})"}
    rows, k, vocab = (16 * 96, 64, 151936) if dev == "cuda" else (32, 4, 300)
    g = torch.Generator(device=dev).manual_seed(0)
    lp = torch.log_softmax(torch.randn(rows, k, device=dev, generator=g), -1)
    ids = torch.randint(0, vocab, (rows, k), device=dev, generator=g)
    clean = [reply_values.logprob_problem("lp", lp, allow_neg_inf=False),
             reply_values.ids_problem("ids", ids, vocab)]  # fmt: skip
    faults = {}
    for what, value in (("nan", float("nan")), ("pos_inf", float("inf")), ("positive", 0.5)):
        bad = lp.clone()
        bad[rows - 1, 1] = value
        faults[what] = reply_values.logprob_problem("lp", bad, allow_neg_inf=True)
    neg = lp.clone()
    neg[3, 0] = float("-inf")
    faults["neg_inf_allowed"] = reply_values.logprob_problem("lp", neg, allow_neg_inf=True)
    faults["neg_inf_refused"] = reply_values.logprob_problem("lp", neg, allow_neg_inf=False)
    for what, value in (("id_vocab", vocab), ("id_negative", -1)):
        bad = ids.clone()
        bad[rows - 1, 2] = value
        faults[what] = reply_values.ids_problem("ids", bad, vocab)
    seconds = min(
        _timed(lambda: reply_values.logprob_problem("lp", lp, allow_neg_inf=False)) for _ in range(5)
    )
    ok = (
        clean == [None, None]
        and faults["neg_inf_allowed"] is None
        and all(faults[w] and f"at row {rows - 1}" in faults[w] for w in ("nan", "pos_inf", "positive"))
        and faults["neg_inf_refused"] is not None
        and all(faults[w] and f"at row {rows - 1}" in faults[w] for w in ("id_vocab", "id_negative"))
    )
    return {"values_status": "PASS" if ok else "FAIL", "values_faults": faults,
            "values_check_ms": round(1e3 * seconds, 3)}  # fmt: skip


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    _sync()
    return time.perf_counter() - t0


def step_guard(args) -> dict:
    dev = _device()
    figs = {"device": dev, **_guard(dev), **_reply_values(dev)}
    ok = figs["guard_refused_all"] and figs["guard_repeat_bitwise"] and figs["values_status"] != "FAIL"
    headline = (
        f"{dev}: out-of-range teacher ids refused {sum(m is not None for m in figs['guard_refusals'])}/3, "
        f"repeat bitwise {figs['guard_repeat_bitwise']}; reply values {figs['values_status'][:40]}"
        + (f" ({figs['values_check_ms']} ms per check)" if "values_check_ms" in figs else "")
    )
    return {**figs, "status": "PASS" if ok else "FAIL", "headline": headline}


# ------------------------------------------------------------------------------------------ checkpoint


def step_checkpoint_rank(args) -> dict:
    """One FSDP2 rank (NCCL on a GPU, gloo on CPU): a step, a sharded save in the background while two
    more steps run, then a fresh model and optimizer load the checkpoint and take the same two steps: the
    first one's loss must equal the uninterrupted run's bit for bit (the second's is reported)."""
    import torch
    import torch.distributed as dist

    from gkd.config import load_config, to_yaml
    from gkd.trainer.checkpoint import gather_rng_states
    from gkd.trainer.checkpoint.load import load_checkpoint
    from gkd.trainer.checkpoint.writer import CheckpointWriter
    from gkd.trainer.recipe import _init_distributed, shard_fsdp2
    from gkd.trainer.step import build_optimizer, pack_micro_batches, train_step

    # deterministic kernels (flash attention's backward among them), so that the second step after the
    # resume may be compared bit for bit too; the first depends on the loaded state alone
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = False  # as in training: empty is not NaN-filled
    gpus = 1 if _on_gpu() else 0
    cfg = load_config([], ["model.student_path=unused", f"trainer.n_gpus_per_node={gpus}",
                           "trainer.strategy=fsdp2", "model.param_dtype=float32",
                           "model.compute_dtype=bfloat16", "optim.lr=1e-4"], check=False)  # fmt: skip
    rank, world, device = _init_distributed(cfg)
    backend = dist.get_backend()
    vocab, shape = (32000, MID) if gpus else (512, SMALL)
    batches = [
        pack_micro_batches(*random_batch(vocab, 16, seed=s, rows=8), 4096, pad_id=0) for s in (1, 2, 3)
    ]

    def build(seed: int):
        torch.manual_seed(seed)
        model = shard_fsdp2(_tiny_qwen(vocab, **shape).to(device), device, torch.bfloat16)
        return (model, *build_optimizer(model, cfg.optim, total_steps=10))

    def steps(model, opt, sched, which) -> list[float]:
        return [train_step(model, opt, sched, batches[i], cfg, device=device)["actor/kl_loss"] for i in which]

    model, opt, sched = build(0)
    steps(model, opt, sched, [0])
    writer = CheckpointWriter(background=True)
    t0 = time.perf_counter()
    small = dict(lr_scheduler=sched, rng_states=gather_rng_states(), config_yaml=to_yaml(cfg),
                 data_state={"batch": 1}, scheduler_state={"next_batch": 1, "version": 1})  # fmt: skip
    path = writer.save_sharded(args.work, 1, model=model, optimizer=opt, rank0=small if rank == 0 else None)
    save_call_s = time.perf_counter() - t0
    want = steps(model, opt, sched, [1, 2])  # the save's shards are being written meanwhile
    writer.wait()
    writer.close()
    model, opt, sched = build(7)  # other initial weights: only the load can make the losses equal
    t0 = time.perf_counter()
    step = load_checkpoint(path, model=model, optimizer=opt, lr_scheduler=sched, rank=rank).step
    load_s = time.perf_counter() - t0
    got = steps(model, opt, sched, [1, 2])
    size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    diff = max(abs(a - b) for a, b in zip(got, want, strict=True))
    figs = {"backend": backend, "world": world, "step": step, "want": want, "got": got,
            "bitwise": got == want, "max_abs_diff": diff, "save_call_s": round(save_call_s, 3),
            "load_s": round(load_s, 3), "checkpoint_mib": round(size / 2**20, 1),
            "layout": sorted(p.name for p in path.iterdir())}  # fmt: skip
    figs["next_step_bitwise"] = got[0] == want[0]  # the row's verdict; the step after is reported
    ok = backend == ("nccl" if gpus else "gloo") and step == 1 and got[0] == want[0]
    ok = ok and all(map(math.isfinite, got))
    first = "bitwise equal" if got[0] == want[0] else f"differs by {abs(got[0] - want[0]):.2e}"
    second = "bitwise equal" if got[1] == want[1] else f"differs by {diff:.2e}"
    headline = (
        f"{backend} world {world} fsdp2: DCP save (background) + resume: next-step loss {first} "
        f"({got[0]:.6f}), the step after {second}; {figs['checkpoint_mib']} MiB, load {load_s:.2f}s"
    )
    dist.destroy_process_group()
    return {**figs, "status": "PASS" if ok else "FAIL", "headline": headline}


def step_checkpoint(args) -> dict:
    """Re-runs scripts/gpu_check_steps.py as one torchrun rank, like the trainer row."""
    import json
    import sys
    from pathlib import Path

    from gpu_steps.common import ROOT, _sh

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    steps_py = str(ROOT / "scripts" / "gpu_check_steps.py")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1", steps_py,
           "checkpoint-rank", "--work", str(work), "--json", args.json]  # fmt: skip
    rc = _sh(cmd)
    if rc != 0 or not Path(args.json).is_file():
        return {"status": "FAIL", "headline": f"torchrun exited {rc}"}
    return json.loads(Path(args.json).read_text())
