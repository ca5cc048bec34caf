#!/bin/sh
# A stand-in for `moelab train` in the lab's tests: writes a run folder as docs/RUN_FOLDER.md
# describes, then ends the way the overrides ask, so the sweep's status, retry and naming rules
# can be tested in milliseconds. Overrides it reads (--set key=value):
#   fake.mode   ok | fail | segv | hang | fail_unless_eager | flaky (fails once, then ok) |
#               slow (keeps a checkpoint, then hangs until stopped; resumed, it completes)
#   train.resume  auto: resumes (slow then completes)
#   fake.steps  steps to write (default 5)
#   exec        eager makes fail_unless_eager succeed
out=""; mode="ok"; steps=5; exec_mode="graph"; resume=""
while [ $# -gt 0 ]; do
  case "$1" in
    --out) out="$2"; shift 2 ;;
    --config) shift 2 ;;
    --set)
      case "$2" in
        fake.mode=*) mode="${2#fake.mode=}" ;;
        fake.steps=*) steps="${2#fake.steps=}" ;;
        exec=*) exec_mode="${2#exec=}" ;;
        train.resume=*) resume="${2#train.resume=}" ;;
        bad.key=*) echo "moelab: error: unknown config key \"bad.key\" (see moelab train --help-config)" >&2; exit 1 ;;
      esac
      shift 2 ;;
    *) shift ;;
  esac
done
[ -n "$out" ] || { echo "moelab: error: --out is required" >&2; exit 1; }
mkdir -p "$out"
echo $$ > "$out/pid"
printf 'exec = "%s"\n[fake]\nmode = "%s"\nsteps = %s\n' "$exec_mode" "$mode" "$steps" > "$out/config.toml"
printf '{"status": "running", "step": null, "steps": %s, "error": ""}\n' "$steps" > "$out/status.json"
: > "$out/metrics.jsonl"
if [ "$mode" = "flaky" ]; then
  marker="$out/../.flaky_$(basename "$out")"
  if [ ! -e "$marker" ]; then : > "$marker"; mode="segv"; else mode="ok"; fi
fi
i=0
while [ $i -lt "$steps" ]; do
  loss=$(awk "BEGIN { printf \"%.4f\", 5.0 / ($i + 1) + 1 }")
  printf '{"event": "step", "step": %d, "steps": %d, "loss": %s, "bal": 0.01, "dt_ms": 100.0, "tok_sec": 1000, "mfu": null, "drop_rate": 0.1, "expert_load": [[0.5, 0.25, 0.125, 0.125], [0.25, 0.25, 0.25, 0.25]]}\n' \
    $i "$steps" "$loss" >> "$out/metrics.jsonl"
  echo "step $i/$steps | loss: $loss"
  i=$((i + 1))
done
case "$mode" in
  fail)
    echo "warning: something harmless" >&2
    echo "moelab: error: model.d_model (7) must be a multiple of model.head_dim (64)" >&2
    printf '{"status": "failed", "step": 0, "steps": %s, "error": "model.d_model (7) must be a multiple of model.head_dim (64)"}\n' "$steps" > "$out/status.json"
    exit 1 ;;
  fail_unless_eager)
    if [ "$exec_mode" != "eager" ]; then
      echo "moelab: error: CUDA graph capture failed: dynamic shapes in dispatch" >&2
      exit 1
    fi ;;
  segv) kill -SEGV $$ ;;
  hang) exec sleep 1000 ;;  # exec: the sleep keeps this pid (and the parent-death signal)
  slow)
    if [ "$resume" != "auto" ]; then
      mkdir -p "$out/checkpoints"
      : > "$out/checkpoints/step_000002.safetensors"
      exec sleep 1000
    fi ;;
esac
printf '{"event": "end", "step": %d, "peak_mem_mib": 12.5, "total_time_min": 0.01}\n' $((steps - 1)) >> "$out/metrics.jsonl"
printf '{"status": "completed", "step": %d, "steps": %s, "error": "", "peak_mem_mib": 12.5, "total_time_min": 0.01}\n' $((steps - 1)) "$steps" > "$out/status.json"
echo "Peak memory usage: 12.50MiB"
echo "Total training time: 0.01m"
exit 0
