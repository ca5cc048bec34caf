#!/usr/bin/env bash
# Device call: per-kernel GPU time of one steady-state training step at the seed shape, from
# Nsight Compute (kernels serialized, clocks left alone). MOELAB_PROFILE_STEP brackets the step;
# the table groups kernels by name and sums their durations. Extra --set overrides pass through:
#   bash bench/gpu/profile_step.sh --set optim.matrix_optimizer=adamw
source bench/gpu/device_env.sh
name=${NAME:-profile}
MOELAB_PROFILE_STEP=2 ncu --profile-from-start off --clock-control none --metrics gpu__time_duration.sum \
  --csv --print-units base "$GPU_BIN/moelab" train --config configs/d12-moe.toml --out "/tmp/$name" \
  --set train.steps=3 --set exec=eager "$@" > "$OUT/$name.csv" 2> "$OUT/$name.err" || tail -5 "$OUT/$name.err"
python3 - "$OUT/$name.csv" <<'PY' | tee "$OUT/$name.txt"
import csv, sys, collections, re
rows = [r for r in csv.reader(l for l in open(sys.argv[1]) if l.startswith('"'))]
head, rows = rows[0], rows[1:]
ki, vi = head.index("Kernel Name"), head.index("Metric Value")
tot, calls = collections.Counter(), collections.defaultdict(list)
for r in rows:
    name = re.sub(r"\(.*", "", r[ki])[:90]
    ns = float(r[vi].replace(",", ""))
    tot[name] += ns / 1e6; calls[name].append(ns / 1e3)
all_ms = sum(tot.values())
print(f"{len(rows)} kernels, {all_ms:.2f} ms of kernel time in the step")
print("| kernel | calls | ms | % | median us/call | max us |\n| --- | ---: | ---: | ---: | ---: | ---: |")
for n, t in tot.most_common(40):
    c = sorted(calls[n])
    print(f"| {n} | {len(c)} | {t:.3f} | {100*t/all_ms:.1f} | {c[len(c)//2]:.1f} | {c[-1]:.1f} |")
PY
