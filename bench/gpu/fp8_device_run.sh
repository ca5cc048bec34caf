#!/usr/bin/env bash
# Device call for FP8 training (the FP8 issue), from the repository root with binaries staged by
# bench/gpu/stage.sh: the FP8 op harness (dense and grouped FP8 ops against the CPU emulation),
# the dense and grouped FP8 GEMM benchmarks, and training speed (AdamW on the matrices, graph,
# dropless) at the seed shape and at d20 for BF16 and each FP8 setting, beside
# torch_moe_ref.py --mlp moe --compile 1 --fp8 none|dense|experts|all. Logs under $OUT: the
# training runs' logs go into run_logs.tgz, since a call brings back at most 8 files (speed.md,
# the table, must be among them).
#   STEPS=30 WHAT="ops bench seed d20 peers" SEED_RUNS="bf16 all_tensorwise" ACCUM=8 TORCH_FP8="none all" \
#     bash bench/gpu/fp8_device_run.sh
source bench/gpu/device_env.sh
B=$GPU_BIN
steps=${STEPS:-30}
rm -rf /tmp/fp8speed  # a warm machine keeps the last call's runs: each call measures its own
what=" ${WHAT:-ops bench seed d20 peers} "
if [[ $what == *" ops "* ]]; then
  echo "== op harness: ${TEST_FILTER:-CudaFp8*}"
  timeout 240 "$B/test_cuda" --gtest_brief=1 --gtest_filter="${TEST_FILTER:-CudaFp8*}" > "$OUT/test_cuda.log" 2>&1
  echo "test_cuda rc=$?"; grep -E "^\[  (PASSED|FAILED) |FAILED  \]" "$OUT/test_cuda.log" | head -20
  grep -B2 -A8 "Failure" "$OUT/test_cuda.log" | head -80
fi
if [[ $what == *" bench "* ]]; then
  echo "== FP8 grouped GEMM benchmark"
  timeout 120 "$B/bench_fp8_grouped_gemm" 2>&1 | tee "$OUT/bench_fp8_grouped_gemm.md"
  [ -n "${DENSE_BENCH:-}" ] && timeout 120 "$B/bench_fp8_gemm" 2>&1 | tee "$OUT/bench_fp8_gemm.md"
fi
logs=/tmp/fp8speed_logs
rm -rf "$logs" && mkdir -p "$logs"
run() {  # folder name, then --set overrides
  local name=$1; shift
  timeout 150 "$B/moelab" train --config configs/d12-moe.toml --out "/tmp/fp8speed/$name" --set train.steps=$steps \
    --set optim.matrix_optimizer=adamw "$@" > "$logs/$name.log" 2>&1 || { echo "$name failed"; tail -5 "$logs/$name.log"; }
}
fp8() { echo --set precision=fp8 --set fp8.layers=$1 --set fp8.recipe=$2; }
if [[ $what == *" seed "* ]]; then
  echo "== training speed, seed shape, $steps steps"
  # SEED_RUNS picks a subset: bf16, dense, experts, all_tensorwise, all_rowwise, all_blockwise,
  # all_tensorwise_nohead (lm_head in BF16).
  runs=" ${SEED_RUNS:-bf16 dense experts all_tensorwise all_rowwise all_blockwise} "
  [[ $runs == *" bf16 "* ]] && run seed_bf16 --set precision=bf16
  [[ $runs == *" dense "* ]] && run seed_fp8_dense_tensorwise $(fp8 dense tensorwise)
  [[ $runs == *" experts "* ]] && run seed_fp8_experts_tensorwise $(fp8 experts tensorwise)
  for r in tensorwise rowwise blockwise; do [[ $runs == *" all_$r "* ]] && run seed_fp8_all_$r $(fp8 all $r); done
  [[ $runs == *" all_tensorwise_nohead "* ]] && run seed_fp8_all_tensorwise_nohead $(fp8 all tensorwise) --set fp8.head=false
  # ACCUM=8: BF16 and FP8 all with that many micro-batches a step (the seed's runs take 32).
  if [ -n "${ACCUM:-}" ]; then
    run seed_bf16_accum$ACCUM --set precision=bf16 --set train.grad_accum=$ACCUM --set train.steps=14
    run seed_fp8_all_tensorwise_accum$ACCUM $(fp8 all tensorwise) --set train.grad_accum=$ACCUM --set train.steps=14
  fi
fi
if [[ $what == *" d20 "* ]]; then
  echo "== training speed, d20, $steps steps"
  d20=(--set model.d_model=1280 --set model.layers=20 --set model.head_dim=128 --set train.seq_len=2048
       --set train.batch_size=8 --set moe.expert_hidden=2560)
  run d20_bf16 "${d20[@]}" --set precision=bf16
  run d20_fp8_all_tensorwise "${d20[@]}" $(fp8 all tensorwise)
  run d20_fp8_all_rowwise "${d20[@]}" $(fp8 all rowwise)
fi
[ -d /tmp/fp8speed ] && python3 bench/gpu/steps_table.py /tmp/fp8speed/* | tee "$OUT/speed.md"
[ -n "$(ls "$logs")" ] && tar czf "$OUT/run_logs.tgz" -C "$logs" .
if [[ $what == *" peers "* ]]; then
  echo "== torch peer (seed shape; d20 with D20_PEER=1)"
  for f in ${TORCH_FP8:-none dense experts all}; do
    timeout ${TORCH_TIMEOUT:-200} python3 "$B/torch_moe_ref.py" --mlp moe --compile 1 --steps 20 --fp8 "$f" 2>>"$OUT/torch.err" \
      | grep '^{' | tee -a "$OUT/torch.jsonl" || echo "torch --fp8 $f failed"
  done
  if [ -n "${D20_PEER:-}" ]; then
    for f in none all; do
      timeout ${TORCH_TIMEOUT:-200} python3 "$B/torch_moe_ref.py" --mlp moe --compile 1 --steps 20 --fp8 "$f" --d-model 1280 \
        --layers 20 --head-dim 128 --seq-len 2048 --batch 8 --expert-hidden 2560 2>>"$OUT/torch.err" | grep '^{' | tee -a "$OUT/torch.jsonl"
    done
  fi
fi
