#!/usr/bin/env bash
# Builds moelab and runs every test (GPU tests skip themselves where no GPU is present).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh --tests
scripts/build.sh
ctest --preset default
