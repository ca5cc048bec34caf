#!/usr/bin/env bash
# One device call after the backend's interface moved into families and the routing lab landed:
#  1. test_cuda: the op table's CUDA rows (CUDA against the CPU), the routing ops (eager and
#     replayed, capacity and dropless), and the focused GPU tests; not the seed-shape model
#     against the CPU (its CPU half takes minutes; tests_run.sh runs it);
#  2. the routing chain's time per MoE layer and micro-batch (bench_routing) at the seed shape and
#     at 64 experts top-8;
#  3. the seed-shape step (d12-moe, BF16 and FP8, MoE and dense, CUDA graphs), moelab only;
#  4. with SWEEP=1, configs/routing-d12.toml shortened to STEPS steps of TOKENS tokens, report included.
#   BINS="test_cuda bench_routing" NO_TORCHAO=1 bench/gpu/stage.sh    # then, on the device:
#   SWEEP=1 bash bench/gpu/interface_routing_run.sh
source bench/gpu/device_env.sh
B=$GPU_BIN
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-16}

echo "== test_cuda (all but CudaModel.SeedShape*)"
timeout ${TEST_LIMIT:-240} "$B/test_cuda" --gtest_filter='-CudaModel.SeedShape*' > "$OUT/test_cuda.log" 2>&1
echo "test_cuda rc=$?"
grep -E "tests? ran|^\[  PASSED|^\[  FAILED|^\[  SKIPPED" "$OUT/test_cuda.log" | head -5
grep -E "^\[  FAILED  \]" "$OUT/test_cuda.log" | head -40
grep -B2 -A8 "Failure" "$OUT/test_cuda.log" | head -120

if [ -x "$B/bench_routing" ]; then
  echo "== routing chain per MoE layer and micro-batch"
  timeout 120 "$B/bench_routing" > "$OUT/bench_routing.txt" 2>&1
  echo "bench_routing rc=$?"
  cat "$OUT/bench_routing.txt" | tail -40
fi

echo "== seed-shape step (d12-moe, ${STEPS_SPEED:-30} steps each)"
run() {  # name, then --set overrides
  local name=$1; shift
  "$B/moelab" train --config configs/d12-moe.toml --out "/tmp/speed/$name" --set train.steps=${STEPS_SPEED:-30} "$@" \
    > "$OUT/$name.log" 2>&1 || { echo "$name failed"; tail -3 "$OUT/$name.log"; }
}
run moe_bf16 --set exec=graph
run dense_bf16 --set exec=graph --set moe.experts=0
run moe_fp8_all --set exec=graph --set precision=fp8 --set fp8.layers=all
run moe_bf16_sigmoid_auxfree --set exec=graph --set moe.score=sigmoid --set moe.balance=aux_free
python3 bench/gpu/steps_table.py /tmp/speed/* | tee "$OUT/speed.txt"

if [ -n "${SWEEP:-}" ]; then
  echo "== routing-d12, shortened: ${STEPS:-30} steps of ${TOKENS:-131072} tokens"
  sed -e "s/^set = { \"train.steps\" = 140 }/set = { \"train.steps\" = ${STEPS:-30}, \"train.total_batch_tokens\" = ${TOKENS:-131072} }/" \
    configs/routing-d12.toml > configs/routing-d12-short.toml
  grep -n "^set" configs/routing-d12-short.toml
  timeout ${SWEEP_LIMIT:-300} "$B/moelab" sweep configs/routing-d12-short.toml --out "$OUT/routing-d12" \
    > "$OUT/routing_sweep.log" 2>&1
  echo "sweep rc=$?"
  tail -20 "$OUT/routing_sweep.log"
  ls "$OUT/routing-d12"
  sed -n '/MoE Routing/,/^## [A-Z]/p' "$OUT/routing-d12/report.md" | head -60
  # keep the report, not the weights
  find "$OUT/routing-d12" \( -name "*.safetensors" -o -name "checkpoints" \) -prune -exec rm -rf {} + 2>/dev/null
fi
