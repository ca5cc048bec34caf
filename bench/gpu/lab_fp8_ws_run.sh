#!/usr/bin/env bash
# Device call for the branch's unmeasured FP8 work: the warp-specialized grouped kernel of the lab
# (its bit-for-bit test against the engine's kernel, then its benchmark), the FP8 op harness on the
# quantization launch fixes, and the seed-shape step in BF16 and FP8 all (AdamW, graph, dropless).
#   bash bench/gpu/stage.sh && (device) bash bench/gpu/lab_fp8_ws_run.sh
source bench/gpu/device_env.sh
B=$GPU_BIN
timeout 120 "$B/test_dev_cuda" --gtest_brief=1 --gtest_filter='Fp8GroupedWs*' > "$OUT/test_dev_cuda.log" 2>&1
echo "test_dev_cuda (Fp8GroupedWs) rc=$?"; grep -E "PASSED|FAILED|Failure" -A3 "$OUT/test_dev_cuda.log" | head -20
timeout 120 "$B/bench_fp8_grouped_ws" 2>&1 | tee "$OUT/bench_fp8_grouped_ws.md"
timeout 120 "$B/test_cuda" --gtest_brief=1 --gtest_filter='CudaFp8*' > "$OUT/test_cuda.log" 2>&1
echo "test_cuda (FP8) rc=$?"; grep -E "PASSED|FAILED" "$OUT/test_cuda.log" | head
STEPS=30 WHAT="seed" bash bench/gpu/fp8_device_run.sh 2>&1 | tail -9
