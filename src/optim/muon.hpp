// Muon (MomentUm Orthogonalized by Newton-Schulz) for the hidden weight matrices, as nanochat runs
// it: buf = lerp(buf, g, 1 - mu); u = nesterov ? lerp(g, buf, mu) : buf; X = NS(u);
// p = p (1 - lr wd) - lr sqrt(max(1, rows / cols)) X. A 3-D [E, N, K] expert tensor is E separate
// [N, K] matrices, each orthogonalized on its own (one expert's gradient scale must not shrink
// another's update).
//
// On a GPU the cost was launch count and small GEMMs, not flops, so matrices are handled in groups:
// every matrix of one shape [m, n] (the attention matrices of all layers, all routers, all
// experts' w_fc of all layers, ...) forms one stack [G, m, n]. The group's momentum buffers are one
// contiguous [G, m, n] allocation (each parameter's momentum, as checkpoints name it, is a view into
// it), the gradients are gathered into one scratch stack (one copy per parameter, or a view when
// they already lie contiguously), and then the momentum update, the Nesterov blend, the
// normalization and the whole Newton-Schulz iteration are one op each for the group. The weight
// update is one op per parameter (one per group when the weights lie contiguously). Shapes the
// batched pass cannot take (NewtonSchulz::batchable) and lone 2-D matrices run matrix by matrix.
// A group holds at most kMaxGroupElems elements, which bounds the scratch it needs.
// optim.muon_variant = normuon (the seed's): Newton-Schulz runs the Polar Express coefficients,
// and the update goes through Backend::normuon_update: each matrix's orthogonalized update is
// divided by the root of an EMA of its per-row (tall) or per-column (wide) mean square, rescaled
// to keep its norm, and applied with weight decay that is cautious (only where update and weight
// agree in sign) if optim.cautious_weight_decay. The EMA is state: "optim/<name>/second_moment".
// Backend ops only, no host reads: the step is graph-capturable.
#pragma once
#include <cstdint>
#include <vector>

#include "backend/backend.hpp"
#include "config/config.hpp"
#include "model/params.hpp"
#include "optim/named_tensor.hpp"
#include "optim/newton_schulz.hpp"

namespace moelab {

class Muon {
 public:
  // Elements per same-shape group; a larger family of matrices is split into several groups.
  static constexpr int64_t kMaxGroupElems = int64_t(1) << 27;

  // params: 2-D or 3-D tensors in the master dtype; the pointers must outlive this object.
  Muon(Backend& backend, std::vector<Param*> params, const OptimConfig& cfg);

  // One update of every parameter from its gradient; lr is the effective rate (base * schedule),
  // weight_decay this step's decay (optim.weight_decay unless given).
  void step(double lr, double momentum);
  void step(double lr, double momentum, double weight_decay);

  // "optim/<param name>/momentum" for each parameter, with the parameter's shape (and
  // "optim/<param name>/second_moment" with normuon).
  void append_state(std::vector<NamedTensor>& out) const;

  // Number of same-shape groups (for tests and logs).
  size_t group_count() const { return groups_.size(); }

 private:
  struct Member {
    Param* param = nullptr;
    int64_t first = 0, count = 1;  // its matrices' place in the group's stack
  };
  struct Group {
    int64_t m = 0, n = 0, count = 0;  // count matrices of [m, n]
    std::vector<Member> members;
    Tensor momentum;     // [count, m, n] master dtype, zero at start
    Tensor grads;        // the members' gradients as one [count, m, n] view, if they are contiguous
    Tensor values;       // likewise for the weights
    Tensor second_moment;  // normuon: [count, m or n] master dtype, zero at start
    bool batched = false;  // one Newton-Schulz pass for the whole stack
  };
  bool normuon() const { return cfg_.muon_variant == "normuon"; }
  // Rows (tall) or columns (wide) that normuon keeps statistics for.
  static int64_t kept_dim(const Group& g) { return g.m >= g.n ? g.m : g.n; }
  // The update of matrices [first, first + count) of the group from their orthogonalized x.
  void apply_update(Group& g, const Tensor& x, Tensor& values, int64_t first, int64_t count, float lr, float wd);
  static std::vector<Group> make_groups(const std::vector<Param*>& params);  // throws on a non-matrix
  static std::vector<NewtonSchulz::StackShape> stack_shapes(const std::vector<Group>& groups);
  Muon(Backend& backend, std::vector<Param*> params, const OptimConfig& cfg, std::vector<Group> groups);
  void update_group(Group& g, float lr, float mu, float wd);

  Backend& backend_;
  std::vector<Param*> params_;
  OptimConfig cfg_;
  std::vector<Group> groups_;
  std::vector<Tensor> momentum_;  // per parameter: a view into its group's stack
  std::vector<Tensor> second_moment_;  // normuon, per parameter: a view into its group's
  Tensor gathered_;  // master dtype: a group's gradients when not contiguous (unallocated if none)
  Tensor blend_;     // [largest group, 1] act dtype: u, the Newton-Schulz input
  NewtonSchulz ns_;
};

}  // namespace moelab
