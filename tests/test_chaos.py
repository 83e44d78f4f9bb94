"""Chaos: ``gkd train`` (tiny models, ``one_step_off``, 2 rollout + 2 teacher workers, 60 steps) while the
test SIGKILLs a rollout worker, later a teacher worker, later the other rollout worker, at steps drawn from
a seeded RNG. The run must finish with status 0, every step once and in order in metrics.jsonl, staleness
<= k on every step; the services restart the workers and the weight channel re-forms with them.

The final student is compared with a fault-free run of the same batches. They match when no generation
had to be retried by the scheduler: a request of a killed worker is re-queued by the broker to the other
worker, which generates it with the same per-prompt seeds and the same policy version (the strict sync
gate holds the next version back until the batch's first attempt ended), and teacher scoring is a
deterministic forward pass. A scheduler-level retry (a request that timed out) may run after the next
sync, on version ``b`` instead of ``b - 1`` (still within k = 1): different samples, a different
student; the test then only checks the staleness bound.

``pytest -s tests/test_chaos.py`` prints the timeline: when each kill happened and how long each recovery
took (until the service listed two workers again, and the longest step around the kill).
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from gkd.demo.run import free_ports
from tests.tiny_run import build_tiny, train_argv

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
STEPS = 60
RUN_TIMEOUT_S = 200


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, str]:
    return build_tiny(tmp_path_factory.mktemp("tiny"), num_prompts=24)


def _start(
    tiny: dict[str, str], out: Path, *extra: str, env: dict[str, str] = ENV
) -> tuple[subprocess.Popen, dict[str, int]]:
    names = ("teacher", "teacher_backend", "rollout", "rollout_backend", "weights")
    ports = dict(zip(names, free_ports(len(names)), strict=True))
    argv = train_argv(
        tiny,
        out,
        list(ports.values()),
        "teacher.workers=2",
        "rollout.workers=2",
        "teacher.top_k=8",
        "rollout.max_new_tokens=8",
        "rollout.weight_heartbeat_timeout_s=3",
        "rollout.weight_timeout_s=30",
        "trainer.scheduler=one_step_off",
        "trainer.nproc_per_node=1",
        f"trainer.total_steps={STEPS}",
        "trainer.save_freq=0",
        "optim.lr=5e-3",
        "logging.progress_bar=false",
        *extra,  # later keys win
    )
    log = open(out.parent / f"{out.name}.log", "a")  # noqa: SIM115 - closed with the process
    proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    proc.log, proc.out = log, out
    return proc, ports


def _workers(backend_port: int) -> list[int]:
    """Pids of the worker processes (``... join --broker 127.0.0.1:PORT``) of one service, by start order."""
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            cmd = (Path("/proc") / pid / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"join" in cmd and any(a.endswith(f"127.0.0.1:{backend_port}".encode()) for a in cmd):
            found.append(int(pid))
    return sorted(found)


def _replaced(workers: list[int], victim: int) -> list[int] | None:
    return workers if len(workers) == 2 and victim not in workers else None


def _steps_done(out: Path) -> int:
    path = out / "metrics.jsonl"
    return len(path.read_text().splitlines()) if path.exists() else 0


def _records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _wait(cond, timeout_s: float, what: str, proc: subprocess.Popen):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        got = cond()
        if got:
            return got
        if proc.poll() is not None:
            raise AssertionError(f"gkd train exited with {proc.returncode} while waiting for {what}")
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout_s}s waiting for {what}\n{_log_tails(proc.out)}")


def _log_tails(out: Path, lines: int = 25) -> str:
    """The last lines of each service's and the trainer's log: what a timed-out wait was stuck on."""
    parts = [f"{_steps_done(out)} steps in metrics.jsonl"]
    for path in sorted((out / "logs").glob("*.log")) if (out / "logs").is_dir() else ():
        tail = path.read_text(errors="replace").splitlines()[-lines:]
        parts.append(f"--- {path.name} (last {len(tail)} lines)\n" + "\n".join(tail))
    return "\n".join(parts)


def _finish(proc: subprocess.Popen, out: Path, want: int = 0, timeout_s: float = RUN_TIMEOUT_S) -> str:
    try:
        code = proc.wait(timeout_s)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        proc.log.close()
    text = (out.parent / f"{out.name}.log").read_text()
    assert (code == 0) == (want == 0), (code, text[-8000:])
    return text


@pytest.mark.slow
def test_killed_workers_are_replaced_and_the_run_finishes(tiny, tmp_path):
    rng = random.Random(13)
    first = rng.randrange(8, 14)
    plan = [("rollout", 0, first), ("teacher", 0, first + rng.randrange(12, 18))]
    plan.append(("rollout", 1, plan[1][2] + rng.randrange(12, 18)))
    assert plan[-1][2] < STEPS - 8

    out = tmp_path / "chaos"
    proc, ports = _start(tiny, out)
    start = time.monotonic()
    timeline, originals = [], {}
    try:
        for service, which, step in plan:
            backend = ports[f"{service}_backend"]
            before = _wait(
                lambda b=backend: len(_workers(b)) == 2 and _workers(b), 120, f"2 {service} workers", proc
            )
            originals.setdefault(service, before)  # the workers it started with, by start order
            _wait(lambda s=step: _steps_done(out) >= s, 150, f"step {step}", proc)
            victim = originals[service][which]  # the second rollout kill: the other original worker
            assert victim in before, f"{service} worker {victim} is not running any more"
            killed_at, at_step = time.monotonic(), _steps_done(out)
            os.kill(victim, signal.SIGKILL)
            replaced = _wait(
                lambda b=backend, v=victim: _replaced(_workers(b), v),
                60,
                "a restart",
                proc,
            )
            timeline.append(
                {
                    "kill": f"{service} worker {victim}",
                    "at_s": round(killed_at - start, 1),
                    "at_step": at_step,
                    "replacement": [p for p in replaced if p not in before][0],
                    "restarted_after_s": round(time.monotonic() - killed_at, 1),
                }
            )
        log = _finish(proc, out)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    records = _records(out)
    assert [r["step"] for r in records] == list(range(STEPS))
    assert all(r["staleness/max"] <= 1 for r in records)
    for t in timeline:  # the slowest step after the kill: how long the run stalled
        after = [r["timing/step"] for r in records[t["at_step"] : t["at_step"] + 4]]
        t["slowest_step_after_s"] = round(max(after), 2)
    reforms = [
        line.split("gkd.weights.transfer", 1)[-1].strip() for line in log.splitlines() if "formed in" in line
    ]
    services = "".join((out / "logs" / f"{name}.log").read_text() for name in ("rollout", "teacher"))
    restarts = [line.split("] ", 1)[-1] for line in services.splitlines() if "restarted as process" in line]
    assert len(restarts) >= 3 and len(reforms) >= 2, (restarts, reforms)
    print("\nchaos timeline (seconds from the launcher's start):")
    for t in timeline:
        print("  ", t)
    print("  weight channel re-forms:", *reforms, sep="\n     ")
    print("  service restarts:", *restarts, sep="\n     ")

    # the brokers re-queue a dead worker's request, so the scheduler never retries a generation: every
    # batch is the one a fault-free run generates, and the final student is the same, bit for bit
    retries = sum(r["scheduler/retries"] for r in records)  # every step reports its retries
    assert retries == 0, [(r["step"], r["scheduler/retries"]) for r in records if r["scheduler/retries"]]
    clean = tmp_path / "clean"
    proc, _ = _start(tiny, clean)
    _finish(proc, clean)
    a = load_file(str(out / "final" / "model.safetensors"))
    b = load_file(str(clean / "final" / "model.safetensors"))
    diff = max((a[k].float() - b[k].float()).abs().max().item() for k in a)
    print(f"  scheduler retries: {retries:g}; max |chaos - fault-free| over the final weights: {diff:.3g}")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), diff


RELOAD_S = 40  # the injected reload: above the broker's no_worker_grace_s (30 s), which used to end the run
SINGLE_STEPS = 24


@pytest.mark.slow
def test_single_workers_wait_out_a_slow_reload_and_a_sigterm_keeps_the_last_step(tiny, tmp_path):
    """One rollout and one teacher worker; each is SIGKILLed once and its restart waits ``RELOAD_S``
    before loading (``GKD_INJECT_RELOAD_DELAY_S``, standing in for a 7B engine's minutes-long reload):
    the broker holds the requests (``worker_restart_grace_s``), the weight channel re-forms, the run goes
    on. Then SIGTERM to ``gkd train``: the trainer saves its last trained step and exits non-zero;
    ``resume=auto`` trains the rest, every batch once. ``pytest -s`` prints the timeline."""
    out = tmp_path / "single"
    single = ("teacher.workers=1", "rollout.workers=1", f"trainer.total_steps={SINGLE_STEPS}")
    proc, ports = _start(tiny, out, *single, env={**ENV, "GKD_INJECT_RELOAD_DELAY_S": str(RELOAD_S)})
    start, timeline = time.monotonic(), []
    try:
        for service, step in (("rollout", 4), ("teacher", 9)):
            backend = ports[f"{service}_backend"]
            (victim,) = _wait(lambda b=backend: len(_workers(b)) == 1 and _workers(b), 120, service, proc)
            _wait(lambda s=step: _steps_done(out) >= s, 150, f"step {step}", proc)
            killed_at, at_step = time.monotonic(), _steps_done(out)
            os.kill(victim, signal.SIGKILL)
            # k = 1: two batches may be answered already; the third needs the restarted worker
            _wait(lambda s=at_step: _steps_done(out) >= s + 3, RELOAD_S + 240, "the run going on", proc)
            timeline.append(
                {
                    "kill": f"{service} worker",
                    "at_s": round(killed_at - start, 1),
                    "at_step": at_step,
                    "trained_again_after_s": round(time.monotonic() - killed_at, 1),
                }
            )
        _wait(lambda: _steps_done(out) >= 14, 150, "step 14", proc)
        term_at, at_step = time.monotonic(), _steps_done(out)
        proc.send_signal(signal.SIGTERM)
        _finish(proc, out, want=1, timeout_s=180)
        timeline.append(
            {
                "sigterm": "gkd train",
                "at_s": round(term_at - start, 1),
                "at_step": at_step,
                "exited_after_s": round(time.monotonic() - term_at, 1),
            }
        )
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    stopped_at = _steps_done(out)
    saved = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert saved == [f"step_{stopped_at:06d}"], (saved, stopped_at)
    for t in timeline[:2]:  # the reload is waited out: at least RELOAD_S until training goes on
        assert t["trained_again_after_s"] >= RELOAD_S, timeline
    services = "".join((out / "logs" / f"{n}.log").read_text() for n in ("rollout", "teacher"))
    assert services.count("before loading (GKD_INJECT_RELOAD_DELAY_S)") == 2, services[-4000:]

    resumed_at = time.monotonic()
    proc, _ = _start(tiny, out, *single)
    _finish(proc, out)
    records = _records(out)
    assert [r["step"] for r in records] == list(range(SINGLE_STEPS))  # each batch once, in order
    assert all(r["staleness/max"] <= 1 for r in records)
    timeline.append(
        {"resume": f"from step {stopped_at}", "finished_after_s": round(time.monotonic() - resumed_at, 1)}
    )
    print(f"\nsingle-worker chaos timeline (reload delay {RELOAD_S}s; seconds from the first launch):")
    for t in timeline:
        print("  ", t)
