#!/usr/bin/env bash
# Configures and builds moelab into build/ (the CUDA backend too when nvcc is available).
# With arguments, builds only those targets (scripts/demo.sh builds just `moelab`); without,
# everything (tests and benchmarks included).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
export PATH="$PATH:/usr/local/cuda/bin"
cmake --preset default >/dev/null
if [ $# -gt 0 ]; then
  cmake --build --preset default --target "$@"
else
  cmake --build --preset default
fi
