#!/usr/bin/env bash
# Device checks of the seed's recipe (configs/d12-seed.toml): the op harness for its ops (lambda
# mix, value gate, NorMuon, token-major plan), then the first losses of the seed-recipe model on
# the GPU against the CPU from the same initial weights and data, at a small batch, in both
# dispatch modes (the seed's capacity with token-major drops, and dropless).
source bench/gpu/device_env.sh
B=$GPU_BIN
echo "== op harness (seed ops)"
"$B/test_cuda" --gtest_brief=1 --gtest_filter='*OpTableCuda*/lambda_mix*:*OpTableCuda*/normuon*:*OpTableCuda*/router_*:*OpTableCuda*/moe_*:*OpTableCuda*/grouped_matmul_grouped_matmul_wgrad_relu2*' 2>&1 |
  tail -8 | tee "$OUT/test_cuda_seed.log"
small=(--config configs/d12-seed.toml --set train.steps=8 --set train.batch_size=1 --set train.seq_len=256
       --set train.total_batch_tokens=0 --set optim.weight_decay_ref_batch=256 --set train.eval_batches=1)
for dispatch in capacity dropless; do
  echo "== GPU vs CPU, seed recipe, $dispatch, first 8 steps at 1 x 256 tokens"
  "$B/moelab" train "${small[@]}" --set moe.dispatch=$dispatch --out /tmp/seed_gpu_$dispatch --set device=cuda \
    --set exec=eager > "$OUT/seed_gpu_$dispatch.log" 2>&1 || tail -3 "$OUT/seed_gpu_$dispatch.log"
  timeout ${CPU_LIMIT:-600} "$B/moelab" train "${small[@]}" --set moe.dispatch=$dispatch --out /tmp/seed_cpu_$dispatch \
    --set device=cpu --set precision=auto --set exec=eager --set train.threads=14 > "$OUT/seed_cpu_$dispatch.log" 2>&1
  python3 - "$dispatch" <<'PY' | tee "$OUT/seed_cmp_$dispatch.txt"
import json, sys
d = sys.argv[1]
def losses(p): return [json.loads(l)["raw_loss"] for l in open(p) if '"event":"step"' in l]
g, c = losses(f"/tmp/seed_gpu_{d}/metrics.jsonl"), losses(f"/tmp/seed_cpu_{d}/metrics.jsonl")
worst = max(abs(a - b) / abs(b) for a, b in zip(g, c)) if g and c else float("nan")
for i, (a, b) in enumerate(zip(g, c)): print(f"step {i:2d} gpu {a:.5f} cpu {b:.5f} rel {abs(a-b)/abs(b):.2e}")
print(f"{d}: steps compared {min(len(g), len(c))}, worst relative difference {worst:.3e}")
PY
done
echo "== seed recipe at full shape, 3 steps of 524,288 tokens (graph)"
"$B/moelab" train --config configs/d12-seed.toml --set train.steps=3 --out /tmp/seed_full > "$OUT/seed_full.log" 2>&1
tail -5 "$OUT/seed_full.log"
