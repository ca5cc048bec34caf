// Routing and dispatch: the router's top-k, the dispatch plan, the balance loss, the router's
// backward, and the permute and combine around the experts.
#pragma once
#include <algorithm>

#include "backend/ops/core.hpp"
#include "backend/ops/fp8_types.hpp"

namespace moelab {

// Which assignments capacity dispatch keeps when an expert overflows (moe.drop_order).
//   rank:  every token's first choice before any second choice, then by token (GShard's rule);
//   token: flat token-major order (t, j), as the seed's dispatch keeps them.
enum class DropOrder { rank, token };

// How the router scores experts and forms the gates (moe.score, moe.top_k, moe.norm_topk,
// moe.route_scale, moe.groups, moe.topk_groups). The defaults are the softmax router with
// renormalized gates.
enum class RouterScore { softmax, sigmoid };
struct RouterSpec {
  RouterScore score = RouterScore::softmax;
  int k = 1;
  bool norm_topk = true;
  float route_scale = 1.0f;
  int groups = 1, topk_groups = 1;  // group-limited routing; groups = 1: off
};

// The router's loss terms (moe.balance_coef, moe.balance_scope, moe.z_loss_coef): how balance_loss
// and router_bwd read them.
struct BalanceSpec {
  RouterScore score = RouterScore::softmax;  // how probs are read (sigmoid: normalized per token)
  float coef = 0;         // balance-loss coefficient (0: no balance term)
  float grad_scale = 1;   // router_bwd: the terms' weight in the total loss
  int64_t seq_len = 0;    // > 0: sequence scope, f and P per sequence of seq_len tokens
  float z_coef = 0;       // router_bwd: z-loss coefficient
};


class RoutingOps : public virtual BackendCore {
 public:
  // --- MoE routing -------------------------------------------------------------------------------
  // router_topk: logits [T, E] f32 -> probs [T, E] f32: the scores (spec.score: softmax over the
  // experts, or sigmoid per expert); topk_idx [T, k] i32: the experts chosen on the choice scores
  // (scores + bias[e] when a bias [E] is given, else the scores), by descending choice score (ties:
  // lower expert index first); with spec.groups > 1 the choice is limited to the spec.topk_groups
  // groups (of E / groups consecutive experts) whose two best choice scores sum highest (ties:
  // lower group first). gates [T, k] f32 = route_scale * (chosen scores / their sum when
  // norm_topk, else the chosen scores); the bias never reaches the gates.
  virtual void router_topk(const Tensor& logits, const RouterSpec& spec, const Tensor* bias, Tensor& probs,
                           Tensor& topk_idx, Tensor& gates) = 0;
  // The default router (softmax, renormalized gates, no bias, no groups).
  void router_topk(const Tensor& logits, int k, Tensor& probs, Tensor& topk_idx, Tensor& gates) {
    RouterSpec spec;
    spec.k = k;
    router_topk(logits, spec, nullptr, probs, topk_idx, gates);
  }

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

  // Switch balance loss: bal[0] = coef * E * sum_e f_e * P_e with P_e = mean_t p[t, e] and the
  // routed fractions f_e = routed[e] / sum(routed) (sum(routed) is T*k for one rank's own routing;
  // routed may hold a data-parallel group's counts, or a whole step's so far, so f_e is theirs).
  // p is probs read as spec.score says: softmax probabilities as they are, sigmoid scores
  // normalized to sum 1 per token. With spec.seq_len > 0 (the sequence scope) f and P are taken
  // per sequence of seq_len consecutive tokens (f from topk_idx [T, k], routed unread) and the
  // loss is their mean over the sequences.
  virtual void balance_loss(const Tensor& probs, const Tensor& topk_idx, const Tensor& routed,
                            const BalanceSpec& spec, Tensor& bal) = 0;
  // The default: micro-batch scope, softmax probabilities.
  void balance_loss(const Tensor& probs, const Tensor& routed, float coef, Tensor& bal) {
    BalanceSpec spec;
    spec.coef = coef;
    balance_loss(probs, Tensor{}, routed, spec, bal);
  }

  // Router backward: from dgates [T, k] (loss gradient w.r.t. the gates) and the balance loss as
  // balance_loss defines it (weighted by bal.grad_scale, its weight in the total loss, times
  // bal.coef) and the z-loss (bal.z_coef * bal.grad_scale * mean_t logsumexp(logits[t])^2; logits
  // are read only when z_coef != 0), writes dlogits [T, E] f32. The top-k selection and the routed
  // fractions are treated as constants.
  virtual void router_bwd(const Tensor& logits, const Tensor& probs, const Tensor& topk_idx, const Tensor& gates,
                          const Tensor& dgates, const Tensor& routed, const RouterSpec& spec,
                          const BalanceSpec& bal, Tensor& dlogits) = 0;
  // The default router and balance loss, micro-batch scope, no z-loss.
  void router_bwd(const Tensor& probs, const Tensor& topk_idx, const Tensor& gates, const Tensor& dgates,
                  const Tensor& routed, float bal_coef, float bal_grad_scale, Tensor& dlogits) {
    RouterSpec spec;
    spec.k = int(topk_idx.numel() / std::max<int64_t>(probs.rows(), 1));
    BalanceSpec bal;
    bal.coef = bal_coef;
    bal.grad_scale = bal_grad_scale;
    router_bwd(Tensor{}, probs, topk_idx, gates, dgates, routed, spec, bal, dlogits);
  }

  // Router statistics of one micro-batch, added into acc [2] (probs' dtype): acc[0] += sum over
  // tokens of the entropy -sum_e q ln q of the router's distribution q (softmax probabilities;
  // sigmoid scores normalized to sum 1), acc[1] += sum over tokens of logsumexp(logits[t])^2.
  virtual void router_stats(const Tensor& logits, const Tensor& probs, RouterScore score, Tensor& acc) = 0;

  // Auxiliary-loss-free balancing (DeepSeek-V3): with load [E] (probs' dtype: assignments per
  // expert over a step) and its mean m, bias[e] += rate * sign(m - load[e]) (sign(0) = 0).
  virtual void router_bias_update(const Tensor& load, float rate, Tensor& bias) = 0;

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
