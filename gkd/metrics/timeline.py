"""``gkd timeline RUN_DIR -o timeline.png``: the spans of a run's ``trace.json`` as a Gantt chart, one row
per process lane (trainer/update, rollout/generate, teacher/score, ...), so that overlapping phases are
visible at a glance. Spans of one lane that overlap each other get their own sub-rows."""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from gkd.metrics.records import pack_lanes
from gkd.services.inputs import InputError, writable_folder

__all__ = ["Row", "add_timeline_cli", "draw_timeline", "read_rows"]

_SPAN_KEYS = {"name", "ts", "pid", "tid"}  # what a complete ("X") event needs to be drawn
_FORMATS = (".png", ".pdf", ".svg")

# one colour per phase family, matched on the span name's prefix; anything else cycles through tab10
_COLOURS = {
    "generate": "#4C72B0",
    "score": "#DD8452",
    "teacher": "#DD8452",
    "update": "#55A868",
    "sync": "#C44E52",
    "wait": "#BBBBBB",
    "save": "#8172B3",
    "checkpoint": "#8172B3",
}


@dataclass
class Row:
    label: str  # "process / lane" (plus " #2"... for a sub-row of overlapping spans)
    spans: list[tuple[str, float, float, str]] = field(default_factory=list)  # (name, start_s, end_s, tag)


def read_rows(trace_path: str | Path) -> list[Row]:
    """Complete (``X``) events of a Chrome trace -> rows in trace order, times in seconds from the first
    span. Rows come from the trace's process/thread names; overlapping spans in a row are split further."""
    path = Path(trace_path)
    try:
        trace = json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"no trace at {path} (runs write OUTPUT_DIR/trace.json)") from None
    except ValueError as e:  # UnicodeDecodeError too
        raise InputError(f"{path}: not JSON ({e}); give a trace.json written by a gkd run") from e
    events = trace.get("traceEvents") if isinstance(trace, dict) else trace
    if not isinstance(events, list) or not all(isinstance(ev, dict) for ev in events):
        raise InputError(f"{path}: not a Chrome trace (a list of event objects, or {{'traceEvents': [...]}})")
    pname, tname = {}, {}
    for ev in events:
        if ev.get("ph") == "M" and ev.get("name") == "process_name":
            pname[ev["pid"]] = ev["args"]["name"]
        elif ev.get("ph") == "M" and ev.get("name") == "thread_name":
            tname[(ev["pid"], ev["tid"])] = ev["args"]["name"]
    spans = [ev for ev in events if ev.get("ph") == "X"]
    if not spans:
        raise InputError(f"{path}: no spans (complete events) to draw")
    bad = next((ev for ev in spans if not ev.keys() >= _SPAN_KEYS), None)
    if bad is not None:
        raise InputError(f"{path}: a span lacks {', '.join(sorted(_SPAN_KEYS - bad.keys()))}: {bad!r:.120}")
    t0 = min(float(ev["ts"]) for ev in spans)
    lanes: dict[tuple, list[tuple[str, float, float, str]]] = defaultdict(list)
    for ev in sorted(spans, key=lambda e: (e["pid"], e["tid"])):
        start = (float(ev["ts"]) - t0) / 1e6
        end = start + float(ev.get("dur", 0)) / 1e6
        lanes[(ev["pid"], ev["tid"])].append((ev["name"], start, end, _tag(ev.get("args", {}))))
    rows = []
    for (pid, tid), lane_spans in lanes.items():
        label = f"{pname.get(pid, pid)} / {tname.get((pid, tid), tid)}"
        sub = pack_lanes([(s, e) for _, s, e, _ in lane_spans])
        group = [Row(label if k == 0 else f"{label} #{k + 1}") for k in range(max(sub) + 1)]
        for span, k in zip(lane_spans, sub, strict=True):
            group[k].spans.append(span)
        rows.extend(group)
    return rows


def _tag(args: dict) -> str:
    """A short label for a bar: the batch or step the span belongs to."""
    for key, short in (("batch", "b"), ("step", "s")):
        if key in args:
            return f"{short}{args[key]}"
    return ""


def _colour(name: str, others: dict[str, str]) -> str:
    for prefix, colour in _COLOURS.items():
        if name.startswith(prefix):
            return colour
    if name not in others:
        import matplotlib

        others[name] = matplotlib.colormaps["tab10"](len(others) % 10)
    return others[name]


def draw_timeline(trace_path: str | Path, out_png: str | Path, *, title: str | None = None) -> list[Row]:
    """Draw ``trace_path`` as a Gantt chart into ``out_png``; returns the rows drawn (top to bottom)."""
    import matplotlib

    matplotlib.use("Agg", force=True)  # files only; never needs a display
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    rows = read_rows(trace_path)
    end = max(e for r in rows for _, _, e, _ in r.spans) or 1.0
    fig, ax = plt.subplots(figsize=(14, 1.2 + 0.45 * len(rows)), dpi=100)
    others: dict[str, str] = {}
    legend: dict[str, str] = {}
    for y, row in enumerate(rows):
        for name, s, e, tag in row.spans:
            colour = _colour(name, others)
            legend.setdefault(name, colour)
            w = max(e - s, end * 1e-4)
            ax.barh(y, w, left=s, height=0.7, color=colour, edgecolor="black", linewidth=0.3)
            if tag and (e - s) > end * 0.02:  # label only bars wide enough to hold it
                ax.text((s + e) / 2, y, tag, ha="center", va="center", fontsize=7, clip_on=True)
    ax.set_yticks(range(len(rows)), [r.label for r in rows])
    ax.invert_yaxis()
    ax.set_xlim(0, end * 1.01)
    ax.set_xlabel("seconds since the first span")
    ax.grid(axis="x", alpha=0.3)
    ax.set_title(title or str(trace_path))
    handles = [Patch(color=c, label=n) for n, c in list(legend.items())[:12]]
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize="small")
    fig.tight_layout()
    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)
    return rows


def _trace_of(run: str) -> Path:
    """RUN_DIR (its trace.json) or a trace file, which must exist."""
    src = Path(run)
    if src.is_dir() and not (src / "trace.json").is_file():
        raise InputError(
            f"RUN_DIR {run}: no trace.json in this folder (runs write it with logging.trace=true)"
        )
    if not src.exists():
        raise InputError(
            f"RUN_DIR {run}: no such folder or file; give a run's trainer.output_dir or a trace.json"
        )
    return src / "trace.json" if src.is_dir() else src


def _timeline(args: argparse.Namespace) -> int:
    trace = _trace_of(args.run)
    out = Path(args.output) if args.output else trace.with_name("timeline.png")
    if out.suffix.lower() not in _FORMATS:
        raise InputError(
            f"--output {out}: the chart is written as {', '.join(_FORMATS)}; end the name with one"
        )
    writable_folder(str(out.parent), "--output")
    rows = draw_timeline(trace, out)
    print(f"{out}: {sum(len(r.spans) for r in rows)} spans in {len(rows)} rows")
    return 0


def add_timeline_cli(sub: argparse._SubParsersAction) -> None:
    """Register ``gkd timeline RUN_DIR [-o timeline.png]``."""
    p = sub.add_parser("timeline", help="draw a run's trace.json as a Gantt chart (PNG)")
    p.add_argument("run", metavar="RUN_DIR", help="a run's output_dir (or a trace.json file)")
    p.add_argument(
        "-o", "--output", default=None, help="PNG (or .pdf, .svg) to write (default: RUN_DIR/timeline.png)"
    )
    p.set_defaults(func=_timeline)
