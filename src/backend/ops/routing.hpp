// Routing and dispatch: the router's top-k, the dispatch plan, the balance loss, the router's
// backward, and the permute and combine around the experts.
#pragma once
#include "backend/ops/core.hpp"
#include "backend/ops/fp8_types.hpp"

namespace moelab {

// Which assignments capacity dispatch keeps when an expert overflows (moe.drop_order).
//   rank:  every token's first choice before any second choice, then by token (GShard's rule);
//   token: flat token-major order (t, j), as the seed's dispatch keeps them.
enum class DropOrder { rank, token };


class RoutingOps : public virtual BackendCore {
 public:
  // --- MoE routing -------------------------------------------------------------------------------
  // logits [T, E] f32 -> probs = softmax (f32 [T, E]); topk_idx [T, k] i32, experts by descending
  // probability (ties: lower expert index first); gates [T, k] f32 = chosen probs / their sum.
  virtual void router_topk(const Tensor& logits, int k, Tensor& probs, Tensor& topk_idx,
                           Tensor& gates) = 0;

  // Dispatch plan from the top-k choices, computed on the device.
  //   routed [E] i32: assignments per expert before any drop;
  //   counts [E] i32: assignments kept; offsets [E+1] i32: exclusive prefix sum of counts;
  //   slot [T*k] i32: row of assignment (t, j) in the permuted buffer, or -1 if dropped;
  //   row_token [R] i32 (R >= T*k rows allocated): token of each permuted row < offsets[E].
  // Order within an expert: by choice rank j first, then token t (all first choices before any
  // second choice). capacity <= 0 means dropless; otherwise an expert keeps the first `capacity`
  // assignments in that order and drops the rest (GShard's priority rule).
  // order = token ranks assignments in flat token-major order (t, j) instead, for both the drop
  // decision and the row order within an expert.
  virtual void moe_plan(const Tensor& topk_idx, int experts, int capacity, Tensor& routed,
                        Tensor& counts, Tensor& offsets, Tensor& slot, Tensor& row_token,
                        DropOrder order = DropOrder::rank) = 0;

  // Switch balance loss: bal[0] = coef * E * sum_e f_e * mean_t probs[t, e], with the routed
  // fractions f_e = routed[e] / sum(routed) (sum(routed) is T*k for one rank's own routing;
  // routed may hold a data-parallel group's counts, so f_e is the group's).
  virtual void balance_loss(const Tensor& probs, const Tensor& routed, float coef, Tensor& bal) = 0;

  // Router backward: from dgates [T, k] (loss gradient w.r.t. the renormalized gates) and the
  // balance loss (scaled by bal_grad_scale, its weight in the total loss, times coef), writes
  // dlogits [T, E] f32. The top-k selection and the routed fractions (f_e as balance_loss
  // reads them from routed) are treated as constants.
  virtual void router_bwd(const Tensor& probs, const Tensor& topk_idx, const Tensor& gates,
                          const Tensor& dgates, const Tensor& routed, float bal_coef,
                          float bal_grad_scale, Tensor& dlogits) = 0;

  // xp[r] = x[row_token[r]] for r < offsets[E]; rows past offsets[E] are left untouched.
  // amax (AmaxSink per expert, its offsets these offsets): each expert's amax of xp.
  virtual void moe_permute(const Tensor& x, const Tensor& row_token, const Tensor& offsets, Tensor& xp,
                           const AmaxSink* amax = nullptr) = 0;
  // dx[t] += sum_j dxp[slot[t, j]] over kept assignments.
  virtual void moe_permute_bwd(const Tensor& dxp, const Tensor& slot, Tensor& dx) = 0;
  // y[t] (+)= sum_j gates[t, j] * yp[slot[t, j]] over kept assignments.
  virtual void moe_combine(const Tensor& yp, const Tensor& slot, const Tensor& gates, Tensor& y,
                           bool accumulate) = 0;
  // dyp[slot[t, j]] = gates[t, j] * dy[t]; dgates[t, j] = <dy[t], yp[slot[t, j]]> (0 if dropped).
  // amax (AmaxSink per expert): each expert's amax of dyp.
  virtual void moe_combine_bwd(const Tensor& dy, const Tensor& yp, const Tensor& slot, const Tensor& gates,
                               Tensor& dyp, Tensor& dgates, const AmaxSink* amax = nullptr) = 0;
};

}  // namespace moelab
