"""Benchmark-suite setup: collection of ``bench_*.py``, quick mode, planted regressions, a session record.

- ``pytest bench/`` collects ``bench_<topic>.py`` files (the test suite's ``python_files`` pattern does
  not match them); files named on the command line are collected by pytest itself, not twice.
- ``GKD_BENCH_QUICK=1``: every benchmark uses its small shapes and few rounds (read by each module).
- ``GKD_BENCH_PLANT=name[,name]``: a regression planted on purpose, to show that
  ``scripts/bench_check.sh`` catches it (read here only, never by gkd):
  ``fused_rows<R>`` (e.g. ``fused_rows8``): the fused lm_head losses run in R-row chunks (each chunk's
  GEMMs re-read the whole weight; on one CPU thread 8-row chunks make bench_losses' fused loss ~2.2x
  slower, 32-row chunks only ~1.2x);
  ``decode_sleep<MS>`` (e.g. ``decode_sleep20``): ``HFRolloutEngine`` sleeps MS milliseconds per decode
  step (in its sampling call), as a slow sampling loop would.
- ``GKD_BENCH_SESSION=FILE`` (set by scripts/bench_check.py): the selected tests, the skipped ones with
  their reasons and the failed ones are written there as JSON at the end of the session, so that a
  baseline whose benchmark was skipped reads SKIP, not MISSING.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

# Triton kernels run in the interpreter without CUDA; set before any module defines a @triton.jit function.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def _plant_fused_rows(mp: pytest.MonkeyPatch, rows: str) -> None:
    import gkd.kernels.fused_linear as fused_linear

    mp.setattr(fused_linear, "fused_chunk_rows", lambda *args, **kwargs: int(rows))


def _plant_decode_sleep(mp: pytest.MonkeyPatch, ms: str) -> None:
    import time

    import gkd.rollout.hf_engine as hf_engine

    sample_rows = hf_engine.sample_rows

    def slow_sample_rows(*args, **kwargs):
        time.sleep(int(ms) / 1000)
        return sample_rows(*args, **kwargs)

    mp.setattr(hf_engine, "sample_rows", slow_sample_rows)


PLANTS = {  # name pattern -> plant(mp, *groups)
    r"fused_rows([1-9][0-9]*)": _plant_fused_rows,
    r"decode_sleep([1-9][0-9]*)": _plant_decode_sleep,
}
_SESSION: dict = {"selected": [], "skipped": {}, "failed": []}


def _plants() -> list[tuple[str, Callable, tuple[str, ...]]]:
    """(name, plant, pattern groups) for each name in GKD_BENCH_PLANT; an unknown name is a usage error."""
    found = []
    for name in (n.strip() for n in os.environ.get("GKD_BENCH_PLANT", "").split(",")):
        if not name:
            continue
        match = next(((p, m) for pat, p in PLANTS.items() if (m := re.fullmatch(pat, name))), None)
        if match is None:
            raise pytest.UsageError(
                f"GKD_BENCH_PLANT={os.environ['GKD_BENCH_PLANT']}: unknown plant {name}; "
                f"valid: fused_rows<R> (e.g. fused_rows8), decode_sleep<MS> (e.g. decode_sleep20); "
                "unset it for a normal run"
            )
        found.append((name, match[0], match[1].groups()))
    return found


def pytest_configure(config):
    config._gkd_plant_mp = pytest.MonkeyPatch()
    for _, plant, groups in _plants():
        plant(config._gkd_plant_mp, *groups)


def pytest_unconfigure(config):
    mp = getattr(config, "_gkd_plant_mp", None)
    if mp is not None:
        mp.undo()


def pytest_report_header(config):
    quick = os.environ.get("GKD_BENCH_QUICK") == "1"
    lines = [f"gkd benchmarks: {'quick' if quick else 'full'} mode (GKD_BENCH_QUICK={int(quick)})"]
    if _plants():
        names = ",".join(name for name, _, _ in _plants())
        lines.append(f"gkd benchmarks: PLANTED REGRESSION active: GKD_BENCH_PLANT={names}")
    return lines


def pytest_collect_file(file_path: Path, parent):
    if (
        file_path.suffix == ".py"
        and file_path.name.startswith("bench_")
        and file_path.parent == Path(__file__).parent
        and not parent.session.isinitpath(file_path)
    ):
        return pytest.Module.from_parent(parent, path=file_path)
    return None


def _test_id(nodeid: str) -> str:
    """``bench/bench_x.py::test_y[id]`` -> ``bench_x.py::test_y[id]`` (the key prefix of its ratios)."""
    path, sep, rest = nodeid.partition("::")
    return Path(path).name + sep + rest


def pytest_collection_finish(session):
    _SESSION["selected"] = [_test_id(item.nodeid) for item in session.items]


def pytest_runtest_logreport(report):
    if report.skipped:
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        _SESSION["skipped"][_test_id(report.nodeid)] = reason.removeprefix("Skipped: ")
    elif report.failed:
        _SESSION["failed"].append(_test_id(report.nodeid))


def pytest_sessionfinish(session, exitstatus):
    out = os.environ.get("GKD_BENCH_SESSION")
    if out:
        plants = [name for name, _, _ in _plants()]
        record = {**_SESSION, "quick": os.environ.get("GKD_BENCH_QUICK") == "1", "plants": plants}
        Path(out).write_text(json.dumps(record, indent=2))
