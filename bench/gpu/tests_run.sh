#!/usr/bin/env bash
# The GPU tests in one device call: the whole of test_cuda (op harness, GPU resume, GPU sampling,
# then the seed-shape model against the CPU), the GPU FP8 training test, a test_cuda built with
# planted defects (staged as test_cuda_planted: each named test must fail, saying what it caught),
# and `moelab sample`'s decoding speed at the seed shape (batch 1).
#   BINS="test_cuda test_train" bench/gpu/stage.sh    # then, on the device:
#   bash bench/gpu/tests_run.sh
source bench/gpu/device_env.sh
B=$GPU_BIN
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-16}

echo "== test_cuda, every test but the model against the CPU (last: its CPU half takes minutes)"
timeout 240 "$B/test_cuda" --gtest_filter='-CudaModel.SeedShape*' > "$OUT/test_cuda.log" 2>&1
echo "test_cuda rc=$?"
grep -E "^\[  (PASSED|FAILED|SKIPPED) |FAILED  \]|tests? ran" "$OUT/test_cuda.log" | head -40
grep -B3 -A6 "Failure" "$OUT/test_cuda.log" | head -80

if [ -x "$B/test_cuda_planted" ]; then
  echo "== test_cuda with planted defects (each named test must fail)"
  timeout 120 "$B/test_cuda_planted" --gtest_filter="${PLANTED_FILTER:-CudaOps.RmsNormAndRopeNorm:CudaOps.GroupedWgradOverNoRows*}" \
    > "$OUT/test_cuda_planted.log" 2>&1
  echo "planted rc=$?"
  grep -E "^\[  (PASSED|FAILED) |FAILED  \]|worst row|no rows|Expected|actual" "$OUT/test_cuda_planted.log" | head -30
fi

if [ -x "$B/test_train" ]; then
  echo "== GPU FP8 training"
  timeout 150 "$B/test_train" --gtest_filter='Fp8Training.OnTheGpu*' > "$OUT/test_train_gpu.log" 2>&1
  echo "test_train rc=$?"
  grep -E "^cuda|parted|OK \]|FAILED" "$OUT/test_train_gpu.log" | head -20
fi

echo "== a model too large for the card is refused before it allocates, writing nothing"
"$B/moelab" train --config configs/d12-seed.toml --set model.d_model=16384 --set model.head_dim=128 \
  --out /tmp/too_big > "$OUT/too_big.log" 2>&1
echo "too large rc=$? (want 1), run folder left: $([ -e /tmp/too_big ] && echo yes || echo no)"
tail -2 "$OUT/too_big.log"

echo "== test_cuda: the seed-shape model, GPU against CPU"
timeout ${MODEL_LIMIT:-420} "$B/test_cuda" --gtest_filter='CudaModel.SeedShape*' > "$OUT/test_cuda_model.log" 2>&1
echo "test_cuda model rc=$?"
grep -E "^\[  (PASSED|FAILED) |FAILED  \]|^worst|^step|Failure|Expected|actual" "$OUT/test_cuda_model.log" | head -40

if [ -x "$B/moelab" ]; then
  echo "== sample at the seed shape (one step of training, then greedy decoding at batch 1)"
  rm -rf /tmp/seed_sample
  "$B/moelab" train --config configs/d12-seed.toml --set train.steps=1 --set train.total_batch_tokens=0 \
    --set train.save_final=true --out /tmp/seed_sample > "$OUT/seed_sample_train.log" 2>&1 || tail -3 "$OUT/seed_sample_train.log"
  for n in 64 512; do
    "$B/moelab" sample --run /tmp/seed_sample --prompt "The jury said" --max-tokens $n --temperature 0 --device cuda \
      > "$OUT/sample_$n.txt" 2> "$OUT/sample_$n.err"
    echo "sample $n tokens rc=$?: $(tail -1 "$OUT/sample_$n.err")"
  done
fi
