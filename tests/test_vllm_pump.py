"""``gkd.services.vllm.RequestPump`` (one vLLM engine fed from a queue) on a stand-in ``LLMEngine``: requests
from several threads run in one batch, engine-wide keys (the logit scale) never mix within a batch,
cancellation aborts only the cancelled caller's requests, calls run between steps with nothing running."""

from __future__ import annotations

import threading
from types import SimpleNamespace

import pytest

from gkd.services.vllm import RequestPump

WAIT_S = 30


class FakeEngine:
    """Each request emits one token per ``step``; it finishes after ``params.max_tokens`` tokens. Records
    the batch of every step and the key set at the time."""

    def __init__(self):
        self.running: dict[str, list] = {}
        self.params: dict[str, SimpleNamespace] = {}
        self.key = None
        self.steps: list[tuple[object, list[str]]] = []
        self.aborted: list[str] = []
        self.fail_next = False
        self.mixed: list[str] = []  # requests that ran under another key than their own

    def add_request(self, rid, prompt, params):
        self.running[rid], self.params[rid] = [], params
        self.prompt = prompt

    def has_unfinished_requests(self):
        return bool(self.running)

    def abort_request(self, ids):
        self.aborted += ids
        for rid in ids:
            self.running.pop(rid, None)

    def step(self):
        if self.fail_next:
            raise RuntimeError("engine core died")
        self.steps.append((self.key, sorted(self.running)))
        self.mixed += [rid for rid in self.running if getattr(self.params[rid], "key", self.key) != self.key]
        out = []
        for rid, tokens in list(self.running.items()):
            tokens.append(len(tokens))
            done = len(tokens) >= self.params[rid].max_tokens
            out.append(SimpleNamespace(request_id=rid, finished=done, tokens=list(tokens)))
            if done:
                del self.running[rid]
        return out


def _pump():
    engine = FakeEngine()
    return engine, RequestPump(engine, set_key=lambda k: setattr(engine, "key", k))


def _hold(pump):
    """Keep the engine thread in a call until the returned event is set (requests queue up meanwhile)."""
    release, entered = threading.Event(), threading.Event()

    def blocker():
        entered.set()
        assert release.wait(WAIT_S)

    threading.Thread(target=pump.call, args=(blocker,), daemon=True).start()
    assert entered.wait(WAIT_S)
    return release


def _run_threads(pump, jobs):
    results, errors = {}, {}

    def go(i, n, key, cancel):
        try:
            results[i] = pump.run(
                [f"p{i}"] * n,
                [SimpleNamespace(max_tokens=5 + i, key=key) for _ in range(n)],
                key=key,
                cancel=cancel,
                cancelled=lambda: TimeoutError("cancelled"),
            )
        except BaseException as e:
            errors[i] = e

    threads = [threading.Thread(target=go, args=(i, *job), daemon=True) for i, job in enumerate(jobs)]
    for t in threads:
        t.start()
    return threads, results, errors


def _join(threads):
    for t in threads:
        t.join(WAIT_S)
        assert not t.is_alive()


def test_concurrent_callers_share_one_batch():
    engine, pump = _pump()
    release = _hold(pump)
    threads, results, errors = _run_threads(pump, [(1, 1.0, None)] * 4)
    while len(pump._waiting) < 4:
        threading.Event().wait(0.01)
    release.set()
    _join(threads)
    assert not errors and pump.max_running == 4
    assert len(engine.steps[0][1]) == 4  # the first step ran all four callers' requests
    for i, outs in results.items():
        assert len(outs) == 1 and outs[0].tokens == list(range(5 + i))
    pump.close()


def test_keys_never_mix_within_a_step_and_arrival_order_is_kept():
    engine, pump = _pump()
    release = _hold(pump)
    threads, results, errors = _run_threads(pump, [(2, 1.0, None), (1, 0.5, None), (2, 1.0, None)])
    while len(pump._waiting) < 3:
        threading.Event().wait(0.01)
    release.set()
    _join(threads)
    assert not errors and len(results) == 3
    assert engine.mixed == [] and all(ids for _, ids in engine.steps)
    keys_in_order = [k for i, (k, _) in enumerate(engine.steps) if i == 0 or engine.steps[i - 1][0] != k]
    assert keys_in_order[:2] == [1.0, 0.5]  # the 0.5 caller waited for the drain, not behind the 3rd
    pump.close()


def test_a_cancelled_caller_is_aborted_and_the_others_finish():
    engine, pump = _pump()
    release = _hold(pump)
    cancel = threading.Event()
    slow = SimpleNamespace(max_tokens=10**9)
    errors = {}

    def cancelled_caller():
        try:
            pump.run(["x"], [slow], cancel=cancel, cancelled=lambda: TimeoutError("withdrawn"))
        except TimeoutError as e:
            errors["c"] = e

    t = threading.Thread(target=cancelled_caller, daemon=True)
    t.start()
    threads, results, other_errors = _run_threads(pump, [(1, None, None)])
    while len(pump._waiting) < 2:
        threading.Event().wait(0.01)
    release.set()
    while not engine.steps:
        threading.Event().wait(0.01)
    cancel.set()
    _join([t, *threads])
    assert "withdrawn" in str(errors["c"]) and len(engine.aborted) == 1
    assert not other_errors and results[0][0].tokens == list(range(5))
    assert not engine.running
    pump.close()


def test_calls_run_with_nothing_running_and_failures_reach_every_caller():
    engine, pump = _pump()
    seen = []
    threads, _, _ = _run_threads(pump, [(1, None, None)])
    assert pump.call(lambda: seen.append(len(engine.running)) or 7) == 7
    _join(threads)
    assert seen == [0]
    cancel = threading.Event()
    long = threading.Thread(
        target=lambda: pytest.raises(
            TimeoutError,
            pump.run,
            ["p"],
            [SimpleNamespace(max_tokens=10**9)],
            cancel=cancel,
            cancelled=lambda: TimeoutError(),
        ),
        daemon=True,
    )
    long.start()
    while not engine.running:
        threading.Event().wait(0.01)
    assert pump.call(lambda: len(engine.running), drain=False) == 1  # a status poll: no drain
    cancel.set()
    _join([long])
    engine.fail_next = True
    with pytest.raises(RuntimeError, match="engine core died"):
        pump.run(["p"], [SimpleNamespace(max_tokens=3)])
    pump.close()
    with pytest.raises(RuntimeError, match="closed"):
        pump.run(["p"], [SimpleNamespace(max_tokens=3)])
