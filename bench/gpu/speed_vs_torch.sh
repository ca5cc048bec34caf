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
python3 - "$steps" <<'PY' | tee "$OUT/speed.txt"
import json, sys, glob, statistics as st, os
steps = int(sys.argv[1])
print("| run | median tok/s (steps 10+) | mfu % | median dt ms | peak MiB |")
print("| --- | ---: | ---: | ---: | ---: |")
for d in sorted(glob.glob("/tmp/speed/*")):
    recs = [json.loads(l) for l in open(d + "/metrics.jsonl") if '"event":"step"' in l]
    tail = [r for r in recs if r["step"] >= 10]
    if not tail: print(f"| {os.path.basename(d)} | failed | | | |"); continue
    print(f"| moelab {os.path.basename(d)} | {st.median(r['tok_sec'] for r in tail):,.0f} | {st.median(r['mfu'] or 0 for r in tail):.2f} "
          f"| {st.median(r['dt_ms'] for r in tail):.1f} | {max(r['peak_mem_mib'] for r in recs):,.0f} |")
for l in open(os.environ["OUT"] + "/torch.jsonl"):
    j = json.loads(l)
    if "tok_s" in j:
        print(f"| torch {j['mlp']} compile={j['compile']} | {j['tok_s']:,} | {j['mfu']} | {j['dt_ms']} | {j['peak_mib']:,} |")
    else:
        print("ceilings:", {k: round(v, 1) for k, v in j.items() if isinstance(v, float)}, j.get("device"))
PY
