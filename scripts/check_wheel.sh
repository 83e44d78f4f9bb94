#!/usr/bin/env bash
# Packaging check (a CI stage): `python -m build` makes the sdist and, from it, the wheel, each in pip's
# default isolated build environment (build-system.requires); the wheel goes into a clean venv with its
# dependencies, and a small fused-loss computation runs there, outside the source tree, with the
# compiled extension loaded (gkd.weights.native.HAS_EXT) when GKD_REQUIRE_EXT=1.
# Usage: scripts/check_wheel.sh [WORKDIR]  (default: a temp folder, removed afterwards).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
export PIP_DISABLE_PIP_VERSION_CHECK=1
py="${PYTHON:-python3}"
start=$(date +%s)
if [ $# -ge 1 ]; then
  work=$1
  mkdir -p "$work"
else
  work=$(mktemp -d)
  trap 'rm -rf "$work"' EXIT
fi

.venv/bin/python -m build --outdir "$work/dist" . >"$work/build.log" 2>&1 || {
  tail -40 "$work/build.log" >&2
  echo "check_wheel: python -m build failed (log above)" >&2
  exit 1
}
sdist=$(ls "$work"/dist/gkd-*.tar.gz)
wheel=$(ls "$work"/dist/gkd-*.whl)
members=$(tar -tzf "$sdist")
for member in CMakeLists.txt LICENSE csrc/bindings.cpp; do
  grep -q "/$member\$" <<<"$members" || { echo "check_wheel: $member missing from $sdist" >&2; exit 1; }
done
if grep -q "gkd: WARNING" "$work/build.log"; then
  grep "gkd: WARNING" "$work/build.log" >&2
fi
echo "check_wheel: built $(basename "$sdist") and $(basename "$wheel") in $(( $(date +%s) - start ))s" >&2

rm -rf "$work/venv"
"$py" -m venv "$work/venv"
"$work/venv/bin/python" -m pip install -q "$wheel"
cd "$work"  # not the source tree: gkd must come from the installed wheel
GKD_SMOKE_REQUIRE_EXT="${GKD_REQUIRE_EXT:-0}" "$work/venv/bin/python" "$root/scripts/wheel_smoke.py"
echo "check_wheel: done in $(( $(date +%s) - start ))s" >&2
