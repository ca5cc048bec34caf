#!/usr/bin/env bash
# Device call 2: moelab and the PyTorch peer (shared/anchors/torch_moe_ref.py) side by side on
# one card at the seed shape, plus the card's cuBLAS ceilings. Prints one table at the end.
#   STEPS=30 bash bench/gpu/speed_vs_torch.sh
#   ONLY="moe_dropless_graph moe_capacity_graph" PEER="moe" bash bench/gpu/speed_vs_torch.sh
# ONLY keeps those moelab runs; PEER lists the peer's runs (moe dense moe-eager; default all).
source bench/gpu/device_env.sh
B=$GPU_BIN
steps=${STEPS:-40}
peer=" ${PEER:-moe dense moe-eager} "
run() {  # name, then --set overrides
  local name=$1; shift
  if [ -n "${ONLY:-}" ] && [[ " $ONLY " != *" $name "* ]]; then return; fi
  "$B/moelab" train --config configs/d12-moe.toml --out "/tmp/speed/$name" --set train.steps=$steps "$@" \
    > "$OUT/$name.log" 2>&1 || { echo "$name failed"; tail -3 "$OUT/$name.log"; }
}
run moe_dropless_graph --set exec=graph
run moe_capacity_graph --set exec=graph --set moe.dispatch=capacity
run moe_dropless_eager --set exec=eager
run dense_graph --set exec=graph --set moe.experts=0
# The peer updates every parameter with fused AdamW; these runs do the same work.
run moe_dropless_graph_adamw --set exec=graph --set optim.matrix_optimizer=adamw
run moe_capacity_graph_adamw --set exec=graph --set moe.dispatch=capacity --set optim.matrix_optimizer=adamw
run dense_graph_adamw --set exec=graph --set moe.experts=0 --set optim.matrix_optimizer=adamw
T="python3 $B/torch_moe_ref.py --steps 20"
$T --what ceilings > "$OUT/torch.jsonl"
[[ $peer == *" moe "* ]] && $T --mlp moe --compile 1 >> "$OUT/torch.jsonl"
[[ $peer == *" dense "* ]] && $T --mlp dense --compile 1 >> "$OUT/torch.jsonl"
[[ $peer == *" moe-eager "* ]] && $T --mlp moe --compile 0 >> "$OUT/torch.jsonl"
python3 bench/gpu/steps_table.py /tmp/speed/* | tee "$OUT/speed.txt"
python3 - <<'PY' | tee -a "$OUT/speed.txt"
import json, os
for l in open(os.environ["OUT"] + "/torch.jsonl"):
    j = json.loads(l)
    if "tok_s" in j:
        print(f"| torch {j['mlp']} compile={j['compile']} | {j['tok_s']:,} | {j['mfu']} | {j['dt_ms']} | {j['peak_mib']:,} |")
    else:
        print("ceilings:", {k: round(v, 1) for k, v in j.items() if isinstance(v, float)}, j.get("device"))
PY
