// Dispatch data movement's exact properties: permute then combine returns the input in dropless
// mode, and dropped assignments contribute nothing. The ops against the f64 reference, finite
// differences and per-expert naive products are rows of the op table (tests/ops).
#include "gradcheck.hpp"

namespace moelab::test {
namespace {

struct Routing {
  Tensor idx, gates, routed, counts, offsets, slot, row_token;
};

// Random top-k routing of T tokens over E experts planned with the given capacity.
Routing random_routing(CpuBackend& be, Rng& rng, int64_t T, int64_t E, int k, int capacity) {
  Routing r;
  Tensor logits = random_tensor(be, {T, E}, rng);
  Tensor probs = be.alloc({T, E}, be.master_dtype());
  r.idx = be.alloc({T, k}, DType::i32);
  r.gates = be.alloc({T, k}, be.master_dtype());
  be.router_topk(logits, k, probs, r.idx, r.gates);
  r.routed = be.alloc({E}, DType::i32);
  r.counts = be.alloc({E}, DType::i32);
  r.offsets = be.alloc({E + 1}, DType::i32);
  r.slot = be.alloc({T * k}, DType::i32);
  r.row_token = be.alloc({T * k}, DType::i32);
  be.moe_plan(r.idx, int(E), capacity, r.routed, r.counts, r.offsets, r.slot, r.row_token);
  return r;
}

TEST(MoeDispatch, PermuteThenCombineRoundTrips) {
  const uint64_t seed = fresh_seed();
  SCOPED_TRACE("seed " + std::to_string(seed));
  Rng rng(seed);
  CpuBackend be(DType::f64, 2);
  const int64_t T = 23, E = 5, D = 6;
  Routing r = random_routing(be, rng, T, E, 2, 0);
  Tensor x = random_tensor(be, {T, D}, rng);
  Tensor xp = be.alloc({T * 2, D}, DType::f64), y = be.alloc({T, D}, DType::f64);
  be.moe_permute(x, r.row_token, r.offsets, xp);
  be.moe_combine(xp, r.slot, r.gates, y, false);  // gates sum to 1 per token
  EXPECT_LT(normalized_error(values(y), values(x)), 1e-14);
  // accumulate adds a second copy.
  be.moe_combine(xp, r.slot, r.gates, y, true);
  auto twice = values(x);
  for (auto& v : twice) v *= 2;
  EXPECT_LT(normalized_error(values(y), twice), 1e-14);
}

TEST(MoeDispatch, DroppedAssignmentsContributeNothing) {
  CpuBackend be(DType::f32, 1);
  // k = 1, expert 0 with capacity 1: token 1 is dropped.
  Tensor idx = i32_tensor(be, {2, 1}, {0, 0});
  Tensor routed = be.alloc({1}, DType::i32), counts = be.alloc({1}, DType::i32),
         offsets = be.alloc({2}, DType::i32), slot = be.alloc({2}, DType::i32),
         row_token = be.alloc({2}, DType::i32);
  be.moe_plan(idx, 1, 1, routed, counts, offsets, slot, row_token);
  Tensor x = be.alloc({2, 2}, DType::f32), xp = be.alloc({2, 2}, DType::f32);
  be.write(x, {1, 2, 3, 4});
  be.fill(xp, 0.0f);
  be.moe_permute(x, row_token, offsets, xp);
  Tensor gates = be.alloc({2, 1}, DType::f32), y = be.alloc({2, 2}, DType::f32);
  be.fill(gates, 1.0f);
  be.moe_combine(xp, slot, gates, y, false);
  EXPECT_EQ(be.read(y), (std::vector<float>{1, 2, 0, 0}));
  Tensor dx = be.alloc({2, 2}, DType::f32);
  be.fill(dx, 0.0f);
  be.moe_permute_bwd(xp, slot, dx);
  EXPECT_EQ(be.read(dx), (std::vector<float>{1, 2, 0, 0}));
}

}  // namespace
}  // namespace moelab::test

namespace moelab::test {
namespace {

// Each expert's max |value| over its rows of t (rows [offsets[e], offsets[e+1])), from the host.
std::vector<float> segment_amax(const Tensor& t, const Tensor& offsets) {
  const int64_t E = offsets.numel() - 1, D = t.cols();
  std::vector<float> m(size_t(E), 0.0f);
  for (int64_t e = 0; e < E; ++e)
    for (int64_t i = int64_t(offsets.as<int32_t>()[e]) * D; i < int64_t(offsets.as<int32_t>()[e + 1]) * D; ++i)
      m[size_t(e)] = std::max(m[size_t(e)], float(std::fabs(t.as<double>()[i])));
  return m;
}

}  // namespace
}  // namespace moelab::test
