#!/usr/bin/env bash
# Configures and builds moelab into build/ (the CUDA backend too when nvcc is available).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
export PATH="$PATH:/usr/local/cuda/bin"
cmake --preset default >/dev/null
cmake --build --preset default
