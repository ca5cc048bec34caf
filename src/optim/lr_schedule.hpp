// Learning-rate and momentum schedules, as nanochat's base_train defines them, so runs compare
// step for step: linear warm-up, a flat middle, a linear warm-down to final_lr_frac; and Muon's
// momentum ramp. Pure functions of (config, step): a resumed run gets the same values.
#pragma once
#include <cstdint>

#include "config/config.hpp"

namespace moelab {

// Multiplier of every base learning rate at 0-based step `step` of train.steps:
//   step < W                : (step + 1) / W                 W = round(warmup_ratio * steps)
//   step <= steps - D       : 1                              D = round(warmdown_ratio * steps)
//   otherwise               : p + (1 - p) * final_lr_frac,   p = (steps - step) / D
// (round half to even, like Python's round).
double lr_multiplier(const TrainConfig& train, int64_t step);

// Muon momentum at `step`: linear from muon_momentum_start to muon_momentum over the first
// muon_momentum_warmup steps, then constant (no ramp when the warm-up is 0).
double muon_momentum_at(const OptimConfig& optim, int64_t step);

}  // namespace moelab
