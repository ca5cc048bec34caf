#!/usr/bin/env bash
# Device call: kernel-by-kernel profiles of one FP8-all tensorwise step (AdamW) at the seed shape
# and at d20, as bench/gpu/profile_step.sh takes them.
source bench/gpu/device_env.sh
fp8=(--set precision=fp8 --set fp8.layers=all --set fp8.recipe=tensorwise --set optim.matrix_optimizer=adamw)
NAME=profile_seed_fp8_all timeout 200 bash bench/gpu/profile_step.sh "${fp8[@]}" | head -45
NAME=profile_d20_fp8_all timeout 250 bash bench/gpu/profile_step.sh "${fp8[@]}" --set model.d_model=1280 --set model.layers=20 \
  --set model.head_dim=128 --set train.seq_len=2048 --set train.batch_size=8 --set moe.expert_hidden=2560 | head -30
