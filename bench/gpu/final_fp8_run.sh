#!/usr/bin/env bash
# Device call for the FP8 speed table: the FP8 op harness and the GPU FP8 training test, then
# training speed at the seed shape (BF16 and every FP8 setting, lm_head in FP8 and not) and at
# d20, beside torch_moe_ref.py --mlp moe --compile 1 --fp8 none|all at the seed shape.
#   BINS="test_cuda test_train bench_fp8_grouped_gemm" bash bench/gpu/stage.sh && (device) bash bench/gpu/final_fp8_run.sh
source bench/gpu/device_env.sh
B=$GPU_BIN
timeout 100 "$B/test_cuda" --gtest_brief=1 --gtest_filter='CudaFp8*' > "$OUT/test_cuda.log" 2>&1
echo "test_cuda (FP8) rc=$?"; grep -E "^\[  (PASSED|FAILED) |FAILED  \]" "$OUT/test_cuda.log" | head -20
grep -B2 -A8 "Failure" "$OUT/test_cuda.log" | head -30
timeout 60 "$B/test_train" --gtest_brief=1 --gtest_filter='Fp8Training.OnTheGpu*' > "$OUT/test_train.log" 2>&1
echo "test_train (FP8 on the GPU) rc=$?"; grep -E "PASSED|FAILED|tail loss" "$OUT/test_train.log" | head
STEPS=30 WHAT="seed d20 peers" TORCH_FP8="none all" TORCH_TIMEOUT=150 \
  SEED_RUNS="bf16 dense experts all_tensorwise all_rowwise all_blockwise all_tensorwise_nohead" \
  bash bench/gpu/fp8_device_run.sh 2>&1 | tail -18
