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
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import resource
import sys
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "METRIC_NAMES",
    "MetricsLogger",
    "SpanRecorder",
    "cpu_memory_used_gb",
    "max_memory_allocated_gb",
    "metric_names",
    "pack_lanes",
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
    ):
        self.output_dir = Path(output_dir)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.output_dir / filename
        self.required = tuple(required)
        if self.path.exists():
            self._drop_from(start_step)
        # held for the run, closed in close(); line-buffered: a killed run keeps every whole line
        self._file = open(self.path, "a", buffering=1)  # noqa: SIM115
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

    def _drop_from(self, start_step: int) -> None:
        keep = []
        with open(self.path) as f:
            for line in f:
                try:
                    step = json.loads(line)["step"]
                except (ValueError, KeyError, TypeError):
                    continue  # a torn last line from a killed run
                if step < start_step:
                    keep.append(line if line.endswith("\n") else line + "\n")
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text("".join(keep))
        os.replace(tmp, self.path)

    def log(self, step: int, metrics: Mapping[str, Any]) -> dict[str, Any]:
        """Write one step; returns the record written (``step``, ``time`` and the metrics as numbers)."""
        missing = [n for n in self.required if n not in metrics]
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
        if self._bar is not None:
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

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if not self._file.closed:
            self._file.close()

    def __enter__(self) -> MetricsLogger:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


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
