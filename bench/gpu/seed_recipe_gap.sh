#!/usr/bin/env bash
# Where the seed recipe's GPU run parts from the CPU's: the first losses of configs/d12-seed.toml
# at a small shape (d_model 256, 4 layers, 1 x 256 tokens), GPU (BF16) against CPU (f32), with
# each seed option turned off in turn. Prints each variant's worst relative loss gap over 6 steps.
source bench/gpu/device_env.sh
B=$GPU_BIN
small=(--config configs/d12-seed.toml --set model.d_model=256 --set model.layers=4 --set moe.expert_hidden=256
       --set train.steps=6 --set train.batch_size=1 --set train.seq_len=256 --set train.total_batch_tokens=0
       --set optim.weight_decay_ref_batch=256 --set train.eval_batches=1 --set exec=eager)
declare -A variants=(
  [seed]=""
  [muon_plain]="--set optim.muon_variant=muon"
  [no_value_embeddings]="--set model.value_embeddings=false"
  [no_lambdas]="--set model.scalar_lambdas=false"
  [no_cautious_wd]="--set optim.cautious_weight_decay=false --set optim.weight_decay=0"
  [adamw_matrices]="--set optim.matrix_optimizer=adamw"
  [dropless]="--set moe.dispatch=dropless"
)
for v in seed muon_plain no_value_embeddings no_lambdas no_cautious_wd adamw_matrices dropless; do
  rm -rf /tmp/gap_gpu_$v /tmp/gap_cpu_$v
  "$B/moelab" train "${small[@]}" ${variants[$v]} --set device=cuda --out /tmp/gap_gpu_$v > "$OUT/gap_gpu_$v.log" 2>&1 &
  "$B/moelab" train "${small[@]}" ${variants[$v]} --set device=cpu --set precision=auto --set train.threads=12 \
    --out /tmp/gap_cpu_$v > "$OUT/gap_cpu_$v.log" 2>&1
  wait
  python3 - "$v" <<'PY'
import json, sys
v = sys.argv[1]
def losses(p):
    try: return [json.loads(l)["raw_loss"] for l in open(p) if '"event":"step"' in l.replace(" ", "")]
    except OSError: return []
g, c = losses(f"/tmp/gap_gpu_{v}/metrics.jsonl"), losses(f"/tmp/gap_cpu_{v}/metrics.jsonl")
gaps = [abs(a - b) / abs(b) for a, b in zip(g, c)]
print(f"{v:22s} gpu {' '.join(f'{x:.3f}' for x in g)} | cpu {' '.join(f'{x:.3f}' for x in c)} | worst {max(gaps) if gaps else float('nan'):.2e}")
PY
done
