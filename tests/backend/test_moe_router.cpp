// Router ops: softmax + top-k with lower-index tie breaking, renormalized gates, the Switch
// balance loss, and the full chain router_topk -> gates -> moe_combine (+ balance loss) whose
// gradient w.r.t. the router logits is checked by finite differences where top-k is stable.
#include <algorithm>
#include <cmath>

#include "gradcheck.hpp"

namespace moelab::test {
namespace {

TEST(RouterTopk, SoftmaxTopkAndGatesMatchNaive) {
  const uint64_t seed = fresh_seed();
  SCOPED_TRACE("seed " + std::to_string(seed));
  Rng rng(seed);
  CpuBackend be(DType::f64, 2);
  const int64_t T = 37, E = 8;
  const int k = 3;
  Tensor logits = random_tensor(be, {T, E}, rng, 2.0);
  Tensor probs = be.alloc({T, E}, DType::f64), idx = be.alloc({T, k}, DType::i32),
         gates = be.alloc({T, k}, DType::f64);
  be.router_topk(logits, k, probs, idx, gates);
  const auto lv = values(logits), pv = values(probs), gv = values(gates);
  const auto iv = be.read_i32(idx);
  std::vector<double> ref_p, ref_g;
  for (int64_t t = 0; t < T; ++t) {
    double m = -INFINITY, z = 0;
    for (int64_t e = 0; e < E; ++e) m = std::max(m, lv[size_t(t * E + e)]);
    for (int64_t e = 0; e < E; ++e) z += std::exp(lv[size_t(t * E + e)] - m);
    std::vector<std::pair<double, int>> order;
    for (int64_t e = 0; e < E; ++e) {
      ref_p.push_back(std::exp(lv[size_t(t * E + e)] - m) / z);
      order.push_back({-ref_p.back(), int(e)});
    }
    std::sort(order.begin(), order.end());
    double s = 0;
    for (int j = 0; j < k; ++j) {
      EXPECT_EQ(iv[size_t(t * k + j)], order[size_t(j)].second);
      s += -order[size_t(j)].first;
    }
    for (int j = 0; j < k; ++j) ref_g.push_back(-order[size_t(j)].first / s);
  }
  EXPECT_LT(normalized_error(pv, ref_p), 1e-14);
  EXPECT_LT(normalized_error(gv, ref_g), 1e-14);
}

TEST(RouterTopk, TiesGoToLowerExpert) {
  CpuBackend be(DType::f32, 1);
  Tensor logits = be.alloc({2, 4}, DType::f32);
  be.write(logits, {1.0f, 3.0f, 3.0f, 3.0f,   // three-way tie for the top
                    0.5f, 0.5f, 0.5f, 0.5f});  // all equal
  Tensor probs = be.alloc({2, 4}, DType::f32), idx = be.alloc({2, 2}, DType::i32),
         gates = be.alloc({2, 2}, DType::f32);
  be.router_topk(logits, 2, probs, idx, gates);
  EXPECT_EQ(be.read_i32(idx), (std::vector<int32_t>{1, 2, 0, 1}));
  for (float g : be.read(gates)) EXPECT_FLOAT_EQ(g, 0.5f);
}

TEST(BalanceLoss, MatchesFormula) {
  const uint64_t seed = fresh_seed();
  SCOPED_TRACE("seed " + std::to_string(seed));
  Rng rng(seed);
  CpuBackend be(DType::f64, 2);
  const int64_t T = 11, E = 5;
  Tensor probs = random_tensor(be, {T, E}, rng);
  std::vector<int32_t> r = {4, 0, 7, 2, 9};  // T * k = 22 with k = 2
  Tensor routed = i32_tensor(be, {E}, r), bal = be.alloc({1}, DType::f64);
  be.balance_loss(probs, routed, 0.01f, bal);
  const auto pv = values(probs);
  double ref = 0;
  for (int64_t e = 0; e < E; ++e) {
    double mean = 0;
    for (int64_t t = 0; t < T; ++t) mean += pv[size_t(t * E + e)] / double(T);
    ref += double(r[size_t(e)]) / 22.0 * mean;
  }
  ref *= double(0.01f) * double(E);
  EXPECT_NEAR(values(bal)[0], ref, 1e-15 * (1 + std::abs(ref)));
  EXPECT_NE(values(bal)[0], 0.0);
}

// The chain from router logits to the combined expert outputs plus the weighted balance loss.
TEST(RouterChain, GradientMatchesFiniteDifferences) {
  for (int capacity : {0, 5}) {
    const uint64_t seed = fresh_seed();
    SCOPED_TRACE("seed " + std::to_string(seed) + " capacity " + std::to_string(capacity));
    Rng rng(seed);
    CpuBackend be(DType::f64, 2);
    const int64_t T = 9, E = 4, D = 3;
    const int k = 2;
    const float coef = 0.05f, bal_scale = 1.7f;
    Tensor logits = random_tensor(be, {T, E}, rng, 1.5);
    Tensor probs = be.alloc({T, E}, DType::f64), idx = be.alloc({T, k}, DType::i32),
           gates = be.alloc({T, k}, DType::f64), bal = be.alloc({1}, DType::f64);
    Tensor routed = be.alloc({E}, DType::i32), counts = be.alloc({E}, DType::i32),
           offsets = be.alloc({E + 1}, DType::i32), slot = be.alloc({T * k}, DType::i32),
           row_token = be.alloc({T * k}, DType::i32);
    be.router_topk(logits, k, probs, idx, gates);
    be.moe_plan(idx, int(E), capacity, routed, counts, offsets, slot, row_token);
    const auto idx0 = be.read_i32(idx);
    Tensor yp = random_tensor(be, {T * k, D}, rng);  // expert outputs, constant here
    Tensor y = be.alloc({T, D}, DType::f64);
    const auto w = randn(rng, T * D);
    bool stable = true;
    auto loss = [&] {
      be.router_topk(logits, k, probs, idx, gates);
      stable = stable && be.read_i32(idx) == idx0;
      be.moe_combine(yp, slot, gates, y, false);
      be.balance_loss(probs, routed, coef, bal);
      return weighted_sum(y, w) + double(bal_scale) * values(bal)[0];
    };
    loss();
    Tensor dy = tensor_from(be, {T, D}, w);
    Tensor dyp = be.alloc({T * k, D}, DType::f64), dgates = be.alloc({T, k}, DType::f64);
    be.moe_combine_bwd(dy, yp, slot, gates, dyp, dgates);
    Tensor dlogits = be.alloc({T, E}, DType::f64);
    be.router_bwd(probs, idx, gates, dgates, routed, coef, bal_scale, dlogits);
    const auto num = numeric_grad(logits, loss, 1e-6);
    ASSERT_TRUE(stable) << "top-k flipped under the finite-difference step; rerun";
    EXPECT_LT(normalized_error(values(dlogits), num), 1e-7);
  }
}

// With dgates = 0 only the balance loss drives the router gradient; check that term alone.
TEST(RouterBwd, BalanceLossGradientMatchesFiniteDifferences) {
  const uint64_t seed = fresh_seed();
  SCOPED_TRACE("seed " + std::to_string(seed));
  Rng rng(seed);
  CpuBackend be(DType::f64, 2);
  const int64_t T = 7, E = 5;
  const int k = 2;
  Tensor logits = random_tensor(be, {T, E}, rng);
  Tensor probs = be.alloc({T, E}, DType::f64), idx = be.alloc({T, k}, DType::i32),
         gates = be.alloc({T, k}, DType::f64), bal = be.alloc({1}, DType::f64);
  Tensor routed = i32_tensor(be, {E}, {5, 0, 3, 4, 2});  // held constant, sums to T * k
  auto loss = [&] {
    be.router_topk(logits, k, probs, idx, gates);
    be.balance_loss(probs, routed, 0.3f, bal);
    return 2.5 * values(bal)[0];
  };
  loss();
  Tensor dgates = be.alloc({T, k}, DType::f64), dlogits = be.alloc({T, E}, DType::f64);
  be.fill(dgates, 0.0f);
  be.router_bwd(probs, idx, gates, dgates, routed, 0.3f, 2.5f, dlogits);
  const auto num = numeric_grad(logits, loss);
  double mag = 0;
  for (double v : num) mag = std::max(mag, std::abs(v));
  EXPECT_GT(mag, 1e-3);  // the check is not vacuous
  EXPECT_LT(normalized_error(values(dlogits), num), 1e-8);
}

}  // namespace
}  // namespace moelab::test
