// MoE router: softmax + top-k with renormalized gates, the Switch balance loss, and their joint
// backward to the router logits. Per-token work is independent and split over threads; the
// balance loss's column means run serially over tokens in a fixed order.
#include <algorithm>
#include <cmath>

#include "backend/cpu/cpu_backend.hpp"
#include "backend/cpu/cpu_common.hpp"

namespace moelab {

using namespace cpu;

void CpuBackend::router_topk(const Tensor& logits, int k, Tensor& probs, Tensor& topk_idx,
                             Tensor& gates) {
  const char* op = "router_topk";
  require_float(logits, op, "logits");
  require_like(logits, probs, op, "probs");
  require_i32(topk_idx, op, "topk_idx");
  require_like(logits, gates, op, "gates");
  const int64_t T = logits.rows(), E = logits.cols();
  require(k >= 1 && k <= E, op,
          "k = " + std::to_string(k) + " must be in [1, experts = " + std::to_string(E) +
              "]; fix moe.top_k");
  require_numel(probs, T * E, op, "probs");
  require_numel(topk_idx, T * k, op, "topk_idx");
  require_numel(gates, T * k, op, "gates");
  with_float(logits.dtype, [&](auto te) {
    using T_ = decltype(te);
    const T_* lg = ptr<T_>(logits);
    T_* pr = ptr<T_>(probs);
    int32_t* idx = ptr<int32_t>(topk_idx);
    T_* gt = ptr<T_>(gates);
    pool_.parallel_for(T, grain_for(E * 4), [&](int64_t t0, int64_t t1) {
      std::vector<char> taken(static_cast<size_t>(E));
      for (int64_t t = t0; t < t1; ++t) {
        const T_* l = lg + t * E;
        T_* p = pr + t * E;
        double m = -INFINITY, s = 0;
        for (int64_t e = 0; e < E; ++e) m = double(l[e]) > m ? double(l[e]) : m;
        for (int64_t e = 0; e < E; ++e) s += std::exp(double(l[e]) - m);
        for (int64_t e = 0; e < E; ++e) p[e] = T_(std::exp(double(l[e]) - m) / s);
        // Repeated arg-max with a strict '>' keeps the lower expert index on ties.
        std::fill(taken.begin(), taken.end(), 0);
        T_ chosen_sum = 0;
        for (int j = 0; j < k; ++j) {
          int64_t best = -1;
          for (int64_t e = 0; e < E; ++e)
            if (!taken[size_t(e)] && (best < 0 || p[e] > p[best])) best = e;
          taken[size_t(best)] = 1;
          idx[t * k + j] = int32_t(best);
          chosen_sum += p[best];
        }
        for (int j = 0; j < k; ++j) gt[t * k + j] = p[idx[t * k + j]] / chosen_sum;
      }
    });
  });
}

namespace {

// routed [E] i32 and its total T*k (every assignment before drops).
int64_t routed_total(const Tensor& routed, int64_t E, const char* op) {
  require_i32(routed, op, "routed");
  require_numel(routed, E, op, "routed");
  int64_t total = 0;
  for (int64_t e = 0; e < E; ++e) total += ptr<int32_t>(routed)[e];
  return total;
}

}  // namespace

void CpuBackend::balance_loss(const Tensor& probs, const Tensor& routed, float coef, Tensor& bal) {
  const char* op = "balance_loss";
  require_float(probs, op, "probs");
  require_like(probs, bal, op, "bal");
  require_numel(bal, 1, op, "bal");
  const int64_t T = probs.rows(), E = probs.cols();
  const int64_t total = routed_total(routed, E, op);
  with_float(probs.dtype, [&](auto te) {
    using T_ = decltype(te);
    const T_* p = ptr<T_>(probs);
    const int32_t* r = ptr<int32_t>(routed);
    double acc = 0;
    if (T > 0 && total > 0) {
      for (int64_t e = 0; e < E; ++e) {
        double col = 0;
        for (int64_t t = 0; t < T; ++t) col += double(p[t * E + e]);
        acc += (double(r[e]) / double(total)) * (col / double(T));
      }
    }
    ptr<T_>(bal)[0] = T_(double(coef) * double(E) * acc);
  });
}

void CpuBackend::router_bwd(const Tensor& probs, const Tensor& topk_idx, const Tensor& gates,
                            const Tensor& dgates, const Tensor& routed, float bal_coef,
                            float bal_grad_scale, Tensor& dlogits) {
  const char* op = "router_bwd";
  require_float(probs, op, "probs");
  require_i32(topk_idx, op, "topk_idx");
  require_like(probs, gates, op, "gates");
  require_like(probs, dgates, op, "dgates");
  require_like(probs, dlogits, op, "dlogits");
  const int64_t T = probs.rows(), E = probs.cols();
  const int64_t k = T > 0 ? topk_idx.numel() / T : 0;
  require(topk_idx.numel() == T * k, op,
          "topk_idx " + topk_idx.describe() + " does not hold k choices per token of probs " +
              probs.describe());
  require_numel(gates, T * k, op, "gates");
  require_numel(dgates, T * k, op, "dgates");
  require_numel(dlogits, T * E, op, "dlogits");
  const int64_t total = routed_total(routed, E, op);
  for (int64_t i = 0; i < T * k; ++i)
    require(ptr<int32_t>(topk_idx)[i] >= 0 && ptr<int32_t>(topk_idx)[i] < E, op,
            "topk_idx[" + std::to_string(i) + "] is not an expert in [0, " + std::to_string(E) +
                "); pass the choices written by router_topk");
  with_float(probs.dtype, [&](auto te) {
    using T_ = decltype(te);
    const T_* p = ptr<T_>(probs);
    const int32_t* idx = ptr<int32_t>(topk_idx);
    const T_* g = ptr<T_>(gates);
    const T_* dg = ptr<T_>(dgates);
    const int32_t* r = ptr<int32_t>(routed);
    T_* dl = ptr<T_>(dlogits);
    // d bal / d probs[t, e] = coef * E * f_e / T, with f_e = routed[e] / (T k) held constant.
    std::vector<double> dbal(size_t(E), 0.0);
    if (total > 0 && T > 0)
      for (int64_t e = 0; e < E; ++e)
        dbal[size_t(e)] = double(bal_grad_scale) * double(bal_coef) * double(E) *
                          (double(r[e]) / double(total)) / double(T);
    pool_.parallel_for(T, grain_for(E * 2), [&](int64_t t0, int64_t t1) {
      std::vector<double> dp(static_cast<size_t>(E));
      for (int64_t t = t0; t < t1; ++t) {
        const T_* pt = p + t * E;
        for (int64_t e = 0; e < E; ++e) dp[size_t(e)] = dbal[size_t(e)];
        // gates g_j = p_{i_j} / S with S = sum_j p_{i_j}:
        // dL/dp_{i_j} = (dg_j - sum_l dg_l g_l) / S.
        double S = 0, gdg = 0;
        for (int64_t j = 0; j < k; ++j) {
          S += double(pt[idx[t * k + j]]);
          gdg += double(dg[t * k + j]) * double(g[t * k + j]);
        }
        for (int64_t j = 0; j < k; ++j)
          dp[size_t(idx[t * k + j])] += (double(dg[t * k + j]) - gdg) / S;
        // Softmax backward: dlogit_e = p_e (dp_e - sum p dp).
        double pdp = 0;
        for (int64_t e = 0; e < E; ++e) pdp += double(pt[e]) * dp[size_t(e)];
        for (int64_t e = 0; e < E; ++e) dl[t * E + e] = T_(double(pt[e]) * (dp[size_t(e)] - pdp));
      }
    });
  });
}

}  // namespace moelab
