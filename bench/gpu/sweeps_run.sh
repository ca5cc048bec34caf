#!/usr/bin/env bash
# Device call for the shipped sweeps: the FP8 op harness, the grouped FP8 GEMM benchmark, then
# each sweep file given (default configs/sweep-fp8-d12.toml) run by `moelab sweep` into
# /tmp/sweeps/<name>, the experiment folder packed into $OUT/<name>.tgz (weights left out) and its
# report copied to $OUT/<name>.report.md. BUDGET (seconds,
# default 560) bounds the whole call: a sweep started late is stopped (SIGTERM: the queue stops
# its runs and keeps what finished) so the reports still come back.
#   ROWS=moe_bf16_experts_dynamic bash bench/gpu/sweeps_run.sh configs/seed/v4.toml
# ROWS (comma-separated run names) runs only those rows (`moelab sweep --only`), for a call too
# short for the whole matrix.
source bench/gpu/device_env.sh
B=$GPU_BIN
budget=${BUDGET:-560}
if [ -z "${SKIP_OPS:-}" ]; then
  timeout 120 "$B/test_cuda" --gtest_brief=1 --gtest_filter='CudaFp8*' > "$OUT/test_cuda_fp8.log" 2>&1
  echo "test_cuda (FP8) rc=$?"; grep -E "PASSED|FAILED" "$OUT/test_cuda_fp8.log" | head
  timeout 60 "$B/bench_fp8_grouped_gemm" > "$OUT/bench_fp8_grouped_gemm.md" 2>&1; cat "$OUT/bench_fp8_grouped_gemm.md"
fi
for f in "${@:-configs/sweep-fp8-d12.toml}"; do
  name=$(basename "$f" .toml)
  left=$((budget - SECONDS - 20))
  [ $left -lt 30 ] && { echo "no time left for $name"; continue; }
  echo "== sweep $f ($left s left)"
  only=(); [ -n "${ROWS:-}" ] && only=(--only "$ROWS")
  timeout -s TERM $left "$B/moelab" sweep "$f" "${only[@]}" --out "/tmp/sweeps/$name" --progress 30 > "$OUT/sweep_$name.log" 2>&1
  echo "sweep $name rc=$?"; tail -25 "$OUT/sweep_$name.log"
  "$B/moelab" report "/tmp/sweeps/$name" > /dev/null 2>&1
  # One tarball (a call returns a limited number of files): the experiment folder with every
  # run's metrics.jsonl and status.json, so the report can be written again elsewhere; no weights.
  tar czf "$OUT/$name.tgz" --exclude=checkpoints --exclude='*.safetensors' -C /tmp/sweeps "$name"
  cp "/tmp/sweeps/$name/report.md" "$OUT/$name.report.md" 2>/dev/null
done
