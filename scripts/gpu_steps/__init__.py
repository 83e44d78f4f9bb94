"""The bodies of the GPU proof run's steps (``scripts/gpu_check.py`` runs each in its own process, under
its own timeout, through the entry point ``python scripts/gpu_check_steps.py STEP [options] --json FILE``).

Each step writes ``{"status": "PASS" | "FAIL", "headline": one line, ...figures}`` to ``--json`` and exits
0 when it ran to the end (a FAIL status included), non-zero when it crashed. Steps import torch and gkd
lazily, so ``setup`` runs before either is importable from the site dir.

Modules: ``common`` (shared helpers), ``base`` (install, environment, extension, tests, trainer, weights),
``rows`` (generation, receive, guard, checkpoint), ``e2e`` (``gkd train`` on one GPU). Imports run one way:
``common`` <- ``base``, ``e2e`` <- ``rows`` <- this module.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from gpu_steps.base import (
    step_e2e,
    step_environment,
    step_extension,
    step_setup,
    step_tests,
    step_trainer,
    step_trainer_rank,
    step_weights,
)


def _row(name: str):
    """A step whose body lives in gpu_steps/rows.py (imported when the step runs)."""

    def run(args) -> dict:
        from gpu_steps import rows

        return getattr(rows, "step_" + name.replace("-", "_"))(args)

    return run


STEPS = {
    "setup": step_setup,
    "environment": step_environment,
    "extension": step_extension,
    "tests": step_tests,
    "trainer": step_trainer,
    "trainer-rank": step_trainer_rank,
    "weights": step_weights,
    "e2e": step_e2e,
    **{name: _row(name) for name in ("generation", "receive", "guard", "checkpoint", "checkpoint-rank")},
}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="one step of the GPU proof run")
    p.add_argument("step", choices=sorted(STEPS))
    p.add_argument("--json", required=True, help="where the step writes its figures")
    p.add_argument("--site", help="setup: the temp site dir (pip --target)")
    p.add_argument("--wheels", help="setup: the folder of wheels")
    p.add_argument("--log", help="setup: write the build log here; extension: read it")
    p.add_argument("--work", help="e2e, checkpoint: scratch folder for models, runs and checkpoints")
    p.add_argument(
        "--budget",
        type=float,
        default=float(os.environ.get("GKD_CHECK_BUDGET_S", 110)),
        help="e2e: seconds for both runs (default: the step's timeout from the driver, less 5)",
    )
    p.add_argument("paths", nargs="*", help="tests: pytest paths")
    args = p.parse_args(argv)
    result = STEPS[args.step](args)
    Path(args.json).write_text(json.dumps(result, indent=1, default=str) + "\n")
    print(f"[{args.step}] {result['status']}: {result.get('headline', '')}", flush=True)
    return 0
