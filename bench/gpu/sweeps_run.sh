#!/usr/bin/env bash
# Device call for the shipped sweeps: the FP8 op harness, the grouped FP8 GEMM benchmark, then
# each sweep file given (default configs/sweep-fp8-d12.toml) run by `moelab sweep` into
# /tmp/sweeps/<name>, its report (markdown, CSV, figures) copied to $OUT/<name>. BUDGET (seconds,
# default 560) bounds the whole call: a sweep started late is stopped (SIGTERM: the queue stops
# its runs and keeps what finished) so the reports still come back.
#   ROWS=moe_bf16_experts_dynamic bash bench/gpu/sweeps_run.sh configs/seed/v4.toml
# ROWS keeps only the named runs of the next sweep file (written as a one-off sweep file beside
# it, same base and settings), for a call too short for the whole matrix.
source bench/gpu/device_env.sh
B=$GPU_BIN
budget=${BUDGET:-560}
if [ -z "${SKIP_OPS:-}" ]; then
  timeout 120 "$B/test_cuda" --gtest_brief=1 --gtest_filter='CudaFp8*' > "$OUT/test_cuda_fp8.log" 2>&1
  echo "test_cuda (FP8) rc=$?"; grep -E "PASSED|FAILED" "$OUT/test_cuda_fp8.log" | head
  timeout 60 "$B/bench_fp8_grouped_gemm" > "$OUT/bench_fp8_grouped_gemm.md" 2>&1; cat "$OUT/bench_fp8_grouped_gemm.md"
fi
for f in "${@:-configs/sweep-fp8-d12.toml}"; do
  if [ -n "${ROWS:-}" ]; then
    sub="${f%.toml}-rows.toml"
    python3 - "$f" "$sub" "$ROWS" <<'PY'
import re, sys
src, dst, rows = sys.argv[1], sys.argv[2], sys.argv[3].split(",")
text = open(src).read()
head, *runs = re.split(r"(?m)^\[\[run\]\]\n", text)
runs = ["[[run]]\n" + r for r in runs]
tail = ""
if runs and "[[on_failure]]" in runs[-1]:
    last, rest = runs[-1].split("[[on_failure]]", 1)
    runs[-1], tail = last, "[[on_failure]]" + rest
keep = [r for r in runs if re.search(r'^name = "([^"]+)"', r, re.M).group(1) in rows]
head = re.sub(r'(?m)^baseline = .*\n', f'baseline = "{rows[0]}"\n', head)
open(dst, "w").write(head + "".join(keep) + tail)
PY
    f=$sub
  fi
  name=$(basename "$f" .toml)
  left=$((budget - SECONDS - 20))
  [ $left -lt 30 ] && { echo "no time left for $name"; continue; }
  echo "== sweep $f ($left s left)"
  timeout -s TERM $left "$B/moelab" sweep "$f" --out "/tmp/sweeps/$name" --progress 30 > "$OUT/sweep_$name.log" 2>&1
  echo "sweep $name rc=$?"; tail -25 "$OUT/sweep_$name.log"
  "$B/moelab" report "/tmp/sweeps/$name" > /dev/null 2>&1
  mkdir -p "$OUT/$name"
  (cd "/tmp/sweeps/$name" && find . -maxdepth 2 \( -name '*.md' -o -name '*.csv' -o -name '*.png' \) -exec cp --parents {} "$OUT/$name/" \;)
done
