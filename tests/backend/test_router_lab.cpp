// Routing-lab router ops on the CPU reference: sigmoid scores, raw or normalized gates with a
// route scale, the aux-loss-free bias (on the choice only), group-limited routing, the balance
// loss with sigmoid scores and per sequence, the z-loss, the router statistics and the bias
// update; each against a naive reference, and the whole chain's gradient against f64 finite
// differences.
#include <algorithm>
#include <cmath>
#include <numeric>

#include "gradcheck.hpp"

namespace moelab::test {
namespace {

double sigmoid(double x) { return 1.0 / (1.0 + std::exp(-x)); }

// The naive router: scores, the (biased, group-limited) choice, and the gates.
struct NaiveRoute {
  std::vector<double> scores, gates;
  std::vector<int32_t> idx;
};
NaiveRoute naive_route(const std::vector<double>& logits, int64_t T, int64_t E, const RouterSpec& spec,
                       const std::vector<double>& bias) {
  NaiveRoute r;
  const int64_t per = E / spec.groups;
  for (int64_t t = 0; t < T; ++t) {
    std::vector<double> s(static_cast<size_t>(E)), c(static_cast<size_t>(E));
    double m = -INFINITY, z = 0;
    for (int64_t e = 0; e < E; ++e) m = std::max(m, logits[size_t(t * E + e)]);
    for (int64_t e = 0; e < E; ++e) z += std::exp(logits[size_t(t * E + e)] - m);
    for (int64_t e = 0; e < E; ++e) {
      const double l = logits[size_t(t * E + e)];
      s[size_t(e)] = spec.score == RouterScore::softmax ? std::exp(l - m) / z : sigmoid(l);
      c[size_t(e)] = s[size_t(e)] + (bias.empty() ? 0.0 : bias[size_t(e)]);
      r.scores.push_back(s[size_t(e)]);
    }
    // Groups by the sum of their two best choice scores, then experts of the kept groups.
    std::vector<std::pair<double, int64_t>> groups;
    for (int64_t g = 0; g < spec.groups; ++g) {
      std::vector<double> v(c.begin() + g * per, c.begin() + (g + 1) * per);
      std::sort(v.rbegin(), v.rend());
      groups.push_back({-(v[0] + (per >= 2 ? v[1] : 0.0)), g});
    }
    std::stable_sort(groups.begin(), groups.end());
    std::vector<char> allowed(size_t(E), spec.groups == 1);
    for (int q = 0; q < spec.topk_groups && spec.groups > 1; ++q)
      for (int64_t e = groups[size_t(q)].second * per; e < (groups[size_t(q)].second + 1) * per; ++e) allowed[size_t(e)] = 1;
    std::vector<std::pair<double, int64_t>> order;
    for (int64_t e = 0; e < E; ++e)
      if (allowed[size_t(e)]) order.push_back({-c[size_t(e)], e});
    std::stable_sort(order.begin(), order.end());
    double sum = 0;
    for (int j = 0; j < spec.k; ++j) sum += s[size_t(order[size_t(j)].second)];
    for (int j = 0; j < spec.k; ++j) {
      const double v = s[size_t(order[size_t(j)].second)];
      r.idx.push_back(int32_t(order[size_t(j)].second));
      r.gates.push_back(spec.route_scale * (spec.norm_topk ? v / sum : v));
    }
  }
  return r;
}

TEST(RouterLab, SigmoidNormalizedTopOneIsTheFormula) {
  // By hand: with sigmoid scores, k = 1, norm_topk and route_scale 1 the gate is s / s = 1, the
  // scores are 1 / (1 + e^-x) and the choice is the largest logit.
  CpuBackend be(DType::f64, 1);
  RouterSpec spec;
  spec.score = RouterScore::sigmoid;
  spec.k = 1;
  Tensor logits = tensor_from(be, {2, 3}, {0.0, 2.0, -1.0, 0.5, -0.5, 0.25});
  Tensor probs = be.alloc({2, 3}, DType::f64), idx = be.alloc({2, 1}, DType::i32), gates = be.alloc({2, 1}, DType::f64);
  be.router_topk(logits, spec, nullptr, probs, idx, gates);
  EXPECT_EQ(be.read_i32(idx), (std::vector<int32_t>{1, 0}));
  const auto g = values(gates), p = values(probs);
  EXPECT_EQ(g[0], 1.0);
  EXPECT_EQ(g[1], 1.0);
  EXPECT_NEAR(p[0], 0.5, 1e-15);
  EXPECT_NEAR(p[1], 1.0 / (1.0 + std::exp(-2.0)), 1e-15);
  EXPECT_NEAR(p[5], 1.0 / (1.0 + std::exp(-0.25)), 1e-15);
  // Raw gates with DeepSeek-V3's scale 2.5: the gate is 2.5 sigmoid(x).
  spec.norm_topk = false;
  spec.route_scale = 2.5f;
  be.router_topk(logits, spec, nullptr, probs, idx, gates);
  EXPECT_NEAR(values(gates)[0], 2.5 / (1.0 + std::exp(-2.0)), 1e-15);
  EXPECT_NEAR(values(gates)[1], 2.5 / (1.0 + std::exp(-0.5)), 1e-15);
}

TEST(RouterLab, BiasMovesTheChoiceNotTheGates) {
  CpuBackend be(DType::f64, 1);
  RouterSpec spec;
  spec.score = RouterScore::sigmoid;
  spec.k = 1;
  Tensor logits = tensor_from(be, {1, 3}, {1.0, 0.0, -1.0});
  Tensor bias = tensor_from(be, {3}, {0.0, 0.0, 0.6});  // sigmoid(-1) + 0.6 > sigmoid(1)
  Tensor probs = be.alloc({1, 3}, DType::f64), idx = be.alloc({1, 1}, DType::i32), gates = be.alloc({1, 1}, DType::f64);
  spec.norm_topk = false;
  be.router_topk(logits, spec, &bias, probs, idx, gates);
  EXPECT_EQ(be.read_i32(idx)[0], 2);
  EXPECT_NEAR(values(gates)[0], sigmoid(-1.0), 1e-15);  // the unbiased score
}

TEST(RouterLab, TopkMatchesNaiveForEverySpec) {
  for (RouterScore score : {RouterScore::softmax, RouterScore::sigmoid})
    for (bool norm : {true, false})
      for (int groups : {1, 4}) {
        const uint64_t seed = fresh_seed();
        SCOPED_TRACE("seed " + std::to_string(seed) + " sigmoid " + std::to_string(score == RouterScore::sigmoid) +
                     " norm " + std::to_string(norm) + " groups " + std::to_string(groups));
        Rng rng(seed);
        CpuBackend be(DType::f64, 2);
        const int64_t T = 29, E = 16;
        RouterSpec spec;
        spec.score = score;
        spec.k = 3;
        spec.norm_topk = norm;
        spec.route_scale = 1.7f;
        spec.groups = groups;
        spec.topk_groups = groups > 1 ? 2 : 1;
        Tensor logits = random_tensor(be, {T, E}, rng, 2.0);
        Tensor bias = random_tensor(be, {E}, rng, 0.1);
        Tensor probs = be.alloc({T, E}, DType::f64), idx = be.alloc({T, spec.k}, DType::i32),
               gates = be.alloc({T, spec.k}, DType::f64);
        be.router_topk(logits, spec, &bias, probs, idx, gates);
        const NaiveRoute ref = naive_route(values(logits), T, E, spec, values(bias));
        EXPECT_EQ(be.read_i32(idx), ref.idx);
        EXPECT_LT(normalized_error(values(probs), ref.scores), 1e-14);
        EXPECT_LT(normalized_error(values(gates), ref.gates), 1e-14);
      }
}

TEST(RouterLab, GroupLimitedRoutingByHand) {
  // 4 experts in 2 groups, 1 group kept, k = 2: group 0 = {0.9, 0.1} sums 1.0, group 1 =
  // {0.6, 0.5} sums 1.1, so group 1 wins though expert 0 is the single best.
  CpuBackend be(DType::f64, 1);
  RouterSpec spec;
  spec.score = RouterScore::sigmoid;
  spec.k = 2;
  spec.groups = 2;
  spec.topk_groups = 1;
  auto logit = [](double s) { return std::log(s / (1 - s)); };
  Tensor logits = tensor_from(be, {1, 4}, {logit(0.9), logit(0.1), logit(0.6), logit(0.5)});
  Tensor probs = be.alloc({1, 4}, DType::f64), idx = be.alloc({1, 2}, DType::i32), gates = be.alloc({1, 2}, DType::f64);
  be.router_topk(logits, spec, nullptr, probs, idx, gates);
  EXPECT_EQ(be.read_i32(idx), (std::vector<int32_t>{2, 3}));
  EXPECT_NEAR(values(gates)[0], 0.6 / 1.1, 1e-14);
}

// The balance loss, naive: f and P over the given token ranges, q read per the score.
double naive_balance(const std::vector<double>& p, const std::vector<int32_t>& idx, int64_t T, int64_t E, int k,
                     RouterScore score, int64_t L, float coef) {
  const int64_t sequences = T / L;
  double acc = 0;
  for (int64_t s = 0; s < sequences; ++s) {
    std::vector<double> f(size_t(E), 0.0), P(size_t(E), 0.0);
    for (int64_t t = s * L; t < (s + 1) * L; ++t) {
      double row = 0;
      for (int64_t e = 0; e < E; ++e) row += p[size_t(t * E + e)];
      for (int64_t e = 0; e < E; ++e)
        P[size_t(e)] += (score == RouterScore::sigmoid ? p[size_t(t * E + e)] / row : p[size_t(t * E + e)]) / double(L);
      for (int j = 0; j < k; ++j) f[size_t(idx[size_t(t * k + j)])] += 1.0 / double(L * k);
    }
    for (int64_t e = 0; e < E; ++e) acc += f[size_t(e)] * P[size_t(e)];
  }
  return double(coef) * double(E) * acc / double(sequences);
}

TEST(RouterLab, BalanceLossMatchesNaivePerScopeAndScore) {
  for (RouterScore score : {RouterScore::softmax, RouterScore::sigmoid})
    for (int64_t L : {int64_t(0), int64_t(8)}) {
      const uint64_t seed = fresh_seed();
      SCOPED_TRACE("seed " + std::to_string(seed) + " seq_len " + std::to_string(L));
      Rng rng(seed);
      CpuBackend be(DType::f64, 2);
      const int64_t T = 32, E = 6;
      RouterSpec spec;
      spec.score = score;
      spec.k = 2;
      Tensor logits = random_tensor(be, {T, E}, rng, 1.5);
      Tensor probs = be.alloc({T, E}, DType::f64), idx = be.alloc({T, 2}, DType::i32), gates = be.alloc({T, 2}, DType::f64);
      be.router_topk(logits, spec, nullptr, probs, idx, gates);
      Tensor routed = be.alloc({E}, DType::i32), counts = be.alloc({E}, DType::i32), offsets = be.alloc({E + 1}, DType::i32),
             slot = be.alloc({T * 2}, DType::i32), row_token = be.alloc({T * 2}, DType::i32);
      be.moe_plan(idx, int(E), 0, routed, counts, offsets, slot, row_token);
      BalanceSpec bs;
      bs.score = score;
      bs.coef = 0.07f;
      bs.seq_len = L;
      Tensor bal = be.alloc({1}, DType::f64);
      be.balance_loss(probs, idx, routed, bs, bal);
      const double ref = naive_balance(values(probs), be.read_i32(idx), T, E, 2, score, L > 0 ? L : T, 0.07f);
      EXPECT_GT(ref, 0.0);
      EXPECT_NEAR(values(bal)[0], ref, 1e-14 * ref);
    }
}

TEST(RouterLab, StatsMatchNaive) {
  for (RouterScore score : {RouterScore::softmax, RouterScore::sigmoid}) {
    const uint64_t seed = fresh_seed();
    SCOPED_TRACE("seed " + std::to_string(seed));
    Rng rng(seed);
    CpuBackend be(DType::f64, 2);
    const int64_t T = 13, E = 5;
    RouterSpec spec;
    spec.score = score;
    spec.k = 2;
    Tensor logits = random_tensor(be, {T, E}, rng, 2.0);
    Tensor probs = be.alloc({T, E}, DType::f64), idx = be.alloc({T, 2}, DType::i32), gates = be.alloc({T, 2}, DType::f64);
    be.router_topk(logits, spec, nullptr, probs, idx, gates);
    Tensor acc = tensor_from(be, {2}, {0.5, 0.25});  // accumulates onto what is there
    be.router_stats(logits, probs, score, acc);
    const auto l = values(logits);
    double h = 0, z = 0;
    for (int64_t t = 0; t < T; ++t) {
      double se = 0, row = 0;
      for (int64_t e = 0; e < E; ++e) se += std::exp(l[size_t(t * E + e)]);
      for (int64_t e = 0; e < E; ++e) row += sigmoid(l[size_t(t * E + e)]);
      for (int64_t e = 0; e < E; ++e) {
        const double q = score == RouterScore::softmax ? std::exp(l[size_t(t * E + e)]) / se
                                                       : sigmoid(l[size_t(t * E + e)]) / row;
        h -= q * std::log(q);
      }
      z += std::log(se) * std::log(se);
    }
    EXPECT_NEAR(values(acc)[0], 0.5 + h, 1e-12 * h);
    EXPECT_NEAR(values(acc)[1], 0.25 + z, 1e-12 * z);
  }
}

TEST(RouterLab, BiasUpdateBySign) {
  CpuBackend be(DType::f32, 1);
  Tensor load = be.alloc({4}, DType::f32), bias = be.alloc({4}, DType::f32);
  be.write(load, {10.0f, 30.0f, 20.0f, 20.0f});  // mean 20
  be.write(bias, {0.5f, 0.5f, -0.25f, 0.0f});
  be.router_bias_update(load, 0.125f, bias);
  EXPECT_EQ(be.read(bias), (std::vector<float>{0.625f, 0.375f, -0.25f, 0.0f}));
}

// The chain logits -> (scores, biased choice, gates) -> moe_combine, plus the weighted balance
// loss and z-loss, differentiated by router_bwd, against central differences.
TEST(RouterLab, ChainGradientMatchesFiniteDifferences) {
  for (RouterScore score : {RouterScore::softmax, RouterScore::sigmoid})
    for (bool norm : {true, false})
      for (int64_t L : {int64_t(0), int64_t(4)}) {
        const uint64_t seed = fresh_seed();
        SCOPED_TRACE("seed " + std::to_string(seed) + " sigmoid " + std::to_string(score == RouterScore::sigmoid) +
                     " norm " + std::to_string(norm) + " seq_len " + std::to_string(L));
        Rng rng(seed);
        CpuBackend be(DType::f64, 2);
        const int64_t T = 8, E = 6, D = 3;
        RouterSpec spec;
        spec.score = score;
        spec.k = 2;
        spec.norm_topk = norm;
        spec.route_scale = 2.5f;
        spec.groups = 3;
        spec.topk_groups = 2;
        BalanceSpec bs;
        bs.score = score;
        bs.coef = 0.3f;
        bs.grad_scale = 1.7f;
        bs.seq_len = L;
        bs.z_coef = 0.05f;
        Tensor logits = random_tensor(be, {T, E}, rng, 1.5);
        Tensor bias = random_tensor(be, {E}, rng, 0.1);
        Tensor probs = be.alloc({T, E}, DType::f64), idx = be.alloc({T, 2}, DType::i32),
               gates = be.alloc({T, 2}, DType::f64), bal = be.alloc({1}, DType::f64), acc = be.alloc({2}, DType::f64);
        Tensor routed = be.alloc({E}, DType::i32), counts = be.alloc({E}, DType::i32),
               offsets = be.alloc({E + 1}, DType::i32), slot = be.alloc({T * 2}, DType::i32),
               row_token = be.alloc({T * 2}, DType::i32);
        be.router_topk(logits, spec, &bias, probs, idx, gates);
        be.moe_plan(idx, int(E), 0, routed, counts, offsets, slot, row_token);
        const auto idx0 = be.read_i32(idx);
        Tensor yp = random_tensor(be, {T * 2, D}, rng);
        Tensor y = be.alloc({T, D}, DType::f64);
        const auto w = randn(rng, T * D);
        bool stable = true;
        auto loss = [&] {
          be.router_topk(logits, spec, &bias, probs, idx, gates);
          stable = stable && be.read_i32(idx) == idx0;
          be.moe_combine(yp, slot, gates, y, false);
          be.balance_loss(probs, idx, routed, bs, bal);
          be.fill(acc, 0.0f);
          be.router_stats(logits, probs, score, acc);
          const double z = double(bs.z_coef) * values(acc)[1] / double(T);
          return weighted_sum(y, w) + double(bs.grad_scale) * (values(bal)[0] + z);
        };
        loss();
        Tensor dy = tensor_from(be, {T, D}, w);
        Tensor dyp = be.alloc({T * 2, D}, DType::f64), dgates = be.alloc({T, 2}, DType::f64);
        be.moe_combine_bwd(dy, yp, slot, gates, dyp, dgates);
        Tensor dlogits = be.alloc({T, E}, DType::f64);
        be.router_bwd(logits, probs, idx, gates, dgates, routed, spec, bs, dlogits);
        const auto num = numeric_grad(logits, loss, 1e-6);
        ASSERT_TRUE(stable) << "top-k flipped under the finite-difference step; rerun";
        EXPECT_LT(normalized_error(values(dlogits), num), 1e-7);
        // The balance and z terms alone (dgates = 0) are checked too, so a large gate term cannot
        // hide them.
        be.fill(dgates, 0.0f);
        be.router_bwd(logits, probs, idx, gates, dgates, routed, spec, bs, dlogits);
        auto terms = [&] {
          be.router_topk(logits, spec, &bias, probs, idx, gates);
          be.balance_loss(probs, idx, routed, bs, bal);
          be.fill(acc, 0.0f);
          be.router_stats(logits, probs, score, acc);
          return double(bs.grad_scale) * (values(bal)[0] + double(bs.z_coef) * values(acc)[1] / double(T));
        };
        const auto num_terms = numeric_grad(logits, terms, 1e-6);
        EXPECT_LT(normalized_error(values(dlogits), num_terms), 1e-7);
      }
}

}  // namespace
}  // namespace moelab::test
