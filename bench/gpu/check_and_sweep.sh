#!/usr/bin/env bash
# Device checks: the op harness, the first losses of the seed-shape model on GPU against the CPU
# from the same initial weights and data, and the {dropless, capacity} x {graph, eager} sweep.
source bench/gpu/device_env.sh
B=$GPU_BIN
echo "== op harness"; "$B/test_cuda" --gtest_brief=1 2>&1 | tail -15 | tee "$OUT/test_cuda.log"
echo "== GPU vs CPU, first 20 steps, seed-shape model at batch 1 x 256 tokens, same initial weights and data"
common=(--config configs/d12-moe.toml --set train.steps=20 --set train.batch_size=1 --set train.seq_len=256 --set train.eval_batches=1)
"$B/moelab" train "${common[@]}" --out /tmp/cmp_gpu --set device=cuda --set exec=eager > "$OUT/cmp_gpu.log" 2>&1 || tail -3 "$OUT/cmp_gpu.log"
# The CPU reference runs in the background on 12 of the 16 cores while the sweep runs.
(timeout ${CPU_LIMIT:-400} "$B/moelab" train "${common[@]}" --out /tmp/cmp_cpu --set device=cpu --set precision=auto --set exec=eager --set train.threads=12 > "$OUT/cmp_cpu.log" 2>&1) &
cpu_pid=$!
echo "== sweep"
"$B/moelab" sweep configs/sweep-d12-gpu.toml --out /tmp/exp_d12 > "$OUT/sweep.log" 2>&1; echo "sweep rc $?"
tail -12 "$OUT/sweep.log"
tar czf "$OUT/exp_d12.tgz" --exclude='*.safetensors' -C /tmp exp_d12
wait $cpu_pid
python3 - <<'PY' | tee "$OUT/cmp.txt"
import json
def losses(p): return [json.loads(l)["raw_loss"] for l in open(p) if '"event":"step"' in l]
g, c = losses("/tmp/cmp_gpu/metrics.jsonl"), losses("/tmp/cmp_cpu/metrics.jsonl")
worst = max(abs(a - b) / abs(b) for a, b in zip(g, c)) if g and c else float("nan")
for i, (a, b) in enumerate(zip(g, c)): print(f"step {i:2d} gpu {a:.5f} cpu {b:.5f} rel {abs(a-b)/abs(b):.2e}")
print(f"steps compared {min(len(g), len(c))}, worst relative difference {worst:.3e}")
PY
