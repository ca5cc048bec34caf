#!/usr/bin/env bash
# Device call for the whole-sector epilogue of the grouped forward kernels (wgmma_epilogue.cuh):
# the grouped GEMM op harness (BF16 and FP8), the lab variant's bit-for-bit test, the kernel
# benchmarks (FP8 engine and lab variants, tensorwise; BF16 grouped against cuBLASLt; the FP8 ops
# per recipe), and training speed at the seed shape and d20 (AdamW, graph, dropless).
#   NO_TORCHAO=1 BINS="test_cuda bench_fp8_grouped_gemm bench_grouped_gemm dev/cuda/test_dev_cuda dev/cuda/bench_fp8_grouped_ws" \
#     bash bench/gpu/stage.sh && (device) bash bench/gpu/epilogue_run.sh
source bench/gpu/device_env.sh
B=$GPU_BIN
timeout 150 "$B/test_cuda" --gtest_brief=1 --gtest_filter='CudaFp8*:CudaOps.Grouped*:CudaOps.MoeRouting*:CudaOps.BatchedNewtonSchulz*' \
  > "$OUT/test_cuda.log" 2>&1
echo "test_cuda rc=$?"; grep -E "^\[  (PASSED|FAILED) |FAILED  \]" "$OUT/test_cuda.log" | head -20
grep -B2 -A8 "Failure" "$OUT/test_cuda.log" | head -40
timeout 90 "$B/test_dev_cuda" --gtest_brief=1 --gtest_filter='Fp8GroupedWs*' > "$OUT/test_dev_cuda.log" 2>&1
echo "test_dev_cuda (Fp8GroupedWs) rc=$?"; grep -E "PASSED|FAILED|Failure" -A3 "$OUT/test_dev_cuda.log" | head -12
timeout 90 "$B/bench_fp8_grouped_ws" tensor 2>&1 | tee "$OUT/bench_fp8_grouped_ws.md"
timeout 120 "$B/bench_fp8_grouped_gemm" > "$OUT/bench_fp8_grouped_gemm.md" 2>&1; head -30 "$OUT/bench_fp8_grouped_gemm.md"
timeout 120 "$B/bench_grouped_gemm" > "$OUT/bench_grouped_gemm.md" 2>&1; head -30 "$OUT/bench_grouped_gemm.md"
STEPS=30 WHAT="seed d20" SEED_RUNS="${SEED_RUNS:-bf16 dense experts all_tensorwise all_rowwise}" bash bench/gpu/fp8_device_run.sh 2>&1 | tail -12
