#!/usr/bin/env bash
# The main job: build, then run the CPU ablation sweep (configs/sweep-cpu.toml) on the embedded
# corpus and write its report. Extra arguments go to `moelab sweep` (e.g. --out DIR).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/build.sh moelab  # only what the demo runs, not the tests and benchmarks
exec build/moelab sweep configs/sweep-cpu.toml "$@"
