#!/usr/bin/env bash
# Device call for the register-path segment quantizer (segments_codes_scaled_kernel): the CUDA op
# harness whole, the GPU FP8 training test, the FP8 grouped benchmark, and training speed at the
# seed shape and d20 (AdamW, graph, dropless).
#   NO_TORCHAO=1 BINS="test_cuda test_train bench_fp8_grouped_gemm" bash bench/gpu/stage.sh && (device) bash bench/gpu/segments_run.sh
source bench/gpu/device_env.sh
B=$GPU_BIN
timeout 200 "$B/test_cuda" --gtest_brief=1 > "$OUT/test_cuda.log" 2>&1
echo "test_cuda rc=$?"; grep -E "^\[  (PASSED|FAILED) |FAILED  \]" "$OUT/test_cuda.log" | head -20
grep -B2 -A8 "Failure" "$OUT/test_cuda.log" | head -40
timeout 90 "$B/test_train" --gtest_brief=1 --gtest_filter='Fp8Training.OnTheGpu*' > "$OUT/test_train.log" 2>&1
echo "test_train (FP8 on the GPU) rc=$?"; grep -E "PASSED|FAILED|tail loss" "$OUT/test_train.log" | head
timeout 120 "$B/bench_fp8_grouped_gemm" > "$OUT/bench_fp8_grouped_gemm.md" 2>&1; sed -n '/whole FP8 op/,$p' "$OUT/bench_fp8_grouped_gemm.md"
STEPS=30 WHAT="seed d20" SEED_RUNS="${SEED_RUNS:-bf16 dense experts all_tensorwise all_rowwise all_blockwise}" bash bench/gpu/fp8_device_run.sh 2>&1 | tail -13
