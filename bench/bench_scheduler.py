"""Scheduler overlap on synthetic, sleep-based phases: measured step time / ideal, for k = 0, 1, 2.

Run: ``.venv/bin/python -m pytest bench/bench_scheduler.py --benchmark-only -s``
(``GKD_BENCH_UNIT_MS`` scales the phases, default 50 ms, 20 with ``GKD_BENCH_QUICK=1``;
``GKD_BENCH_SYNC_MS`` is S, default 5 ms; ``GKD_BENCH_BATCHES`` batches per run, default 30, quick 16).
Ratios (higher is better): ``bound_over_step`` per synthetic case; ``one_step_off_speedup`` and
``two_step_off_speedup`` (k=0's step time over k=1's / k=2's) for the two real pipelines, which run in full
mode only. Full-mode figures are printed at the end and written to bench/results/scheduler.json.

Synthetic engines (no model anywhere): the rollout is one worker thread that sleeps G per batch, serves
requests in order, waits for ``min_version`` and swaps in a synced version at a batch boundary (as the
rollout service does); the teacher is one worker thread that sleeps T per batch; ``update`` sleeps U on the
trainer thread; ``sync`` returns a Future that lands the version in the rollout after S (a double-buffered
transfer). G:T:U ratios 1:1:1, 1:3:1 and 3:1:1 times the unit.

Two baselines, from the same phase durations: DESIGN.md's ideal (``max(G, T, U)`` for k=2,
``max(U, G + T)`` for k=1, ``G + T + U + S`` for k=0; the target is <= 1.05) and the exact lower bound
of this schedule, ``max(G, T, U, S, (G + T + U + S) / (k + 1))`` (see ``gkd.trainer.scheduler``): for k=1 it
is below DESIGN.md's figure, because generation of batch t+1 starts as soon as version t lands, not when
update t starts. Step time is the mean over the steady state (after warm-up, before the drain).

Third part, the demo task (``test_demo_task_step_time``, full mode only): ``gkd train`` with ``gkd demo``'s
config (SmolLM2-135M-Instruct teacher, the 16-layer student ``DEMO_LAYERS`` the recorded baselines used,
the demo prompts, 8 prompts x 32 new tokens, one torch thread per process, no validation or checkpoints)
for sync, one_step_off and two_step_off in one benchmark run (``GKD_BENCH_DEMO_STEPS`` steps each, default
12); step time is the median of ``timing/step`` over the steady state in metrics.jsonl. Skipped unless
``gkd demo`` has cached those models (run ``gkd demo --student-layers 0-9,24-29`` once).

Second part, the real pipeline (``test_tiny_pipeline_step_time``): ``gkd train`` on CPU with the tiny
random models of ``scripts/make_cpu_tiny.py`` (teacher service with the transformers engine, rollout service
with the CPU engine and the weight channel, one trainer rank), once per k = 0, 1, 2 in the same benchmark
run (``GKD_BENCH_PIPELINE_ROUNDS`` rounds, default 2, alternating the order 0,1,2 / 2,1,0 so slow drift of
a shared machine hits every k alike; ``GKD_BENCH_PIPELINE_STEPS`` steps each, default 20). Step time is
the steady-state spacing of the steps' log times in metrics.jsonl (steps k+2 .. steps-1-k), reported
as a ratio to k=0's. On a machine with fewer cores than busy processes (trainer, rollout and teacher
workers) the phases compete for CPU, which caps what overlap can win.
"""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

from gkd.trainer.scheduler import Scheduler

QUICK = os.environ.get("GKD_BENCH_QUICK") == "1"
UNIT = float(os.environ.get("GKD_BENCH_UNIT_MS", "20" if QUICK else "50")) / 1000
S = float(os.environ.get("GKD_BENCH_SYNC_MS", "5")) / 1000
BATCHES = int(os.environ.get("GKD_BENCH_BATCHES", "16" if QUICK else "30"))
full_mode_only = pytest.mark.skipif(QUICK, reason="full mode only (GKD_BENCH_QUICK=1 is set)")
RATIOS = {"1:1:1": (1, 1, 1), "1:3:1": (1, 3, 1), "3:1:1": (3, 1, 1)}
RESULTS = Path(__file__).resolve().parent / "results" / "scheduler.json"
ROOT = Path(__file__).resolve().parents[1]
PIPELINE_STEPS = int(os.environ.get("GKD_BENCH_PIPELINE_STEPS", "20"))
PIPELINE_ROUNDS = int(os.environ.get("GKD_BENCH_PIPELINE_ROUNDS", "2"))
DEMO_STEPS = int(os.environ.get("GKD_BENCH_DEMO_STEPS", "12"))
DEMO_LAYERS = "0-9,24-29"  # the student the recorded demo-task baselines were measured with (16 of 30 layers)
_ROWS: dict[str, dict[str, float]] = {}  # "k=2 1:3:1" -> figures, filled by the benchmarks
_PIPELINE: dict = {}  # the real tiny-model pipeline, filled by test_tiny_pipeline_step_time
_DEMO: dict = {}  # the demo task, filled by test_demo_task_step_time


@dataclass
class _Sample:
    policy_version: int


class SyntheticRollout:
    """One serial worker thread: sleeps ``G`` per batch; versions change only between batches."""

    def __init__(self, G: float):
        self.G, self.version, self.staged = G, 0, None
        self._queue: deque[tuple[int, Future]] = deque()
        self._cond, self._closed = threading.Condition(), False
        self._thread = threading.Thread(target=self._loop, name="synthetic-rollout", daemon=True)
        self._thread.start()

    def submit(self, batch: int, min_version: int) -> Future:
        fut: Future = Future()
        with self._cond:
            self._queue.append((min_version, fut))
            self._cond.notify_all()
        return fut

    def stage(self, version: int) -> None:
        with self._cond:
            self.staged = version
            self._cond.notify_all()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join(5)

    def _next(self):
        """At a batch boundary: swap in a staged version, then take the head request if it may start."""
        if self.staged is not None:
            self.version, self.staged = self.staged, None
        if self._queue and self.version >= self._queue[0][0]:
            return self._queue.popleft()[1], self.version
        return None

    def _loop(self) -> None:
        job = None
        while True:
            with self._cond:
                while job is None:
                    job = self._next()
                    if job is None:
                        if self._closed:
                            return
                        self._cond.wait()
            fut, version = job
            time.sleep(self.G)
            with self._cond:  # the next request starts at the boundary, before this reply is delivered
                job = self._next()
            fut.set_result([_Sample(version)])


def _run(k: int, G: float, T: float, U: float, n: int) -> dict[str, float]:
    rollout = SyntheticRollout(G)
    teacher = ThreadPoolExecutor(1, thread_name_prefix="synthetic-teacher")
    weights = ThreadPoolExecutor(1, thread_name_prefix="synthetic-weights")

    def score(batch, samples):
        return teacher.submit(time.sleep, T)

    def sync(version):
        return weights.submit(lambda: (time.sleep(S), rollout.stage(version)))

    def update(batch, samples, scored):
        time.sleep(U)
        return {}

    sched = Scheduler(k, rollout.submit, score, update, sync, clock=time.perf_counter)
    try:
        steps = list(sched.run(n))
    finally:
        rollout.close()
        teacher.shutdown()
        weights.shutdown()
    ends = [next(sp.end for sp in s.spans if sp.name == "update") for s in steps]
    first, last = k + 3, n - 1 - k  # steady state: after warm-up, before the last k (drain)
    step = (ends[last] - ends[first]) / (last - first)
    stale = [s.metrics["staleness"] for s in steps]
    assert stale == [min(b, k) for b in range(n)], stale
    design = {0: G + T + U + S, 1: max(U, G + T), 2: max(G, T, U)}[k]
    bound = max(G, T, U, S, (G + T + U + S) / (k + 1))
    return {
        "step_ms": step * 1e3,
        "design_ideal_ms": design * 1e3,
        "bound_ms": bound * 1e3,
        "step/design_ideal": step / design,
        "step/bound": step / bound,
    }


@pytest.mark.parametrize("ratio", list(RATIOS))
@pytest.mark.parametrize("k", [0, 1, 2])
def test_synthetic_step_time(benchmark, k, ratio):
    G, T, U = (UNIT * x for x in RATIOS[ratio])
    row = benchmark.pedantic(_run, args=(k, G, T, U, BATCHES), rounds=1, iterations=1)
    benchmark.extra_info.update(row)
    benchmark.extra_info["ratios"] = {"bound_over_step": 1 / row["step/bound"]}
    _ROWS[f"k={k} {ratio}"] = row


# ------------------------------------------------------------------------ the real tiny-model pipeline


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _tiny_models(root: Path) -> dict[str, str]:
    spec = importlib.util.spec_from_file_location("make_cpu_tiny", ROOT / "scripts" / "make_cpu_tiny.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.build(root, num_prompts=64)


def _train(config: str, overrides: list[str], out: Path, k: int, steps: int) -> list[dict]:
    """One ``gkd train`` run on fresh ports, one torch thread per process; the steady-state records of
    metrics.jsonl (steps k+2 .. steps-1-k: after warm-up, before the drain of the last k)."""
    ports = [_free_port() for _ in range(5)]
    names = ("teacher.server_port", "teacher.backend_port", "rollout.server_port", "rollout.backend_port")
    argv = [sys.executable, "-m", "gkd.cli", "train", "--config", config, *overrides]
    argv += [f"{n}={p}" for n, p in zip(names, ports, strict=False)] + [f"rollout.weight_port={ports[4]}"]
    argv += [
        f"trainer.output_dir={out}",
        f"trainer.scheduler={k}",
        f"trainer.total_steps={steps}",
        "trainer.nproc_per_node=1",
        "trainer.save_freq=0",
        "logging.progress_bar=false",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    proc = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-4000:]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    records = [r for r in records if "timing/step" in r]  # training steps only
    return records[k + 2 : steps - k]


def _pipeline_run(tiny: dict[str, str], out: Path, k: int, steps: int) -> dict[str, float]:
    """One tiny-model ``gkd train`` run; its steady-state step time and mean phase times."""
    overrides = [
        f"model.student_path={tiny['student']}",
        f"teacher.model_path={tiny['teacher']}",
        f"data.train_files={tiny['prompts']}",
    ]
    steady = _train("configs/cpu_tiny.yaml", overrides, out, k, steps)

    def mean(name: str) -> float:
        return statistics.fmean(r[name] for r in steady) * 1e3

    return {
        "step_ms": (steady[-1]["time"] - steady[0]["time"]) / (len(steady) - 1) * 1e3,
        "timing_step_ms": mean("timing/step"),
        "teacher_ms": mean("timing/get_teacher_knowledge"),
        "update_ms": mean("timing/update_actor"),
        "sync_ms": mean("timing/sync_rollout_weights"),
        "wait_gen_ms": mean("timing/wait_prev_gen"),
        "response_len": statistics.fmean(r["response_seq_len/mean"] for r in steady),
        "staleness": steady[-1]["staleness/max"],
    }


def _pipeline(root: Path) -> dict:
    tiny = _tiny_models(root / "tiny")
    runs: dict[int, list[dict[str, float]]] = {0: [], 1: [], 2: []}
    for r in range(PIPELINE_ROUNDS):
        for k in (0, 1, 2) if r % 2 == 0 else (2, 1, 0):
            runs[k].append(_pipeline_run(tiny, root / f"run_k{k}_{r}", k, PIPELINE_STEPS))
    base = statistics.fmean(x["step_ms"] for x in runs[0])
    summary = {}
    for k, rows in runs.items():
        step = statistics.fmean(x["step_ms"] for x in rows)
        summary[f"k={k}"] = {
            "step_ms": step,
            "step/k0": step / base,
            "per_round_step_ms": [x["step_ms"] for x in rows],
            **{key: statistics.fmean(x[key] for x in rows) for key in rows[0] if key != "step_ms"},
        }
    return summary


def _speedups(step_ms: dict[int, float]) -> dict[str, float]:
    """k=0's step time over k=1's and k=2's (higher is better)."""
    return {"one_step_off_speedup": step_ms[0] / step_ms[1], "two_step_off_speedup": step_ms[0] / step_ms[2]}


@full_mode_only
def test_tiny_pipeline_step_time(benchmark, tmp_path):
    """k = 1 and k = 2 against k = 0 on the real CPU pipeline, one benchmark run."""
    rows = benchmark.pedantic(_pipeline, args=(tmp_path,), rounds=1, iterations=1)
    for k in (1, 2):
        benchmark.extra_info[f"k={k}/k=0"] = rows[f"k={k}"]["step/k0"]
    benchmark.extra_info["ratios"] = _speedups({k: rows[f"k={k}"]["step_ms"] for k in (0, 1, 2)})
    _PIPELINE.update(
        {
            "what": "gkd train, configs/cpu_tiny.yaml, 1 trainer rank, teacher hf + rollout hf on CPU",
            "steps": PIPELINE_STEPS,
            "rounds": PIPELINE_ROUNDS,
            "cpus": os.cpu_count(),
            "rows": rows,
        }
    )


def _demo_models() -> tuple[Path, Path] | None:
    """The teacher and the ``DEMO_LAYERS`` student folders ``gkd demo`` cached, if both exist (run
    ``gkd demo --student-layers 0-9,24-29`` once)."""
    from gkd.demo.models import MARKER, TEACHER_DIRNAME, default_cache_dir, parse_layers

    cache = default_cache_dir()
    teacher = cache / TEACHER_DIRNAME
    if not (teacher / MARKER).is_file():
        return None
    depth = json.loads((teacher / "config.json").read_text())["num_hidden_layers"]
    tag = "_".join(map(str, parse_layers(DEMO_LAYERS, depth)))
    student = cache / "students" / f"layers-{tag}"
    return (teacher, student) if (student / "config.json").is_file() else None


def _demo_task(root: Path, models: tuple[Path, Path]) -> dict:
    from gkd.demo.run import DemoSettings, write_config, write_prompts

    st = DemoSettings(out=str(root), steps=DEMO_STEPS, student_layers=DEMO_LAYERS)
    train_file, _ = write_prompts(root, st.seed, st.heldout)
    config = write_config(st, root, models[0], models[1], train_file)
    no_val = ["trainer.test_freq=0", "trainer.val_before_train=false", "data.val_files=[]"]
    rows = {}
    for k in (0, 1, 2):
        steady = _train(str(config), no_val, root / f"run_k{k}", k, DEMO_STEPS)
        rows[k] = {
            "step_s": statistics.median(r["timing/step"] for r in steady),
            "update_s": statistics.median(r["timing/update_actor"] for r in steady),
            "response_len": statistics.fmean(r["response_seq_len/mean"] for r in steady),
        }
    return rows


@full_mode_only
def test_demo_task_step_time(benchmark, tmp_path):
    """sync, one_step_off and two_step_off on the demo task (cached models), one benchmark run."""
    models = _demo_models()
    if models is None:
        pytest.skip("gkd demo's models are not cached (`gkd demo --student-layers 0-9,24-29` caches them)")
    rows = benchmark.pedantic(_demo_task, args=(tmp_path, models), rounds=1, iterations=1)
    benchmark.extra_info.update({f"k={k}": row for k, row in rows.items()})
    benchmark.extra_info["steps"] = DEMO_STEPS
    benchmark.extra_info["ratios"] = _speedups({k: row["step_s"] for k, row in rows.items()})
    _DEMO.update({"steps": DEMO_STEPS, "cpus": os.cpu_count(), "rows": rows})


@pytest.fixture(scope="module", autouse=True)
def report():
    """After the module's benchmarks: print the table and write RESULTS (a fixture, so that
    ``--benchmark-only`` does not skip it)."""
    yield
    if not (_ROWS or _PIPELINE or _DEMO):
        return
    # keep the part of RESULTS this session did not run
    results = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}
    if _ROWS:
        print(f"\nscheduler, synthetic phases: unit {UNIT * 1e3:g} ms, S {S * 1e3:g} ms, {BATCHES} batches")
        print(f"  {'':12s} {'step ms':>8s} {'ideal ms':>9s} {'/ideal':>7s} {'bound ms':>9s} {'/bound':>7s}")
        for name, r in _ROWS.items():
            print(
                f"  {name:12s} {r['step_ms']:8.1f} {r['design_ideal_ms']:9.1f} {r['step/design_ideal']:7.3f} "
                f"{r['bound_ms']:9.1f} {r['step/bound']:7.3f}"
            )
        results.update({"unit_ms": UNIT * 1e3, "sync_ms": S * 1e3, "batches": BATCHES, "rows": _ROWS})
    if _PIPELINE:
        print(f"\nscheduler, real tiny-model CPU pipeline ({_PIPELINE['what']}), {PIPELINE_STEPS} steps x "
              f"{PIPELINE_ROUNDS} rounds, {os.cpu_count()} CPUs")  # fmt: skip
        print(
            f"  {'':4s} {'step ms':>8s} {'/k=0':>6s} {'teacher':>8s} {'update':>7s} {'sync':>6s} "
            f"{'wait gen':>9s}"
        )
        for name, r in _PIPELINE["rows"].items():
            print(
                f"  {name:4s} {r['step_ms']:8.1f} {r['step/k0']:6.3f} {r['teacher_ms']:8.1f} "
                f"{r['update_ms']:7.1f} {r['sync_ms']:6.1f} {r['wait_gen_ms']:9.1f}"
            )
        results["pipeline"] = _PIPELINE
    if _DEMO:
        print(f"\nscheduler, the demo task (gkd demo's config, no validation), {DEMO_STEPS} steps per k")
        for k, r in _DEMO["rows"].items():
            print(f"  k={k} step {r['step_s']:.2f} s (median), update {r['update_s']:.2f} s, "
                  f"response {r['response_len']:.1f} tokens")  # fmt: skip
        results["demo_task"] = _DEMO
    if QUICK:  # quick-mode figures are for bench_check, not the recorded results
        return
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2))
