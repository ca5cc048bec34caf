// The seed's capacity rule: C = max(1, ceil(T * k / E * cf)), capacity off for cf <= 0, and the
// first C assignments of each expert kept in flat token-major order. The seed computes the keep
// mask as a cumulative count over one-hot expert choices of the flattened [T * k] routing; this
// test rebuilds that mask independently and checks moe_plan (drop_order = token) keeps exactly
// those assignments on a fixed routing, while the rank rule keeps a different set.
#include <gtest/gtest.h>

#include <cmath>

#include "backend/cpu/cpu_backend.hpp"
#include "config/config.hpp"
#include "core/rng.hpp"
#include "common/config_builder.hpp"

namespace moelab {
namespace {

Config capacity_config(double cf) {
  Config c = test::with_keys(Config{}, "moe.experts=8 moe.top_k=2 moe.dispatch=capacity");
  c.moe.capacity_factor = cf;
  return c;
}

TEST(SeedCapacity, CapacityFormula) {
  // The seed's d12 micro-batch: 16 x 1024 tokens, 8 experts, top-2.
  EXPECT_EQ(capacity_config(1.0).expert_capacity(16384), 4096);
  EXPECT_EQ(capacity_config(1.25).expert_capacity(16384), 5120);
  EXPECT_EQ(capacity_config(1.0).expert_capacity(3), 1);    // ceil(0.75)
  EXPECT_EQ(capacity_config(0.01).expert_capacity(5), 1);   // ceil(0.0125), at least 1
  EXPECT_EQ(capacity_config(1.1).expert_capacity(100), 28);  // ceil(25 * 1.1) = ceil(27.5)
  EXPECT_EQ(capacity_config(0.0).expert_capacity(16384), 0);   // cf <= 0: no capacity
  EXPECT_EQ(capacity_config(-1.0).expert_capacity(16384), 0);
  Config c = capacity_config(0.0);
  EXPECT_NO_THROW(validate_config(c));
}

// The seed's keep mask over the flat routing: position = cumulative count of the same expert
// before it (one-hot cumsum), kept when position < C.
std::vector<bool> seed_keep_mask(const std::vector<int32_t>& flat, int E, int64_t C) {
  std::vector<std::vector<int64_t>> cumsum(flat.size(), std::vector<int64_t>(size_t(E), 0));
  std::vector<bool> keep(flat.size());
  for (size_t a = 0; a < flat.size(); ++a) {
    for (int e = 0; e < E; ++e) cumsum[a][size_t(e)] = (a ? cumsum[a - 1][size_t(e)] : 0) + (flat[a] == e);
    const int64_t position = cumsum[a][size_t(flat[a])] - 1;
    keep[a] = position < C;
  }
  return keep;
}

TEST(SeedCapacity, TokenMajorPlanKeepsExactlyTheSeedsAssignments) {
  const int64_t T = 64, k = 2;
  const int E = 8;
  // A fixed, skewed routing (experts 0 and 1 overloaded), distinct choices per token.
  Rng rng(2024);
  std::vector<int32_t> idx(size_t(T * k));
  for (int64_t t = 0; t < T; ++t) {
    const int32_t first = rng.uniform() < 0.5 ? int32_t(rng.below(2)) : int32_t(rng.below(uint64_t(E)));
    int32_t second = int32_t(rng.below(uint64_t(E)));
    while (second == first) second = int32_t(rng.below(uint64_t(E)));
    idx[size_t(t * k)] = first;
    idx[size_t(t * k + 1)] = second;
  }
  const int64_t C = capacity_config(1.0).expert_capacity(T);
  ASSERT_EQ(C, 16);
  const std::vector<bool> seed = seed_keep_mask(idx, E, C);

  CpuBackend be(DType::f32, 1);
  Tensor ti = be.alloc({T, k}, DType::i32);
  be.write_i32(ti, idx);
  auto plan = [&](DropOrder order) {
    Tensor routed = be.alloc({E}, DType::i32), counts = be.alloc({E}, DType::i32);
    Tensor offsets = be.alloc({E + 1}, DType::i32), slot = be.alloc({T * k}, DType::i32);
    Tensor row_token = be.alloc({T * k}, DType::i32);
    be.moe_plan(ti, E, int(C), routed, counts, offsets, slot, row_token, order);
    std::vector<bool> kept;
    for (int32_t s : be.read_i32(slot)) kept.push_back(s >= 0);
    return kept;
  };
  const std::vector<bool> token = plan(DropOrder::token), rank = plan(DropOrder::rank);
  int64_t dropped = 0;
  for (bool k_ : seed) dropped += !k_;
  ASSERT_GT(dropped, 0) << "the routing must overflow some expert for the test to mean anything";
  EXPECT_EQ(token, seed);
  EXPECT_NE(rank, seed) << "the rank rule keeps a different set here, so the order matters";
}

}  // namespace
}  // namespace moelab
