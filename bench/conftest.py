"""Benchmark-suite setup: collection of ``bench_*.py``, quick mode, planted regressions, a session record.

- ``pytest bench/`` collects ``bench_<topic>.py`` files (the test suite's ``python_files`` pattern does
  not match them); files named on the command line are collected by pytest itself, not twice.
- ``GKD_BENCH_QUICK=1``: every benchmark uses its small shapes and few rounds (read by each module).
- ``GKD_BENCH_PLANT=name[,name]``: a regression planted on purpose, to show that
  ``scripts/bench_check.sh`` catches it (read here only, never by gkd):
  ``fused_rows32``: the fused lm_head losses run in 32-row chunks (their GEMMs re-read the weight per chunk).
- ``GKD_BENCH_SESSION=FILE`` (set by scripts/bench_check.py): the selected tests, the skipped ones with
  their reasons and the failed ones are written there as JSON at the end of the session, so that a
  baseline whose benchmark was skipped reads SKIP, not MISSING.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

# Triton kernels run in the interpreter without CUDA; set before any module defines a @triton.jit function.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def _plant_fused_rows32(mp: pytest.MonkeyPatch) -> None:
    import gkd.kernels.fused_linear as fused_linear

    mp.setattr(fused_linear, "fused_chunk_rows", lambda *args, **kwargs: 32)


PLANTS = {"fused_rows32": _plant_fused_rows32}
_SESSION: dict = {"selected": [], "skipped": {}, "failed": []}


def _plants() -> list[str]:
    names = [n.strip() for n in os.environ.get("GKD_BENCH_PLANT", "").split(",") if n.strip()]
    unknown = [n for n in names if n not in PLANTS]
    if unknown:
        raise pytest.UsageError(
            f"GKD_BENCH_PLANT={os.environ['GKD_BENCH_PLANT']}: unknown plant {', '.join(unknown)}; "
            f"valid: {', '.join(PLANTS)} (unset it for a normal run)"
        )
    return names


def pytest_configure(config):
    config._gkd_plant_mp = pytest.MonkeyPatch()
    for name in _plants():
        PLANTS[name](config._gkd_plant_mp)


def pytest_unconfigure(config):
    mp = getattr(config, "_gkd_plant_mp", None)
    if mp is not None:
        mp.undo()


def pytest_report_header(config):
    quick = os.environ.get("GKD_BENCH_QUICK") == "1"
    lines = [f"gkd benchmarks: {'quick' if quick else 'full'} mode (GKD_BENCH_QUICK={int(quick)})"]
    if _plants():
        lines.append(f"gkd benchmarks: PLANTED REGRESSION active: GKD_BENCH_PLANT={','.join(_plants())}")
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
        record = {**_SESSION, "quick": os.environ.get("GKD_BENCH_QUICK") == "1", "plants": _plants()}
        Path(out).write_text(json.dumps(record, indent=2))
