"""What the benchmarks share: quick mode, interleaved timing, and the recorded results' files.

The benchmark files import it as ``bench._common`` (the project root is on pytest's ``pythonpath``); it is
not a ``bench_*.py`` file, so the suite does not collect it."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path

QUICK = os.environ.get("GKD_BENCH_QUICK") == "1"
RESULTS = Path(__file__).resolve().parent / "results"


def interleaved_times(
    fns: dict[str, Callable[[], object]], rounds: int, *, settle_s: float = 0.0
) -> dict[str, list[float]]:
    """Seconds of each call of each function, called round-robin ``rounds`` times after one warm-up call
    each (in ``fns``' order), so that a noisy machine's drift hits every variant alike and their ratios
    stay comparable. ``settle_s``: a pause before each timed call (for OpenMP threads left spin-waiting)."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            if settle_s:
                time.sleep(settle_s)
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return times


def rounded(times: dict[str, list[float]]) -> dict[str, list[float]]:
    """Every timing to 0.1 ms, for a report's ``all_s``."""
    return {k: [round(t, 4) for t in v] for k, v in times.items()}


def record(name: str, key: str, report: dict) -> None:
    """Merge ``report`` under ``key`` into ``bench/results/<name>.json`` (created with its folder)."""
    path = RESULTS / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    data = json.loads(path.read_text()) if path.exists() else {}
    data[key] = report
    path.write_text(json.dumps(data, indent=2) + "\n")
