// nanochat's schedules; see lr_schedule.hpp for the formulas.
#include "optim/lr_schedule.hpp"

#include <algorithm>
#include <cmath>

namespace moelab {

double lr_multiplier(const TrainConfig& train, int64_t step) {
  const double steps = double(train.steps);
  // nearbyint rounds half to even in the default rounding mode, as Python's round() does.
  const int64_t warmup = int64_t(std::nearbyint(train.warmup_ratio * steps));
  const int64_t warmdown = int64_t(std::nearbyint(train.warmdown_ratio * steps));
  if (step < warmup) return double(step + 1) / double(warmup);
  if (step <= train.steps - warmdown) return 1.0;
  const double progress = double(train.steps - step) / double(warmdown);
  return progress + (1.0 - progress) * train.final_lr_frac;
}

double muon_momentum_at(const OptimConfig& optim, int64_t step) {
  const double frac = optim.muon_momentum_warmup > 0
                          ? std::clamp(double(step) / double(optim.muon_momentum_warmup), 0.0, 1.0)
                          : 1.0;
  return (1.0 - frac) * optim.muon_momentum_start + frac * optim.muon_momentum;
}

}  // namespace moelab
