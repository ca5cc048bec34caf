#!/usr/bin/env bash
# Device call for the branch's unmeasured FP8 work: the warp-specialized grouped kernel of the lab
# (its bit-for-bit test against the engine's kernel, then its benchmark), the FP8 op harness on the
# quantization launch fixes, the GPU FP8 training test, the BF16 step profiles at d20 and at a
# fine-grained MoE shape (AdamW), and the seed-shape step in BF16 and FP8 all (AdamW, graph, dropless).
#   bash bench/gpu/stage.sh && (device) bash bench/gpu/lab_fp8_ws_run.sh
source bench/gpu/device_env.sh
B=$GPU_BIN
timeout 90 "$B/test_dev_cuda" --gtest_brief=1 --gtest_filter='Fp8GroupedWs*' > "$OUT/test_dev_cuda.log" 2>&1
echo "test_dev_cuda (Fp8GroupedWs) rc=$?"; grep -E "PASSED|FAILED|Failure" -A3 "$OUT/test_dev_cuda.log" | head -20
timeout 90 "$B/bench_fp8_grouped_ws" 2>&1 | tee "$OUT/bench_fp8_grouped_ws.md"
timeout 150 "$B/test_cuda" --gtest_brief=1 --gtest_filter='CudaFp8*' > "$OUT/test_cuda.log" 2>&1
echo "test_cuda (FP8) rc=$?"; grep -E "PASSED|FAILED" "$OUT/test_cuda.log" | head
timeout 90 "$B/test_train" --gtest_brief=1 --gtest_filter='Fp8Training.OnTheGpu*' > "$OUT/test_train.log" 2>&1
echo "test_train (FP8 on the GPU) rc=$?"; grep -E "PASSED|FAILED|tail loss|Failure" -A2 "$OUT/test_train.log" | head -20
STEPS=30 WHAT="seed" SEED_RUNS="${SEED_RUNS:-bf16 all_tensorwise}" bash bench/gpu/fp8_device_run.sh 2>&1 | tail -9
if [ -z "${SKIP_PROFILES:-}" ]; then
  adamw=(--set optim.matrix_optimizer=adamw)
  NAME=profile_d20_bf16 timeout 150 bash bench/gpu/profile_step.sh "${adamw[@]}" --set model.d_model=1280 --set model.layers=20 \
    --set model.head_dim=128 --set train.seq_len=2048 --set train.batch_size=8 --set moe.expert_hidden=2560 | head -25
  NAME=profile_fine_bf16 timeout 100 bash bench/gpu/profile_step.sh "${adamw[@]}" --set model.head_dim=128 --set train.seq_len=2048 \
    --set train.batch_size=8 --set moe.experts=32 --set moe.top_k=4 --set moe.expert_hidden=512 | head -25
fi
