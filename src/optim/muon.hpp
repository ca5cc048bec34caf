// Muon (MomentUm Orthogonalized by Newton-Schulz) for the hidden weight matrices, as nanochat runs
// it: buf = lerp(buf, g, 1 - mu); u = nesterov ? lerp(g, buf, mu) : buf; X = NS(u);
// p = p (1 - lr wd) - lr sqrt(max(1, rows / cols)) X. A 3-D [E, N, K] expert tensor is E separate
// [N, K] matrices, each orthogonalized on its own (one expert's gradient scale must not shrink
// another's update), all of them in one batched Newton-Schulz pass. Backend ops only: no host reads, so the step is graph-capturable.
#pragma once
#include <cstdint>
#include <vector>

#include "backend/backend.hpp"
#include "model/config.hpp"
#include "model/params.hpp"
#include "optim/named_tensor.hpp"
#include "optim/newton_schulz.hpp"

namespace moelab {

class Muon {
 public:
  // params: 2-D or 3-D tensors in the master dtype; the pointers must outlive this object.
  Muon(Backend& backend, std::vector<Param*> params, const OptimConfig& cfg);

  // One update of every parameter from its gradient; lr is the effective rate (base * schedule).
  void step(double lr, double momentum);

  // "optim/<param name>/momentum" for each parameter.
  void append_state(std::vector<NamedTensor>& out) const;

 private:
  struct MatrixSizes {
    int64_t numel = 0, side = 0;  // largest matrix, largest min(rows, cols)
    int64_t batch = 1;            // most experts in one 3-D tensor
  };
  static MatrixSizes max_sizes(const std::vector<Param*>& params);  // throws on a non-matrix
  Muon(Backend& backend, const std::vector<Param*>& params, const OptimConfig& cfg, const MatrixSizes& sizes);
  void update_matrix(Tensor value, Tensor grad, Tensor buf, float lr, float momentum);

  Backend& backend_;
  std::vector<Param*> params_;
  std::vector<Tensor> momentum_;  // per parameter, like its value, zero at start
  OptimConfig cfg_;
  Tensor blend_;                  // [max numel, 1] master dtype: the Nesterov blend
  NewtonSchulz ns_;
};

}  // namespace moelab
