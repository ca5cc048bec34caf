#!/usr/bin/env bash
# Device call: the op harness on the routing and norm kernels, Nsight Compute's full sections on
# the FP8 grouped forward kernels (engine and lab variant, tensorwise, 768 -> 1536), and whole BF16
# steps at d12 head dim 128, d20 and a fine-grained MoE beside torch_moe_ref.py compiled.
#   bash bench/gpu/stage.sh && (device) bash bench/gpu/shapes_profile_run.sh
source bench/gpu/device_env.sh
B=$GPU_BIN
timeout 150 "$B/test_cuda" --gtest_brief=1 --gtest_filter="${TEST_FILTER:-CudaOps.*:*OpTableCuda*}" > "$OUT/test_cuda.log" 2>&1
echo "test_cuda rc=$?"; grep -E "^\[  (PASSED|FAILED) |FAILED  \]" "$OUT/test_cuda.log" | head -20
grep -B2 -A8 "Failure" "$OUT/test_cuda.log" | head -40
if [ -z "${SKIP_NCU:-}" ]; then
  timeout 150 ncu --kernel-name regex:fp8_grouped_fwd --launch-skip 6 --launch-count 2 --set full \
    "$B/bench_fp8_grouped_ws" tensor > "$OUT/ncu_fp8_fwd.txt" 2>&1
  echo "ncu rc=$?"; grep -E "fp8_grouped_fwd|Duration|Compute \(SM\) Throughput|Memory Throughput|Achieved Occupancy|Stall|Registers Per|One or More Eligible|Issued Warp" "$OUT/ncu_fp8_fwd.txt" | head -40
fi
WHAT=steps PEERS="${PEERS:-d12_hd128 d20 fine}" STEPS=30 bash bench/gpu/attention_shapes.sh 2>&1 | tail -14
