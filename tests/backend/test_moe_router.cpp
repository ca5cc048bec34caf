// Router ops beyond the op table's rows: an exact tie case, and the chain router_topk -> gates ->
// moe_combine (+ balance loss) whose gradient w.r.t. the router logits is checked by finite
// differences where top-k is stable.
#include <algorithm>
#include <cmath>

#include "gradcheck.hpp"

namespace moelab::test {
namespace {

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

}  // namespace
}  // namespace moelab::test
