#!/usr/bin/env bash
# Downloads into .whl/ (git-ignored) the py3.12 manylinux wheels that the GPU proof run
# (scripts/gpu_check.sh) installs on a GPU machine without network: the packages gkd needs that such a
# machine lacks, at the versions pyproject.toml pins, plus liger-kernel for the side-by-side benchmark.
# The list comes from scripts/gpu_check.py (--wheels). Run it here, where pip reaches a package index.
set -euo pipefail
cd "$(dirname "$0")/.."
py="${PYTHON:-python3}"
pip=(.venv/bin/python -m pip)
[ -x .venv/bin/python ] || pip=("$py" -m pip)
mapfile -t specs < <("$py" scripts/gpu_check.py --wheels)
rm -rf .whl
mkdir -p .whl
"${pip[@]}" download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl "${specs[@]}"
ls -l .whl
"$py" scripts/gpu_check.py --check-wheels
