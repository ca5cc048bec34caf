// AdamW for the embedding and the unembedding (nanochat's split: Muon for hidden matrices, AdamW
// for the token tables). Each parameter has its own base learning rate; the update itself is the
// backend's fused adamw_update (bias-corrected moments, decoupled weight decay).
#pragma once
#include <cstdint>
#include <vector>

#include "backend/backend.hpp"
#include "config/config.hpp"
#include "model/params.hpp"
#include "optim/named_tensor.hpp"

namespace moelab {

// Per-parameter departures from the config (negative: the config's value).
struct AdamWOverrides {
  double beta1 = -1;
  double weight_decay = -1;
};

class AdamW {
 public:
  using Overrides = AdamWOverrides;
  AdamW(Backend& backend, const OptimConfig& cfg) : backend_(backend), cfg_(cfg) {}

  // Adds a parameter updated at base_lr * lr_multiplier; the pointer must outlive this object.
  void add(Param* param, double base_lr, Overrides overrides = {});

  // step: 0-based training step (bias correction uses step + 1).
  void step(int64_t step, double lr_multiplier);

  // "optim/<param name>/exp_avg" and ".../exp_avg_sq" for each parameter.
  void append_state(std::vector<NamedTensor>& out) const;

 private:
  struct Slot {
    Param* param;
    double base_lr;
    Tensor m, v;
    Overrides overrides;
  };
  Backend& backend_;
  OptimConfig cfg_;
  std::vector<Slot> slots_;
};

}  // namespace moelab
