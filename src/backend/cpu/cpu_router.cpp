// MoE router: scores (softmax or sigmoid) + top-k (optionally biased for the choice and limited to
// the best expert groups) with normalized or raw gates, the Switch balance loss (over the batch or
// per sequence), the router statistics, the aux-loss-free bias update, and the joint backward to
// the router logits. Per-token work is independent and split over threads; the reductions over
// tokens run serially in a fixed order.
#include <algorithm>
#include <cmath>

#include "backend/cpu/cpu_backend.hpp"
#include "backend/cpu/cpu_common.hpp"

namespace moelab {

using namespace cpu;

namespace {

// The checks every routing op shares: group-limited routing must leave k experts to choose from.
void require_spec(const RouterSpec& spec, int64_t E, const char* op) {
  require(spec.k >= 1 && spec.k <= E, op,
          "k = " + std::to_string(spec.k) + " must be in [1, experts = " + std::to_string(E) + "]; fix moe.top_k");
  require(spec.groups >= 1 && E % spec.groups == 0, op,
          "groups = " + std::to_string(spec.groups) + " must divide experts = " + std::to_string(E) +
              "; fix moe.groups");
  require(spec.topk_groups >= 1 && spec.topk_groups <= spec.groups, op,
          "topk_groups = " + std::to_string(spec.topk_groups) + " must be in [1, groups = " +
              std::to_string(spec.groups) + "]; fix moe.topk_groups");
  require(spec.groups == 1 || spec.k <= spec.topk_groups * (E / spec.groups), op,
          "top_k = " + std::to_string(spec.k) + " exceeds the " + std::to_string(spec.topk_groups * (E / spec.groups)) +
              " experts of topk_groups groups; raise moe.topk_groups");
}

}  // namespace

void CpuBackend::router_topk(const Tensor& logits, const RouterSpec& spec, const Tensor* bias, Tensor& probs,
                             Tensor& topk_idx, Tensor& gates) {
  const char* op = "router_topk";
  require_float(logits, op, "logits");
  require_like(logits, probs, op, "probs");
  require_i32(topk_idx, op, "topk_idx");
  require_like(logits, gates, op, "gates");
  const int64_t T = logits.rows(), E = logits.cols();
  const int k = spec.k;
  require_spec(spec, E, op);
  require_numel(probs, T * E, op, "probs");
  require_numel(topk_idx, T * k, op, "topk_idx");
  require_numel(gates, T * k, op, "gates");
  if (bias) {
    require_like(logits, *bias, op, "bias");
    require_numel(*bias, E, op, "bias");
  }
  const int64_t G = spec.groups, per_group = E / G;
  with_float(logits.dtype, [&](auto te) {
    using T_ = decltype(te);
    const T_* lg = ptr<T_>(logits);
    const T_* bs = bias ? ptr<T_>(*bias) : nullptr;
    T_* pr = ptr<T_>(probs);
    int32_t* idx = ptr<int32_t>(topk_idx);
    T_* gt = ptr<T_>(gates);
    const T_ scale = T_(spec.route_scale);
    pool_.parallel_for(T, grain_for(E * 4), [&](int64_t t0, int64_t t1) {
      std::vector<char> taken(static_cast<size_t>(E));
      std::vector<T_> choice(static_cast<size_t>(E));
      std::vector<double> group_score(static_cast<size_t>(G));
      std::vector<char> group_kept(static_cast<size_t>(G));
      for (int64_t t = t0; t < t1; ++t) {
        const T_* l = lg + t * E;
        T_* p = pr + t * E;
        if (spec.score == RouterScore::softmax) {
          double m = -INFINITY, s = 0;
          for (int64_t e = 0; e < E; ++e) m = double(l[e]) > m ? double(l[e]) : m;
          for (int64_t e = 0; e < E; ++e) s += std::exp(double(l[e]) - m);
          for (int64_t e = 0; e < E; ++e) p[e] = T_(std::exp(double(l[e]) - m) / s);
        } else {
          for (int64_t e = 0; e < E; ++e) p[e] = T_(1.0 / (1.0 + std::exp(-double(l[e]))));
        }
        // The choice reads the biased scores; the gates below read the scores alone.
        for (int64_t e = 0; e < E; ++e) choice[size_t(e)] = bs ? T_(p[e] + bs[e]) : p[e];
        std::fill(taken.begin(), taken.end(), 0);
        if (G > 1) {
          // A group's score: the sum of its two best choice scores (its one expert's if it has one).
          for (int64_t g = 0; g < G; ++g) {
            double b1 = -INFINITY, b2 = -INFINITY;
            for (int64_t e = g * per_group; e < (g + 1) * per_group; ++e) {
              const double c = double(choice[size_t(e)]);
              if (c > b1) {
                b2 = b1;
                b1 = c;
              } else if (c > b2) {
                b2 = c;
              }
            }
            group_score[size_t(g)] = per_group >= 2 ? b1 + b2 : b1;
          }
          std::fill(group_kept.begin(), group_kept.end(), 0);
          for (int q = 0; q < spec.topk_groups; ++q) {
            int64_t best = -1;
            for (int64_t g = 0; g < G; ++g)
              if (!group_kept[size_t(g)] && (best < 0 || group_score[size_t(g)] > group_score[size_t(best)])) best = g;
            group_kept[size_t(best)] = 1;
          }
          // Experts of the groups left out are never chosen.
          for (int64_t e = 0; e < E; ++e) taken[size_t(e)] = !group_kept[size_t(e / per_group)];
        }
        // Repeated arg-max with a strict '>' keeps the lower expert index on ties.
        T_ chosen_sum = 0;
        for (int j = 0; j < k; ++j) {
          int64_t best = -1;
          for (int64_t e = 0; e < E; ++e)
            if (!taken[size_t(e)] && (best < 0 || choice[size_t(e)] > choice[size_t(best)])) best = e;
          taken[size_t(best)] = 1;
          idx[t * k + j] = int32_t(best);
          chosen_sum += p[best];
        }
        for (int j = 0; j < k; ++j) {
          const T_ s = p[idx[t * k + j]];
          gt[t * k + j] = (spec.norm_topk ? s / chosen_sum : s) * scale;
        }
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

// The sequence scope's shape: T tokens in sequences of L, topk_idx holding k choices per token.
struct SequenceShape {
  int64_t L = 0, sequences = 0, k = 0;
};
SequenceShape sequence_shape(const BalanceSpec& spec, const Tensor& topk_idx, int64_t T, int64_t E, const char* op) {
  SequenceShape s;
  s.L = spec.seq_len;
  require(T % s.L == 0, op,
          std::to_string(T) + " tokens are not whole sequences of seq_len = " + std::to_string(s.L));
  require_i32(topk_idx, op, "topk_idx");
  s.sequences = T / s.L;
  s.k = T > 0 ? topk_idx.numel() / T : 0;
  require(topk_idx.numel() == T * s.k && s.k >= 1, op,
          "topk_idx " + topk_idx.describe() + " does not hold k choices per token");
  for (int64_t i = 0; i < T * s.k; ++i)
    require(ptr<int32_t>(topk_idx)[i] >= 0 && ptr<int32_t>(topk_idx)[i] < E, op,
            "topk_idx[" + std::to_string(i) + "] is not an expert in [0, " + std::to_string(E) + ")");
  return s;
}

// Per-sequence fractions f[s, e] = (assignments of sequence s to e) / (L k).
std::vector<double> sequence_fractions(const Tensor& topk_idx, const SequenceShape& s, int64_t E) {
  std::vector<double> f(size_t(s.sequences * E), 0.0);
  const int32_t* idx = ptr<int32_t>(topk_idx);
  for (int64_t q = 0; q < s.sequences; ++q)
    for (int64_t i = q * s.L * s.k; i < (q + 1) * s.L * s.k; ++i) f[size_t(q * E + idx[i])] += 1.0;
  for (double& x : f) x /= double(s.L * s.k);
  return f;
}

}  // namespace

void CpuBackend::balance_loss(const Tensor& probs, const Tensor& topk_idx, const Tensor& routed,
                              const BalanceSpec& spec, Tensor& bal) {
  const char* op = "balance_loss";
  require_float(probs, op, "probs");
  require_like(probs, bal, op, "bal");
  require_numel(bal, 1, op, "bal");
  const int64_t T = probs.rows(), E = probs.cols();
  const bool per_sequence = spec.seq_len > 0;
  const int64_t total = per_sequence ? 0 : routed_total(routed, E, op);
  const SequenceShape sq = per_sequence ? sequence_shape(spec, topk_idx, T, E, op) : SequenceShape{};
  with_float(probs.dtype, [&](auto te) {
    using T_ = decltype(te);
    const T_* p = ptr<T_>(probs);
    // Sigmoid scores are read normalized to sum 1 per token.
    std::vector<double> inv_row;
    if (spec.score == RouterScore::sigmoid) {
      inv_row.resize(size_t(T));
      for (int64_t t = 0; t < T; ++t) {
        double s = 0;
        for (int64_t e = 0; e < E; ++e) s += double(p[t * E + e]);
        inv_row[size_t(t)] = 1.0 / s;
      }
    }
    auto q = [&](int64_t t, int64_t e) {
      return inv_row.empty() ? double(p[t * E + e]) : double(p[t * E + e]) * inv_row[size_t(t)];
    };
    double acc = 0;
    if (per_sequence) {
      const std::vector<double> f = sequence_fractions(topk_idx, sq, E);
      for (int64_t s = 0; s < sq.sequences; ++s) {
        double term = 0;
        for (int64_t e = 0; e < E; ++e) {
          double col = 0;
          for (int64_t t = s * sq.L; t < (s + 1) * sq.L; ++t) col += q(t, e);
          term += f[size_t(s * E + e)] * (col / double(sq.L));
        }
        acc += term;
      }
      if (sq.sequences > 0) acc /= double(sq.sequences);
    } else if (T > 0 && total > 0) {
      const int32_t* r = ptr<int32_t>(routed);
      for (int64_t e = 0; e < E; ++e) {
        double col = 0;
        for (int64_t t = 0; t < T; ++t) col += q(t, e);
        acc += (double(r[e]) / double(total)) * (col / double(T));
      }
    }
    ptr<T_>(bal)[0] = T_(double(spec.coef) * double(E) * acc);
  });
}

void CpuBackend::router_bwd(const Tensor& logits, const Tensor& probs, const Tensor& topk_idx, const Tensor& gates,
                            const Tensor& dgates, const Tensor& routed, const RouterSpec& spec,
                            const BalanceSpec& bal, Tensor& dlogits) {
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
  const bool z = bal.z_coef != 0;
  if (z) {
    require_like(probs, logits, op, "logits");
    require_numel(logits, T * E, op, "logits");
  }
  const bool per_sequence = bal.seq_len > 0;
  const int64_t total = per_sequence ? 0 : routed_total(routed, E, op);
  const SequenceShape sq = per_sequence ? sequence_shape(bal, topk_idx, T, E, op) : SequenceShape{};
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
    T_* dl = ptr<T_>(dlogits);
    // d bal / d q[t, e] (q: the balance loss's reading of probs): coef * E * f_e / T with
    // f_e = routed[e] / (T k) held constant; per sequence coef * E * f[s, e] / L / sequences.
    std::vector<double> dbal;
    if (per_sequence) {
      dbal = sequence_fractions(topk_idx, sq, E);
      for (double& x : dbal)
        x = double(bal.grad_scale) * double(bal.coef) * double(E) * x / double(sq.L) / double(sq.sequences);
    } else {
      dbal.assign(size_t(E), 0.0);
      const int32_t* r = ptr<int32_t>(routed);
      if (total > 0 && T > 0)
        for (int64_t e = 0; e < E; ++e)
          dbal[size_t(e)] = double(bal.grad_scale) * double(bal.coef) * double(E) *
                            (double(r[e]) / double(total)) / double(T);
    }
    const bool sigmoid = spec.score == RouterScore::sigmoid;
    const double zscale = z && T > 0 ? double(bal.grad_scale) * double(bal.z_coef) / double(T) : 0.0;
    pool_.parallel_for(T, grain_for(E * 2), [&](int64_t t0, int64_t t1) {
      std::vector<double> dp(static_cast<size_t>(E));
      for (int64_t t = t0; t < t1; ++t) {
        const T_* pt = p + t * E;
        const double* w = per_sequence ? &dbal[size_t((t / sq.L) * E)] : dbal.data();
        if (!sigmoid) {
          for (int64_t e = 0; e < E; ++e) dp[size_t(e)] = w[e];
        } else {
          // q = s / sum(s): dL/ds_e = (w_e - sum_m w_m q_m) / sum(s).
          double S = 0, wq = 0;
          for (int64_t e = 0; e < E; ++e) S += double(pt[e]);
          for (int64_t e = 0; e < E; ++e) wq += w[e] * double(pt[e]) / S;
          for (int64_t e = 0; e < E; ++e) dp[size_t(e)] = (w[e] - wq) / S;
        }
        // gates g_j = c p_{i_j} / S with S = sum_j p_{i_j} (norm_topk):
        // dL/dp_{i_j} = (c dg_j - sum_l dg_l g_l) / S; raw gates g_j = c p_{i_j}: c dg_j.
        const double c = double(spec.route_scale);
        if (spec.norm_topk) {
          double S = 0, gdg = 0;
          for (int64_t j = 0; j < k; ++j) {
            S += double(pt[idx[t * k + j]]);
            gdg += double(dg[t * k + j]) * double(g[t * k + j]);
          }
          for (int64_t j = 0; j < k; ++j) dp[size_t(idx[t * k + j])] += (c * double(dg[t * k + j]) - gdg) / S;
        } else {
          for (int64_t j = 0; j < k; ++j) dp[size_t(idx[t * k + j])] += c * double(dg[t * k + j]);
        }
        if (!sigmoid) {
          // Softmax backward: dlogit_e = p_e (dp_e - sum p dp).
          double pdp = 0;
          for (int64_t e = 0; e < E; ++e) pdp += double(pt[e]) * dp[size_t(e)];
          for (int64_t e = 0; e < E; ++e) dl[t * E + e] = T_(double(pt[e]) * (dp[size_t(e)] - pdp));
        } else {
          for (int64_t e = 0; e < E; ++e) dl[t * E + e] = T_(dp[size_t(e)] * double(pt[e]) * (1.0 - double(pt[e])));
        }
        if (z) {
          // z = lse^2: dz/dlogit_e = 2 lse softmax_e.
          const T_* l = ptr<T_>(logits) + t * E;
          double m = -INFINITY, s = 0;
          for (int64_t e = 0; e < E; ++e) m = std::max(m, double(l[e]));
          for (int64_t e = 0; e < E; ++e) s += std::exp(double(l[e]) - m);
          const double lse = m + std::log(s);
          for (int64_t e = 0; e < E; ++e)
            dl[t * E + e] = T_(double(dl[t * E + e]) + zscale * 2.0 * lse * std::exp(double(l[e]) - m) / s);
        }
      }
    });
  });
}

void CpuBackend::router_stats(const Tensor& logits, const Tensor& probs, RouterScore score, Tensor& acc) {
  const char* op = "router_stats";
  require_float(probs, op, "probs");
  require_like(probs, logits, op, "logits");
  require_like(probs, acc, op, "acc");
  require_numel(acc, 2, op, "acc");
  const int64_t T = probs.rows(), E = probs.cols();
  require_numel(logits, T * E, op, "logits");
  with_float(probs.dtype, [&](auto te) {
    using T_ = decltype(te);
    const T_* p = ptr<T_>(probs);
    const T_* lg = ptr<T_>(logits);
    double entropy = 0, z = 0;
    for (int64_t t = 0; t < T; ++t) {
      const T_* pt = p + t * E;
      const T_* l = lg + t * E;
      double S = 1;
      if (score == RouterScore::sigmoid) {
        S = 0;
        for (int64_t e = 0; e < E; ++e) S += double(pt[e]);
      }
      double h = 0;
      for (int64_t e = 0; e < E; ++e) {
        const double q = double(pt[e]) / S;
        if (q > 0) h -= q * std::log(q);
      }
      entropy += h;
      double m = -INFINITY, s = 0;
      for (int64_t e = 0; e < E; ++e) m = std::max(m, double(l[e]));
      for (int64_t e = 0; e < E; ++e) s += std::exp(double(l[e]) - m);
      const double lse = m + std::log(s);
      z += lse * lse;
    }
    T_* a = ptr<T_>(acc);
    a[0] = T_(double(a[0]) + entropy);
    a[1] = T_(double(a[1]) + z);
  });
}

void CpuBackend::router_bias_update(const Tensor& load, float rate, Tensor& bias) {
  const char* op = "router_bias_update";
  require_float(bias, op, "bias");
  require_like(bias, load, op, "load");
  const int64_t E = bias.numel();
  require_numel(load, E, op, "load");
  with_float(bias.dtype, [&](auto te) {
    using T_ = decltype(te);
    const T_* ld = ptr<T_>(load);
    T_* b = ptr<T_>(bias);
    double mean = 0;
    for (int64_t e = 0; e < E; ++e) mean += double(ld[e]);
    mean /= double(std::max<int64_t>(E, 1));
    for (int64_t e = 0; e < E; ++e) {
      const double d = mean - double(ld[e]);
      const double sign = d > 0 ? 1.0 : (d < 0 ? -1.0 : 0.0);
      b[e] = T_(double(b[e]) + double(rate) * sign);
    }
  });
}

}  // namespace moelab
