#!/usr/bin/env bash
# Configures and builds moelab into build/ (the CUDA backend too when nvcc is available).
# With arguments, builds only those targets (scripts/demo.sh builds just `moelab`); without,
# everything (tests and benchmarks included).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
export PATH="$PATH:/usr/local/cuda/bin"
# Configure quietly, but show CMake's own words when it fails.
configure_log=$(mktemp)
trap 'rm -f "$configure_log"' EXIT
if ! cmake --preset default >"$configure_log" 2>&1; then
  cat "$configure_log" >&2
  echo "scripts/build.sh: CMake configure failed (its output is above)" >&2
  exit 1
fi
if [ $# -gt 0 ]; then
  cmake --build --preset default --target "$@"
else
  cmake --build --preset default
fi
