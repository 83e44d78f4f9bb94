#!/usr/bin/env bash
# The benchmark regression check: runs pytest bench/ and compares every ratio with this CPU's table in
# bench/baselines/cpu.json (NO-BASELINE, not a failure, on a CPU without one).
#   scripts/bench_check.sh [--quick] [--json OUT] [--baselines FILE] [--machine FP] [--update] [-- extra pytest args]
# See scripts/bench_check.py for the verdicts; exit status 1 on a regression.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
[ -x "$PY" ] || PY=python3
exec "$PY" scripts/bench_check.py "$@"
