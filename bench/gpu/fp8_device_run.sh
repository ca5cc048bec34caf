#!/usr/bin/env bash
# One device call for FP8 (issue: FP8 training on the GPU), run from a folder holding the staged
# binaries (bench/gpu/stage_fp8.sh): the FP8 op harness, the FP8 GEMM benchmark, and training
# speed at the seed shape (AdamW on the matrices, graph, dropless) for BF16 and each FP8 recipe,
# beside torch_moe_ref.py --mlp moe --compile 1 --fp8 none|dense|experts|all. Logs under $OUT;
# a summary table at the end.
#   STEPS=30 TORCH_FP8="none dense" bash fp8_device_run.sh
set -u
D=$(cd "$(dirname "$0")" && pwd)
export LD_LIBRARY_PATH="$D/lib:/usr/local/cuda/lib64${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
OUT=${OUT:-/tmp/fp8_out}
mkdir -p "$OUT"
steps=${STEPS:-30}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
date -u +%Y-%m-%dT%H:%MZ | tee -a "$OUT/gpu.txt"

echo "== op harness"
timeout 180 "$D/test_cuda" --gtest_filter="${TEST_FILTER:-CudaFp8*}" > "$OUT/test_cuda.log" 2>&1
echo "test_cuda rc=$?"; grep -E "^\[  (PASSED|FAILED) |Failure|FAILED  \]" "$OUT/test_cuda.log" | head -20
grep -B2 -A6 "Failure" "$OUT/test_cuda.log" | head -60

echo "== FP8 GEMM benchmark"
timeout 120 "$D/bench_fp8_gemm" > "$OUT/bench_fp8_gemm.md" 2>&1; echo "bench rc=$?"
cat "$OUT/bench_fp8_gemm.md"

echo "== training speed, seed shape, $steps steps"
run() {  # name, then --set overrides
  local name=$1; shift
  timeout 150 "$D/moelab" train --config "$D/d12-moe.toml" --out "/tmp/fp8speed/$name" --set train.steps=$steps \
    --set optim.matrix_optimizer=adamw "$@" > "$OUT/$name.log" 2>&1 || { echo "$name failed"; tail -5 "$OUT/$name.log"; }
}
run moe_bf16_dynamic --set precision=bf16
run moe_fp8_noexperts_tensorwise_dynamic --set precision=fp8 --set fp8.recipe=tensorwise
run moe_fp8_noexperts_rowwise_dynamic --set precision=fp8 --set fp8.recipe=rowwise
run moe_fp8_noexperts_blockwise_dynamic --set precision=fp8 --set fp8.recipe=blockwise
run moe_fp8_noexperts_nohead_tensorwise_dynamic --set precision=fp8 --set fp8.recipe=tensorwise --set fp8.head=false
if [ -n "${STATIC:-}" ]; then
  run moe_bf16_static --set precision=bf16 --set moe.dispatch=capacity
  run moe_fp8_noexperts_rowwise_static --set precision=fp8 --set fp8.recipe=rowwise --set moe.dispatch=capacity
fi

echo "== torch peer"
: > "$OUT/torch.jsonl"
for f in ${TORCH_FP8:-none dense experts all}; do
  timeout ${TORCH_TIMEOUT:-200} python3 "$D/torch_moe_ref.py" --mlp moe --compile 1 --steps 20 --fp8 "$f" >> "$OUT/torch.jsonl" 2> "$OUT/torch_$f.err" \
    || { echo "torch --fp8 $f failed"; tail -3 "$OUT/torch_$f.err"; }
done

python3 - "$OUT" <<'PY' | tee "$OUT/speed.md"
import json, sys, glob, statistics as st, os
out = sys.argv[1]
print("| run | median tok/s (steps 10+) | vs BF16 | mfu % | median dt ms | peak MiB | last loss |")
print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
rows = {}
for d in sorted(glob.glob("/tmp/fp8speed/*")):
    recs = [json.loads(l) for l in open(d + "/metrics.jsonl") if '"event":"step"' in l]
    tail = [r for r in recs if r["step"] >= 10]
    rows[os.path.basename(d)] = (recs, tail)
base = {k: st.median(r["tok_sec"] for r in v[1]) for k, v in rows.items() if v[1] and k.startswith("moe_bf16")}
for name, (recs, tail) in rows.items():
    if not tail: print(f"| moelab {name} | failed | | | | | |"); continue
    tok = st.median(r["tok_sec"] for r in tail)
    ref = base.get("moe_bf16_static" if name.endswith("static") else "moe_bf16_dynamic")
    print(f"| moelab {name} | {tok:,.0f} | {tok / ref if ref else float('nan'):.2f}x | {st.median(r['mfu'] or 0 for r in tail):.2f} "
          f"| {st.median(r['dt_ms'] for r in tail):.1f} | {max(r['peak_mem_mib'] for r in recs):,.0f} | {recs[-1]['raw_loss']:.4f} |")
tb = None
for l in open(out + "/torch.jsonl"):
    try: j = json.loads(l)
    except Exception: continue
    if "tok_s" not in j: continue
    if j.get("fp8", "none") == "none": tb = j["tok_s"]
    rel = f"{j['tok_s'] / tb:.2f}x" if tb else ""
    print(f"| torch moe compile={j['compile']} fp8={j.get('fp8')} | {j['tok_s']:,} | {rel} | {j['mfu']} | {j['dt_ms']} | {j['peak_mib']:,} | |")
PY
