"""The GPU proof run's e2e row: ``gkd train`` on one shared GPU with a random Qwen2-0.5B-shaped
student and a 1.5B-shaped teacher, 4 steps with ``sync`` (k=0) and with ``two_step_off`` (k=2): seconds/step,
tokens/s, generation and sync seconds, and two_step_off's speed over sync's (the row fails at <= 1x). The
rollout engine decodes through the static-cache CUDA graphs (its default on a GPU).
Called by ``scripts/gpu_check_steps.py e2e``; the helpers it shares live in ``gpu_steps.common``.
"""

from __future__ import annotations

import json
import shutil
import statistics
import subprocess
import time
from pathlib import Path

from gpu_steps.common import _sh, _tiny_qwen

QWEN2_05B = dict(hidden=896, layers=24, intermediate=4864, heads=14, kv_heads=2)
QWEN2_15B = dict(hidden=1536, layers=28, intermediate=8960, heads=12, kv_heads=2)
E2E_VOCAB = 151936
#: steps per run: the first carries start-up (and for k=2 the pipeline's fill), the medians are over the
#: rest; 4 keeps both runs inside the row's budget
STEPS = 4


def _e2e_models(work: Path) -> dict[str, str]:
    """Random Qwen2-0.5B-shaped student, 1.5B-shaped teacher (bf16 on disk), the tiny byte-level BPE
    tokenizer (its ids are a subset of the model vocabulary), and a prompt file."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch

    from gkd.demo.tiny import tokenizer

    tok = tokenizer()
    paths = {"student": work / "student", "teacher": work / "teacher", "prompts": work / "prompts.parquet"}
    for name, shape, seed in (("student", QWEN2_05B, 1), ("teacher", QWEN2_15B, 2)):
        if (paths[name] / "config.json").is_file():
            continue
        torch.manual_seed(seed)
        with torch.device("cuda"):
            model = _tiny_qwen(E2E_VOCAB, **shape).to(torch.bfloat16)
        model.save_pretrained(paths[name])
        tok.save_pretrained(paths[name])
        del model
        torch.cuda.empty_cache()
    words = ["quick", "brown", "fox", "lazy", "dog", "jumps"]
    prompts = [f"the {words[i % 6]} {words[(i * 5) % 6]} {i}" for i in range(128)]
    pq.write_table(pa.table({"prompt": prompts}), paths["prompts"])
    return {k: str(v) for k, v in paths.items()}


def _e2e_run(paths: dict, out: Path, scheduler: str, port_base: int, timeout: float) -> dict:
    overrides = [
        f"model.student_path={paths['student']}",
        "model.param_dtype=float32",
        "model.compute_dtype=bfloat16",
        "teacher.launch=true",
        f"teacher.model_path={paths['teacher']}",
        "teacher.backend=hf",
        "teacher.n_gpus_per_node=1",
        "teacher.workers=1",
        "teacher.top_k=64",
        f"teacher.server_port={port_base}",
        f"teacher.backend_port={port_base + 1}",
        "rollout.launch=true",
        "rollout.backend=hf",
        "rollout.n_gpus_per_node=1",
        "rollout.workers=1",
        "rollout.max_new_tokens=64",
        f"rollout.server_port={port_base + 2}",
        f"rollout.backend_port={port_base + 3}",
        f"rollout.weight_port={port_base + 4}",
        "trainer.n_gpus_per_node=1",
        "trainer.allow_shared_gpu=true",
        "trainer.strategy=ddp",
        f"trainer.scheduler={scheduler}",
        f"trainer.total_steps={STEPS}",
        "trainer.save_freq=0",
        "trainer.resume=never",
        f"trainer.output_dir={out}",
        "optim.lr=1e-6",
        f"data.train_files=[{paths['prompts']}]",
        "data.max_prompt_length=64",
        "data.max_response_length=64",
        "data.train_batch_size=16",
        "data.truncation=left",
        "logging.progress_bar=false",
    ]
    start = time.perf_counter()
    try:
        config = out.parent / f"{out.name}.yaml"  # every setting is an override; gkd train needs a file
        config.write_text(f"# gkd train --config {config} (overrides: scripts/gpu_check_steps.py)\n{{}}\n")
        rc = _sh(["gkd", "train", "--config", str(config), *overrides], timeout=timeout)
    except subprocess.TimeoutExpired:
        rc = None
    wall = time.perf_counter() - start
    rows = []
    if (out / "metrics.jsonl").is_file():
        rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines() if l.strip()]
    rows = [r for r in rows if "timing/step" in r]
    steady = rows[1:] or rows  # the first step carries start-up (and for k=2 the pipeline's fill)

    def med(key: str) -> float | None:
        values = [r[key] for r in steady if key in r]
        return round(statistics.median(values), 4) if values else None

    logs = {}
    if rc != 0 or len(rows) < STEPS:  # what each process said last, for the report
        for name in ("trainer", "rollout", "teacher"):
            log = out / "logs" / f"{name}.log"
            if log.is_file():
                logs[name] = log.read_text(errors="replace").splitlines()[-25:]
    return {
        "logs": logs,
        "exit_code": rc,
        "wall_s": round(wall, 1),
        "steps": len(rows),
        "s_per_step": med("timing/step"),
        "tokens_per_s": med("perf/throughput_tokens_per_s"),
        "sync_s": med("timing/sync_rollout_weights"),
        # where a step's time goes (medians): the trainer's own update and what it waits for
        "update_s": med("timing/update_actor"),
        "wait_gen_s": med("timing/wait_prev_gen"),
        "wait_teacher_s": med("timing/wait_prev_teacher"),
        "generate_s": med("timing/generate"),
        "teacher_s": med("timing/get_teacher_knowledge"),
        "peak_gib": med("perf/max_memory_allocated_gb"),
        # perf/mfu and the peak it divides by, with its source (datasheet / trainer.peak_tflops / measured)
        "mfu": med("perf/mfu"),
        "mfu_peak": _mfu_peak_line(out / "logs" / "trainer.log"),
    }


def _mfu_peak_line(log: Path) -> str | None:
    """The trainer's "perf/mfu against ... TFLOP/s per trainer device (source)" log line, from "against"."""
    if not log.is_file():
        return None
    for line in log.read_text(errors="replace").splitlines():
        if "perf/mfu against" in line:
            return line[line.index("perf/mfu against") :]
    return None


def run(args) -> dict:
    import torch

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    paths = _e2e_models(work)
    torch.cuda.synchronize()
    figs: dict = {"models_s": round(time.perf_counter() - start, 1)}
    budget = args.budget - (time.perf_counter() - start)
    for i, (k, scheduler) in enumerate(((0, "sync"), (2, "two_step_off"))):
        out = work / f"run_k{k}"
        shutil.rmtree(out, ignore_errors=True)
        share = budget / (2 - i) - 2
        t0 = time.perf_counter()
        figs[f"k{k}"] = _e2e_run(paths, out, scheduler, 16555 + 10 * i, share)
        budget -= time.perf_counter() - t0
    ok = all(figs[f"k{k}"]["exit_code"] == 0 and figs[f"k{k}"]["steps"] == STEPS for k in (0, 2))
    k0, k2 = figs["k0"]["s_per_step"], figs["k2"]["s_per_step"]
    # the pipelined scheduler's gain: seconds per step of sync over two_step_off's (> 1: faster)
    figs["two_step_off_over_sync"] = round(k0 / k2, 2) if k0 and k2 else None
    ok = ok and (figs["two_step_off_over_sync"] or 0) > 1.0
    headline = "; ".join(
        f"k={k}: {figs[f'k{k}']['steps']}/{STEPS} steps, {figs[f'k{k}']['s_per_step']} s/step, "
        f"{figs[f'k{k}']['tokens_per_s']} tok/s, gen {figs[f'k{k}']['generate_s']} s, "
        f"sync {figs[f'k{k}']['sync_s']} s, mfu {figs[f'k{k}']['mfu']}"
        for k in (0, 2)
    )
    headline += f"; two_step_off/sync speed {figs['two_step_off_over_sync']}x"
    return {**figs, "status": "PASS" if ok else "FAIL", "headline": headline}
