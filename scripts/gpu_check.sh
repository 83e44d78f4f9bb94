#!/usr/bin/env bash
# The GPU proof run, one command on one GPU machine without network (about 8 minutes at most):
#   scripts/gpu_check.sh --out DIR      # DIR: default $OUT if set, else bench/results/
#   scripts/gpu_check.sh --dry-run      # here: prerequisites (.whl/, sizes), the plan, each step's timeout
# First, on a machine with network: scripts/gpu_wheels.sh (the missing wheels into .whl/); copy the tree
# and .whl/ to the GPU machine. The steps and their timeouts are in scripts/gpu_check.py.
set -euo pipefail
cd "$(dirname "$0")/.."
exec "${PYTHON:-python3}" scripts/gpu_check.py "$@"
