"""Run metrics: one JSONL line per step (always), TensorBoard scalars (optional), a console progress bar,
and a span recorder that writes every phase as a Chrome/Perfetto trace (``trace.json``; open it in
https://ui.perfetto.dev or chrome://tracing, or draw it with ``gkd timeline RUN_DIR``).

    spans = SpanRecorder(out / "trace.json")
    logger = MetricsLogger(out, total_steps=100, start_step=0, tensorboard=cfg.logging.tensorboard)
    with spans.span("update", process="trainer", lane="update", step=t):
        ...
    logger.log(t, {"actor/kl_loss": 0.3, "timing/step": 1.2, ...})
    logger.close(); spans.close()

Only trainer rank 0 creates these. Metric names are the ones in ``../shared/DESIGN.md`` (``METRIC_NAMES``).
Also here: Weights & Biases (:class:`WandbRun`, ``logging.wandb``), completion rows
(:func:`completion_rows`, ``completions.jsonl``) and the throughput figures (:func:`training_flops`,
:func:`service_throughput`; ``perf/mfu``'s peak and formula are gkd.metrics.flops', re-exported here).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import resource
import secrets
import sys
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from gkd.metrics.flops import measure_peak_tflops, mfu, resolve_peak_tflops

__all__ = [
    "METRIC_NAMES",
    "MetricsLogger",
    "SpanRecorder",
    "WandbRun",
    "completion_rows",
    "cpu_memory_used_gb",
    "max_memory_allocated_gb",
    "measure_peak_tflops",
    "metric_names",
    "mfu",
    "pack_lanes",
    "resolve_peak_tflops",
    "service_throughput",
    "training_flops",
]

METRIC_NAMES = (
    "timing/step",
    "timing/wait_prev_gen",
    "timing/wait_prev_teacher",
    "timing/sync_rollout_weights",
    "timing/get_teacher_knowledge",
    "timing/update_actor",
    "actor/kl_loss",
    "actor/grad_norm",
    "actor/lr",
    "response_seq_len/mean",
    "response_seq_len/max",
    "response_seq_len/min",
    "perf/throughput_tokens_per_s",
    "perf/cpu_memory_used_gb",
    "perf/max_memory_allocated_gb",
    "staleness/mean",
    "staleness/max",
    "rollout/policy_version",
)
_TWO_STEP = ("timing/wait_prev_prev_teacher",)
_GIB = float(1 << 30)


def metric_names(staleness: int) -> tuple[str, ...]:
    """The names each step of a run with staleness ``k`` reports (k >= 2 adds wait_prev_prev_teacher)."""
    return METRIC_NAMES + (_TWO_STEP if staleness >= 2 else ())


def cpu_memory_used_gb() -> float:
    """Host memory in use, GiB: ``MemTotal - MemAvailable`` (system-wide, as verl's metric of this name);
    where /proc/meminfo is missing, this process's peak RSS."""
    try:
        info = {}
        with open("/proc/meminfo") as f:
            for line in f:
                key, _, rest = line.partition(":")
                info[key] = int(rest.split()[0]) * 1024  # kB
        return (info["MemTotal"] - info["MemAvailable"]) / _GIB
    except (OSError, KeyError, ValueError, IndexError):
        return _peak_rss_gb()


def _peak_rss_gb() -> float:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / _GIB if sys.platform == "darwin" else rss * 1024 / _GIB  # bytes on macOS, kB on Linux


def max_memory_allocated_gb(device=None) -> float:
    """Peak memory allocated by tensors, GiB: ``torch.cuda.max_memory_allocated`` on a CUDA device (a
    host sync), else this process's peak RSS (CPU runs have no allocator counter)."""
    import torch

    if torch.cuda.is_available() and (device is None or torch.device(device).type == "cuda"):
        return torch.cuda.max_memory_allocated(device) / _GIB
    return _peak_rss_gb()


def _scalar(name: str, value: Any) -> float | int:
    if isinstance(value, bool | int):
        return int(value)
    try:
        return float(value)  # python/numpy floats and 0-d tensors (a host sync for device tensors)
    except (TypeError, ValueError) as e:
        raise TypeError(
            f"metric {name!r}: expected a number, got {type(value).__name__} {value!r:.60}"
        ) from e


class MetricsLogger:
    """Per-step metrics to ``OUTPUT_DIR/metrics.jsonl`` (always), ``OUTPUT_DIR/tensorboard`` (when
    ``tensorboard``) and a tqdm progress bar (steps, ETA, kl_loss, tokens/s, staleness).

    Lines already in the file with ``step >= start_step`` are dropped (a resume from the checkpoint of step
    ``start_step`` repeats the steps the interrupted run logged after it; a fresh run, ``start_step=0``,
    starts the file anew), so each step appears once. ``required``: metrics every ``log`` call must hold.
    """

    def __init__(
        self,
        output_dir: str | os.PathLike,
        *,
        total_steps: int | None = None,
        start_step: int = 0,
        tensorboard: bool = False,
        progress: bool = True,
        required: Sequence[str] = (),
        filename: str = "metrics.jsonl",
        wandb: WandbRun | None = None,
    ):
        self.output_dir = Path(output_dir)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.output_dir / filename
        self.completions_path = self.output_dir / "completions.jsonl"
        self.required = tuple(required)
        for path in (self.path, self.completions_path):
            if path.exists():
                _drop_from(path, start_step)
        # held for the run, closed in close(); line-buffered: a killed run keeps every whole line
        self._file = open(self.path, "a", buffering=1)  # noqa: SIM115
        self._completions = None  # opened by the first log_completions
        self._wandb = wandb
        self._tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as e:
                raise RuntimeError(
                    "logging.tensorboard=true needs the tensorboard package: pip install 'gkd[tensorboard]' "
                    "(or set logging.tensorboard=false; metrics.jsonl is written either way)"
                ) from e
            self._tb = SummaryWriter(
                log_dir=str(self.output_dir / "tensorboard"), purge_step=start_step or None
            )
        self._bar = None
        if progress:
            from tqdm import tqdm

            self._bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True)

    def log(self, step: int, metrics: Mapping[str, Any], *, check: bool = True) -> dict[str, Any]:
        """Write one step; returns the record written (``step``, ``time`` and the metrics as numbers).
        ``check=False``: a record outside the training steps (the evaluation before training, step -1)
        that need not hold the ``required`` metrics and does not move the progress bar."""
        missing = [n for n in self.required if n not in metrics] if check else []
        if missing:
            raise KeyError(f"step {step}: metrics missing {', '.join(missing)}")
        record: dict[str, Any] = {"step": int(step), "time": round(time.time(), 3)}
        for name, value in metrics.items():
            record[name] = _scalar(name, value)
        # NaN/inf are written as the JSON extensions NaN/Infinity (Python and pandas read them back)
        self._file.write(json.dumps(record) + "\n")
        if self._tb is not None:
            for name, value in record.items():
                if name not in ("step", "time"):
                    self._tb.add_scalar(name, value, global_step=step)
        if self._wandb is not None:
            self._wandb.log(step, record)
        if self._bar is not None and check:
            self._bar.set_postfix_str(self._postfix(record), refresh=False)
            self._bar.update(max(0, step + 1 - self._bar.n))
        return record

    @staticmethod
    def _postfix(r: Mapping[str, Any]) -> str:
        parts = []
        for key, label, fmt in [
            ("actor/kl_loss", "kl_loss", "{:.4f}"),
            ("perf/throughput_tokens_per_s", "tok/s", "{:.0f}"),
            ("staleness/mean", "staleness", "{:.2g}"),
        ]:
            v = r.get(key)
            if v is not None:
                parts.append(f"{label}={fmt.format(v) if math.isfinite(v) else v}")
        return " ".join(parts)

    def log_completions(self, step: int, rows: Sequence[Mapping[str, Any]]) -> None:
        """Rows of :func:`completion_rows` to ``completions.jsonl`` (one line each, with ``step``), and as
        a text table to TensorBoard (``completions``, markdown) and W&B when they are on."""
        if not rows:
            return
        if self._completions is None:
            self._completions = open(self.completions_path, "a", buffering=1)  # noqa: SIM115
        for row in rows:
            self._completions.write(json.dumps({"step": int(step), **row}) + "\n")
        columns = [c for c in rows[0] if c != "kl_per_token"]  # the per-token list stays in the JSONL
        if self._tb is not None:
            head = "| " + " | ".join(columns) + " |\n|" + "---|" * len(columns) + "\n"
            body = "".join("| " + " | ".join(_cell(r[c]) for c in columns) + " |\n" for r in rows)
            self._tb.add_text("completions", head + body, global_step=step)
        if self._wandb is not None:
            self._wandb.log_table(step, "completions", columns, [[r[c] for c in columns] for r in rows])

    def log_image(self, name: str, path: str | os.PathLike) -> None:
        """An image file (the timeline chart at the end of a run) to W&B, when it is on."""
        if self._wandb is not None and Path(path).is_file():
            self._wandb.log_image(name, path)

    def close(self) -> None:
        """Close every sink once, in this order, then the JSONL file; a second call does nothing."""
        sinks = (self._completions, self._wandb, self._bar, self._tb)
        self._completions = self._wandb = self._bar = self._tb = None
        for sink in sinks:
            if sink is not None:
                sink.close()
        if not self._file.closed:
            self._file.close()

    def __enter__(self) -> MetricsLogger:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _drop_from(path: Path, start_step: int) -> None:
    """Keep the lines of ``path`` with ``0 <= step < start_step`` (a fresh run, ``start_step=0``, keeps
    none: not even a previous run's evaluation before training, step -1)."""
    keep = []
    with open(path) as f:
        for line in f:
            try:
                step = json.loads(line)["step"]
            except (ValueError, KeyError, TypeError):
                continue  # a torn last line from a killed run
            if start_step > 0 and step < start_step:
                keep.append(line if line.endswith("\n") else line + "\n")
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(keep))
    os.replace(tmp, path)


def _cell(value: Any) -> str:
    text = f"{value:.4g}" if isinstance(value, float) else str(value)
    return text.replace("|", "\\|").replace("\n", " ")


# ------------------------------------------------------------------------------------ Weights & Biases


class WandbRun:
    """One W&B run for a training run (``logging.wandb``; ``pip install 'gkd[wandb]'``): every metrics
    record (the same numbers as ``metrics.jsonl``, at the same step), the resolved config once, the
    completion tables and, at the end, the timeline chart. ``mode``: online | offline (files under
    ``OUTPUT_DIR/wandb``, no network; ``wandb sync`` uploads them later) | disabled. The run id is kept in
    ``OUTPUT_DIR/wandb_run_id``, so a resumed run continues the same W&B run."""

    def __init__(
        self,
        output_dir: str | os.PathLike,
        *,
        project: str,
        name: str | None = None,
        mode: str = "online",
        config: Mapping[str, Any] | None = None,
    ):
        try:
            import wandb
        except ImportError as e:
            raise RuntimeError(
                "logging.wandb.enabled=true needs the wandb package: pip install 'gkd[wandb]' (or set "
                "logging.wandb.enabled=false; metrics.jsonl is written either way)"
            ) from e
        self._wandb = wandb
        out = Path(output_dir)
        out.mkdir(parents=True, exist_ok=True)
        id_file = out / "wandb_run_id"
        run_id = id_file.read_text().strip() if id_file.is_file() else secrets.token_hex(4)
        id_file.write_text(run_id + "\n")
        self.run = wandb.init(
            project=project,
            name=name,
            mode=mode,
            dir=str(out),
            id=run_id,
            resume="allow",
            config=dict(config or {}),
            settings=wandb.Settings(console="off", silent=True),
        )

    def log(self, step: int, record: Mapping[str, Any]) -> None:
        data = {k: v for k, v in record.items() if k not in ("step", "time")}
        # steps before 0 (the evaluation before training) go to W&B's step 0: its steps never go back
        self.run.log(data, step=max(int(step), 0))

    def log_table(self, step: int, name: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]):
        table = self._wandb.Table(columns=list(columns), data=[list(r) for r in rows])
        self.run.log({name: table}, step=max(int(step), 0))

    def log_image(self, name: str, path: str | os.PathLike) -> None:
        self.run.log({name: self._wandb.Image(str(path))})

    def close(self) -> None:
        self.run.finish()


# ------------------------------------------------------------------------------------ completions


def completion_rows(samples, outputs, decode, n: int) -> list[dict[str, Any]]:
    """The first ``n`` samples of a batch as rows for ``completions.jsonl``: ``prompt`` and ``response``
    (``decode(ids) -> str``), ``kl_per_token`` (per response token, ``log mu(y) - log p(y)``: the rollout
    policy's log-prob of the sampled token minus the teacher's, the one-sample estimate of
    KL(student || teacher) that needs no extra forward pass), ``kl_mean`` (its mean), ``top1_agreement``
    (share of response tokens that are the teacher's most likely token) and ``policy_version``."""
    import torch

    rows = []
    for s, o in list(zip(samples, outputs, strict=True))[:n]:
        r = len(s.response_ids)
        kl = (s.response_logprobs.float() - o.token_logprobs.float()).tolist() if r else []
        if r:
            top1 = o.topk_ids[torch.arange(r), o.topk_logprobs.float().argmax(dim=1)]
            agree = float((top1.long() == torch.as_tensor(list(s.response_ids))).float().mean())
        else:
            agree = float("nan")
        rows.append(
            {
                "prompt": decode(list(s.prompt_ids)),
                "response": decode(list(s.response_ids)),
                "kl_per_token": [round(x, 4) for x in kl],
                "kl_mean": sum(kl) / r if r else float("nan"),
                "top1_agreement": agree,
                "policy_version": int(s.policy_version),
            }
        )
    return rows


# ------------------------------------------------------------------------------------ throughput


def training_flops(config, seq_lens: Sequence[int], response_tokens: int) -> float:
    """Model FLOPs of one forward + backward over sequences of ``seq_lens`` tokens (prompt + response - 1
    each) whose ``response_tokens`` positions go through the lm_head (the fused loss), for a decoder
    ``config`` (``hidden_size``, ``num_hidden_layers``, ``intermediate_size``, ``vocab_size``, attention
    heads). Counted as 3x the forward's matmul FLOPs (backward = 2x forward), 2 FLOPs per multiply-add:
    per token ``6 * P_layers`` (the decoder layers' projections and MLP), per sequence of length L and
    layer ``6 * L^2 * hidden`` (causal QK^T and AV: L^2 / 2 pairs each), per response token
    ``6 * hidden * vocab`` (lm_head). Recomputation under gradient checkpointing is not model FLOPs."""
    h = int(config.hidden_size)
    layers = int(config.num_hidden_layers)
    heads = int(config.num_attention_heads)
    kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(config, "head_dim", None) or h // heads)
    ffn = int(getattr(config, "intermediate_size", None) or 4 * h)
    # q, o: h x heads*head_dim; k, v: h x kv_heads*head_dim; gated MLP: 3 matrices h x ffn
    per_layer = h * head_dim * (2 * heads + 2 * kv_heads) + 3 * h * ffn
    tokens = sum(seq_lens)
    attn = 6.0 * layers * heads * head_dim * sum(float(n) * n for n in seq_lens)
    return 6.0 * layers * per_layer * tokens + attn + 6.0 * h * int(config.vocab_size) * response_tokens


def service_throughput(samples, outputs) -> dict[str, float]:
    """``perf/rollout_tokens_per_s`` (response tokens generated per second of the rollout workers' own
    generation time) and ``perf/teacher_tokens_per_s`` (prompt + response tokens scored per second of the
    teacher workers' scoring time) of one batch, from the seconds the services report with each reply
    (``Sample.extra['service_s']``, ``TeacherOutput.service_s``: a request's time shared over its
    sequences). Per busy worker: requests that ran in parallel add their seconds. Absent when the service
    did not report its time. Also the support the teacher scored on: ``teacher/support_width`` (slots per
    position: K, or K + m + 1 with ``loss.support=union``) and ``teacher/union_share`` (the share of replies
    scored on the union; below 1 when an engine answered with its top-k instead, as vLLM does)."""
    out: dict[str, float] = {}
    if outputs:
        out["teacher/support_width"] = float(max(o.topk_ids.shape[1] for o in outputs))
        out["teacher/union_share"] = sum(o.support == "union" for o in outputs) / len(outputs)
    gen_s = sum(float(s.extra.get("service_s", 0.0)) for s in samples)
    if gen_s > 0:
        out["perf/rollout_tokens_per_s"] = sum(len(s.response_ids) for s in samples) / gen_s
    score_s = sum(float(getattr(o, "service_s", 0.0)) for o in outputs)
    if score_s > 0:
        scored = sum(len(s.prompt_ids) + len(s.response_ids) for s in samples)
        out["perf/teacher_tokens_per_s"] = scored / score_s
    return out


def pack_lanes(spans: Sequence[tuple[float, float]]) -> list[int]:
    """Greedy interval packing: for spans ``(start, end)``, a sub-lane index each such that spans sharing
    a sub-lane never overlap (sub-lane 0 for a lane whose spans are sequential)."""
    order = sorted(range(len(spans)), key=lambda i: (spans[i][0], spans[i][1]))
    ends: list[float] = []  # end time of the last span in each sub-lane
    out = [0] * len(spans)
    for i in order:
        start, end = spans[i]
        for lane, last in enumerate(ends):
            if last <= start:
                ends[lane] = end
                out[i] = lane
                break
        else:
            out[i] = len(ends)
            ends.append(end)
    return out


class SpanRecorder:
    """Phases as Chrome trace complete events (``"ph": "X"``, microseconds of wall-clock time).

    Each ``process`` (trainer, rollout, teacher, ...) becomes a trace pid and each ``lane`` (update, sync,
    generate, wait, ...) a tid; spans of one lane that overlap (two requests in flight) are spread over
    sub-lanes ``lane``, ``lane #2``... so the viewer never nests unrelated spans. Thread-safe. The file is
    rewritten atomically by ``flush`` (every ``flush_every_s``, and on ``close``); an existing file is
    extended, so a resumed run continues its trace.
    """

    def __init__(self, path: str | os.PathLike | None, *, flush_every_s: float = 10.0):
        self.path = Path(path) if path is not None else None
        self.flush_every_s = flush_every_s
        self._lock = threading.Lock()
        self._spans: list[dict[str, Any]] = []
        self._last_flush = time.monotonic()
        if self.path is not None and self.path.exists():
            self._spans = self._read_back(self.path)

    @staticmethod
    def _read_back(path: Path) -> list[dict[str, Any]]:
        try:
            events = json.loads(path.read_text())["traceEvents"]
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(
                f"{path}: not a Chrome trace written by gkd ({e}); move it away to start anew"
            ) from e
        out = []
        for ev in events:
            if ev.get("ph") == "X":
                args = dict(ev.get("args", {}))
                out.append(
                    {
                        "name": ev["name"],
                        "process": args.pop("process", str(ev["pid"])),
                        "lane": args.pop("lane", str(ev["tid"])),
                        "ts": ev["ts"],
                        "dur": ev["dur"],
                        "args": args,
                    }
                )
        return out

    @staticmethod
    def now() -> float:
        """The recorder's clock (seconds since the epoch), for :meth:`add`."""
        return time.time()

    def add(
        self,
        name: str,
        start: float,
        end: float,
        *,
        process: str = "trainer",
        lane: str | None = None,
        **args: Any,
    ) -> None:
        """Record a span measured elsewhere; ``start``/``end`` in seconds of :meth:`now`'s clock."""
        event = {
            "name": name,
            "process": process,
            "lane": lane or name,
            "ts": round(start * 1e6, 1),
            "dur": round(max(0.0, end - start) * 1e6, 1),
            "args": {k: v if isinstance(v, int | float | str | bool) else str(v) for k, v in args.items()},
        }
        with self._lock:
            self._spans.append(event)
            due = self.path is not None and time.monotonic() - self._last_flush >= self.flush_every_s
        if due:
            self.flush()

    @contextlib.contextmanager
    def span(
        self, name: str, *, process: str = "trainer", lane: str | None = None, **args: Any
    ) -> Iterator[None]:
        """Time the ``with`` body (recorded even if it raises)."""
        start, t0 = time.time(), time.perf_counter()
        try:
            yield
        finally:
            self.add(name, start, start + time.perf_counter() - t0, process=process, lane=lane, **args)

    def events(self) -> list[dict[str, Any]]:
        """The trace events: ``M`` metadata naming pids/tids, then ``X`` spans."""
        with self._lock:
            spans = list(self._spans)
        procs: dict[str, int] = {}
        lanes: dict[tuple[str, str], list[int]] = {}
        for i, s in enumerate(spans):
            procs.setdefault(s["process"], len(procs) + 1)
            lanes.setdefault((s["process"], s["lane"]), []).append(i)
        out: list[dict[str, Any]] = []
        for proc, pid in procs.items():
            out.append({"name": "process_name", "ph": "M", "pid": pid, "tid": 0, "args": {"name": proc}})
            out.append(
                {"name": "process_sort_index", "ph": "M", "pid": pid, "tid": 0, "args": {"sort_index": pid}}
            )
        tid = 0
        for (proc, lane), idx in lanes.items():
            sub = pack_lanes([(spans[i]["ts"], spans[i]["ts"] + spans[i]["dur"]) for i in idx])
            tids = {}
            for k in sorted(set(sub)):
                tid += 1
                tids[k] = tid
                label = lane if k == 0 else f"{lane} #{k + 1}"
                meta = {"pid": procs[proc], "tid": tid}
                out.append({"name": "thread_name", "ph": "M", **meta, "args": {"name": label}})
                out.append({"name": "thread_sort_index", "ph": "M", **meta, "args": {"sort_index": tid}})
            for i, k in zip(idx, sub, strict=True):
                s = spans[i]
                out.append(
                    {
                        "name": s["name"],
                        "cat": s["lane"],
                        "ph": "X",
                        "ts": s["ts"],
                        "dur": s["dur"],
                        "pid": procs[proc],
                        "tid": tids[k],
                        "args": {"process": proc, "lane": lane, **s["args"]},
                    }
                )
        return out

    def flush(self) -> None:
        if self.path is None:
            return
        trace = {"traceEvents": self.events(), "displayTimeUnit": "ms"}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(trace))
        os.replace(tmp, self.path)  # readers never see half a file
        self._last_flush = time.monotonic()

    def close(self) -> None:
        self.flush()
