#!/usr/bin/env bash
# Device call for attention at nanochat's shapes: the attention op harness, the engine's attention
# beside PyTorch SDPA (shared/anchors/torch_attention_ref.py) at the peer's shapes and with windows,
# and whole training steps (BF16, AdamW on the matrices, the peer's optimizer) at d12 with head
# dim 128 and at d20 beside torch_moe_ref.py. Prints one table per part; logs land in $OUT.
#   STEPS=25 WHAT="ops attn steps" bash bench/gpu/attention_shapes.sh
#   PEERS="d12_hd128 d20" limits the PyTorch runs (default: d12_hd64 d12_hd128 d20); ATTN_PEER=0
#   skips the SDPA peer.
source bench/gpu/device_env.sh
B=$GPU_BIN
steps=${STEPS:-25}
what=" ${WHAT:-ops attn steps} "
if [[ $what == *" ops "* ]]; then
  echo "== op harness (attention) and the kernel lab's variant checks"
  "$B/test_cuda" --gtest_brief=1 --gtest_filter='*OpTableCuda*/attention*' 2>&1 | tail -6 | tee "$OUT/test_attention.log"
  [ -x "$B/test_dev_cuda" ] && "$B/test_dev_cuda" --gtest_brief=1 2>&1 | tail -4
fi
if [[ $what == *" attn "* ]]; then
  echo "== attention forward + backward: moelab"
  "$B/bench_attention" 2>&1 | tee "$OUT/bench_attention.txt"
  [ "${ATTN_PEER:-1}" = 0 ] || { echo "== attention forward + backward: PyTorch SDPA"
  python3 "$B/torch_attention_ref.py" > "$OUT/torch_attention.jsonl" 2>&1
  for s in 16,1024,12,64,512 8,2048,8,128,1024 16,1024,6,128,512; do
    IFS=, read -r b t h d w <<< "$s"
    python3 "$B/torch_attention_ref.py" --shape "$b,$t,$h,$d" --window "$w" >> "$OUT/torch_attention.jsonl" 2>&1
  done
  python3 - "$OUT/torch_attention.jsonl" <<'PY'
import json, sys
for l in open(sys.argv[1]):
    if not l.startswith("{"): continue
    j = json.loads(l)
    print(f"{j['B']},{j['T']},{j['H']},{j['D']} window {j['window']:>5} {j['backend']:<20} {j.get('ms', j.get('error'))}")
PY
  }
fi
if [[ $what == *" steps "* ]]; then
  echo "== whole steps, BF16, AdamW on the matrices"
  run() {  # name, then --set overrides
    local name=$1; shift
    "$B/moelab" train --config configs/d12-moe.toml --out "/tmp/steps/$name" --set train.steps=$steps \
      --set optim.matrix_optimizer=adamw "$@" > "$OUT/$name.log" 2>&1 || { echo "$name failed"; tail -3 "$OUT/$name.log"; }
  }
  d20=(--set model.d_model=1280 --set model.layers=20 --set model.head_dim=128 --set train.seq_len=2048
       --set train.batch_size=8 --set moe.expert_hidden=2560)
  run d12_hd64 --set model.head_dim=64
  run d12_hd128 --set model.head_dim=128
  run d12_hd128_SSSL --set model.head_dim=128 --set model.window_pattern=SSSL
  run d20 "${d20[@]}"
  run d20_SSSL "${d20[@]}" --set model.window_pattern=SSSL
  # A fine-grained MoE: 32 experts of 512, top-4, seq 2048.
  fine=(--set model.head_dim=128 --set train.seq_len=2048 --set train.batch_size=8 --set moe.experts=32
        --set moe.top_k=4 --set moe.expert_hidden=512)
  run d12_hd128_e32_top4 "${fine[@]}"
  python3 bench/gpu/steps_table.py /tmp/steps/* | tee "$OUT/steps.txt"
  T="python3 $B/torch_moe_ref.py --steps 20 --mlp moe --compile 1"
  declare -A peer_args=([d12_hd64]="--head-dim 64" [d12_hd128]="--head-dim 128"
    [d20]="--d-model 1280 --layers 20 --head-dim 128 --seq-len 2048 --batch 8 --expert-hidden 2560"
    [fine]="--head-dim 128 --seq-len 2048 --batch 8 --experts 32 --top-k 4 --expert-hidden 512")
  for p in ${PEERS:-d12_hd64 d12_hd128 d20}; do
    $T ${peer_args[$p]} 2>>"$OUT/torch_steps.err" | tee -a "$OUT/torch_steps.jsonl" | python3 -c '
import json, sys
for l in sys.stdin:
    if l.startswith("{"):
        j = json.loads(l)
        print("| torch moe compiled d_model %s head_dim %s experts %s top_k %s | %s | %s | %s | %s |" % (
            j["d_model"], j["head_dim"], j["experts"], j["top_k"], j["tok_s"], j["mfu"], j["dt_ms"], j["peak_mib"]))'
  done
fi
