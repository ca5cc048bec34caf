#!/usr/bin/env bash
# Device call for the BF16 step (the BF16 step issue), from the repository root with binaries
# staged by bench/gpu/stage.sh. Sections (WHAT, default all):
#   ops      the op harness (TEST_FILTER, default CudaOps.*:CudaFp8*:CudaGrouped*)
#   cmp      the seed-shape model's first 20 losses on the GPU against the CPU (batch 1 x 256
#            tokens, same initial weights and data; the CPU run goes in the background first)
#   bench    the grouped BF16 GEMM benchmark (engine kernels and cuBLASLt of the same size)
#   ncu      Nsight Compute sections of the grouped forward, data gradient and weight gradient
#   seed     training speed at the seed shape: MoE with AdamW and with Muon, capacity, dense
#   d20      training speed at d20 (MoE, AdamW)
#   profile  per-kernel time of one BF16 step at the seed shape (AdamW; PROFILE_MUON=1 adds the
#            Muon step, PROFILE_CAPACITY=1 capacity dispatch, PROFILE_D20=1 d20)
#   peers    torch_moe_ref.py --compile 1: MoE and dense at the seed shape, MoE at d20
# Runs: AdamW on the matrices unless said, graph, dropless, STEPS steps, medians of steps 10+.
# The training logs go into run_logs.tgz (a call brings back at most 8 files).
#   STEPS=30 WHAT="ops bench seed peers" bash bench/gpu/bf16_step_run.sh
source bench/gpu/device_env.sh
B=$GPU_BIN
steps=${STEPS:-30}
what=" ${WHAT:-cmp ops bench ncu seed d20 profile peers} "
rm -rf /tmp/bf16speed
logs=/tmp/bf16speed_logs
rm -rf "$logs" && mkdir -p "$logs"
d20=(--set model.d_model=1280 --set model.layers=20 --set model.head_dim=128 --set train.seq_len=2048
     --set train.batch_size=8 --set moe.expert_hidden=2560)
cmp_args=(--config configs/d12-moe.toml --set train.steps=20 --set train.batch_size=1 --set train.seq_len=256
          --set train.eval_batches=1 --set exec=eager)
if [[ $what == *" cmp "* ]]; then
  rm -rf /tmp/cmp_cpu /tmp/cmp_gpu
  (timeout 500 "$B/moelab" train "${cmp_args[@]}" --out /tmp/cmp_cpu --set device=cpu --set precision=auto \
    --set train.threads=10 > "$logs/cmp_cpu.log" 2>&1) &
  cpu_pid=$!
  "$B/moelab" train "${cmp_args[@]}" --out /tmp/cmp_gpu --set device=cuda > "$logs/cmp_gpu.log" 2>&1 || tail -3 "$logs/cmp_gpu.log"
fi
if [[ $what == *" ops "* ]]; then
  echo "== op harness: ${TEST_FILTER:-CudaOps.*:CudaFp8*:CudaGrouped*}"
  timeout 300 "$B/test_cuda" --gtest_brief=1 --gtest_filter="${TEST_FILTER:-CudaOps.*:CudaFp8*:CudaGrouped*:*OpTableCuda*}" \
    > "$logs/test_cuda.log" 2>&1
  echo "test_cuda rc=$?"; grep -E "^\[  (PASSED|FAILED) |FAILED  \]|tests? ran" "$logs/test_cuda.log" | head -20
  grep -B2 -A8 "Failure" "$logs/test_cuda.log" | head -60
fi
if [[ $what == *" bench "* ]]; then
  echo "== grouped BF16 GEMM benchmark"
  timeout 120 "$B/bench_grouped_gemm_variants" 2>&1 | tee "$OUT/bench_grouped_gemm.txt"
fi
if [[ $what == *" ncu "* ]]; then
  echo "== Nsight Compute: grouped kernels (768 -> 1536 forward, data gradient, weight gradient)"
  for k in "grouped_fwd_tma_persistent_kernel<128, 3, __nv_bfloat16, false>" \
           "grouped_fwd_tma_persistent_kernel<128, 3, __nv_bfloat16, true>" "grouped_wgrad_tma_kernel"; do
    timeout 120 ncu --kernel-name-base demangled --kernel-name "regex:${k//[<>, ]/.}" --launch-skip 3 --launch-count 1 \
      --section SpeedOfLight --section MemoryWorkloadAnalysis --section WarpStateStats --section Occupancy \
      --section LaunchStats "$B/bench_grouped_gemm_variants" > "$logs/ncu_$(echo "$k" | tr -c 'a-z0-9' _ | cut -c1-40).txt" 2>&1
  done
  for f in "$logs"/ncu_*.txt; do
    echo "-- $f"; grep -E "grouped_|Duration|Compute \(SM\) Throughput|Memory Throughput|L2 Cache Throughput|L1/TEX Cache Throughput|DRAM Throughput|Registers Per|Achieved Occupancy|Stall|Warp Cycles Per Issued" "$f" | head -24
  done
fi
run() {  # folder name, then --set overrides
  local name=$1; shift
  timeout 150 "$B/moelab" train --config configs/d12-moe.toml --out "/tmp/bf16speed/$name" --set train.steps=$steps \
    "$@" > "$logs/$name.log" 2>&1 || { echo "$name failed"; tail -5 "$logs/$name.log"; }
}
if [[ $what == *" seed "* ]]; then
  echo "== training speed, seed shape, $steps steps"
  run seed_moe_adamw --set optim.matrix_optimizer=adamw
  run seed_moe_muon --set optim.matrix_optimizer=muon
  run seed_moe_capacity_adamw --set optim.matrix_optimizer=adamw --set moe.dispatch=capacity
  run seed_dense_adamw --set optim.matrix_optimizer=adamw --set moe.experts=0
  [ -n "${SEED_FP8:-}" ] && run seed_moe_fp8_all_adamw --set optim.matrix_optimizer=adamw --set precision=fp8 \
    --set fp8.layers=all --set fp8.recipe=tensorwise
fi
if [[ $what == *" d20 "* ]]; then
  echo "== training speed, d20, $steps steps"
  run d20_moe_adamw "${d20[@]}" --set optim.matrix_optimizer=adamw
fi
if [ -d /tmp/bf16speed ]; then
  python3 bench/gpu/steps_table.py /tmp/bf16speed/* | tee "$OUT/speed.md"
  for d in /tmp/bf16speed/*; do cp "$d/metrics.jsonl" "$logs/$(basename "$d").metrics.jsonl" 2>/dev/null; done
  # How even the routing is: each MoE layer's largest expert load over the mean, at the last step.
  python3 - /tmp/bf16speed/seed_moe_adamw/metrics.jsonl <<'PY' | tee -a "$OUT/speed.md"
import json, sys
try:
    last = [json.loads(l) for l in open(sys.argv[1]) if '"event":"step"' in l][-1]
    ratios = [max(f) * len(f) / sum(f) for f in last["expert_load"] if f and sum(f) > 0]
    print(f"seed_moe_adamw step {last['step']}: largest expert load / mean per MoE layer:",
          " ".join(f"{r:.2f}" for r in ratios))
except (OSError, IndexError, KeyError) as e:
    print("expert loads unavailable:", e)
PY
fi
if [[ $what == *" profile "* ]]; then
  echo "== step profile, seed BF16 AdamW"
  NAME=profile_seed_bf16 bash bench/gpu/profile_step.sh --set optim.matrix_optimizer=adamw | head -30
  [ -n "${PROFILE_MUON:-}" ] && NAME=profile_seed_bf16_muon bash bench/gpu/profile_step.sh \
    --set optim.matrix_optimizer=muon | head -30
  [ -n "${PROFILE_CAPACITY:-}" ] && NAME=profile_seed_bf16_capacity bash bench/gpu/profile_step.sh \
    --set optim.matrix_optimizer=adamw --set moe.dispatch=capacity | head -30
  [ -n "${PROFILE_D20:-}" ] && NAME=profile_d20_bf16 bash bench/gpu/profile_step.sh --set optim.matrix_optimizer=adamw \
    "${d20[@]}" | head -30
  mv "$OUT"/profile_*.csv "$OUT"/profile_*.err "$logs/" 2>/dev/null
fi
if [[ $what == *" peers "* ]]; then
  echo "== torch peer"
  T="python3 $B/torch_moe_ref.py --steps 20 --compile 1"
  timeout 200 $T --mlp moe 2>>"$logs/torch.err" | grep '^{' | tee -a "$OUT/torch.jsonl" || echo "torch moe failed"
  timeout 200 $T --mlp dense 2>>"$logs/torch.err" | grep '^{' | tee -a "$OUT/torch.jsonl" || echo "torch dense failed"
  [ -z "${NO_D20_PEER:-}" ] && { timeout 200 $T --mlp moe --d-model 1280 --layers 20 --head-dim 128 --seq-len 2048 \
    --batch 8 --expert-hidden 2560 2>>"$logs/torch.err" | grep '^{' | tee -a "$OUT/torch.jsonl" || echo "torch d20 failed"; }
fi
if [[ $what == *" cmp "* ]]; then
  wait $cpu_pid
  python3 - <<'PY' | tee "$OUT/cmp.txt"
import json
def losses(p):
    try: return [json.loads(l)["raw_loss"] for l in open(p) if '"event":"step"' in l]
    except OSError: return []
g, c = losses("/tmp/cmp_gpu/metrics.jsonl"), losses("/tmp/cmp_cpu/metrics.jsonl")
for i, (a, b) in enumerate(zip(g, c)): print(f"step {i:2d} gpu {a:.5f} cpu {b:.5f} rel {abs(a-b)/abs(b):.2e}")
worst = max((abs(a - b) / abs(b) for a, b in zip(g, c)), default=float("nan"))
print(f"steps compared {min(len(g), len(c))}, worst relative difference {worst:.3e}")
PY
fi
tar czf "$OUT/run_logs.tgz" -C "$logs" .
