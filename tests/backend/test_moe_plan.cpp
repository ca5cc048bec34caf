// moe_plan on hand-built routings where the answer is known: dropless counts/offsets/slots, and
// capacity cases proving the priority rule (all first choices before any second choice, then by
// token) and that routed counts assignments before drops.
#include "gradcheck.hpp"

namespace moelab::test {
namespace {

struct Plan {
  std::vector<int32_t> routed, counts, offsets, slot, row_token;
};

Plan run_plan(CpuBackend& be, int64_t T, int64_t k, int E, int capacity,
              const std::vector<int32_t>& idx, DropOrder order = DropOrder::rank) {
  Tensor ti = i32_tensor(be, {T, k}, idx);
  Tensor routed = be.alloc({E}, DType::i32), counts = be.alloc({E}, DType::i32);
  Tensor offsets = be.alloc({E + 1}, DType::i32), slot = be.alloc({T * k}, DType::i32);
  Tensor row_token = be.alloc({T * k}, DType::i32);
  be.fill(row_token, -7.0f);
  be.moe_plan(ti, E, capacity, routed, counts, offsets, slot, row_token, order);
  return {be.read_i32(routed), be.read_i32(counts), be.read_i32(offsets), be.read_i32(slot),
          be.read_i32(row_token)};
}

TEST(MoePlan, Dropless) {
  CpuBackend be(DType::f32, 2);
  // T = 4 tokens, k = 2, E = 3. Rows per token: (first, second) choice.
  const std::vector<int32_t> idx = {2, 0,   // t0
                                    0, 1,   // t1
                                    2, 1,   // t2
                                    0, 2};  // t3
  const Plan p = run_plan(be, 4, 2, 3, 0, idx);
  EXPECT_EQ(p.routed, (std::vector<int32_t>{3, 2, 3}));
  EXPECT_EQ(p.counts, p.routed);
  EXPECT_EQ(p.offsets, (std::vector<int32_t>{0, 3, 5, 8}));
  // Expert 0 order: first choices t1, t3, then second choice t0 -> rows 0, 1, 2.
  // Expert 1: second choices t1, t2 -> rows 3, 4. Expert 2: first t0, t2, second t3 -> 5, 6, 7.
  EXPECT_EQ(p.slot, (std::vector<int32_t>{5, 2, 0, 3, 6, 4, 1, 7}));
  EXPECT_EQ(p.row_token, (std::vector<int32_t>{1, 3, 0, 1, 2, 0, 2, 3}));
}

TEST(MoePlan, CapacityDropsSecondChoicesFirst) {
  CpuBackend be(DType::f32, 2);
  // Every token picks expert 0 as its second choice after token 3 and 4 pick it first:
  // expert 0 gets first choices of t3, t4, then second choices of t0, t1, t2 (in token order).
  const std::vector<int32_t> idx = {1, 0,   // t0
                                    1, 0,   // t1
                                    2, 0,   // t2
                                    0, 1,   // t3
                                    0, 2};  // t4
  const Plan p = run_plan(be, 5, 2, 3, 3, idx);
  EXPECT_EQ(p.routed, (std::vector<int32_t>{5, 3, 2}));
  EXPECT_EQ(p.counts, (std::vector<int32_t>{3, 3, 2}));
  EXPECT_EQ(p.offsets, (std::vector<int32_t>{0, 3, 6, 8}));
  // Expert 0 keeps t3 (first), t4 (first), t0 (second, lowest token); drops t1 and t2's seconds
  // even though t1, t2 < t3: rank beats token order.
  // Expert 1: first choices t0, t1, then second choice t3 -> rows 3, 4, 5 (cap 3, all kept).
  // Expert 2: first t2, second t4 -> rows 6, 7.
  EXPECT_EQ(p.slot, (std::vector<int32_t>{3, 2, 4, -1, 6, -1, 0, 5, 1, 7}));
  EXPECT_EQ(std::vector<int32_t>(p.row_token.begin(), p.row_token.begin() + 8),
            (std::vector<int32_t>{3, 4, 0, 0, 1, 3, 2, 4}));
  // Rows past offsets[E] are left as they were.
  EXPECT_EQ(p.row_token[8], -7);
  EXPECT_EQ(p.row_token[9], -7);
}

TEST(MoePlan, TokenMajorOrderKeepsEarlierTokensWhateverTheirRank) {
  CpuBackend be(DType::f32, 2);
  // The routing of CapacityDropsSecondChoicesFirst, in flat token-major order (t, j): expert 0
  // sees t0's second, t1's second, t2's second, t3's first, t4's first and keeps the first 3.
  const std::vector<int32_t> idx = {1, 0, 1, 0, 2, 0, 0, 1, 0, 2};
  const Plan p = run_plan(be, 5, 2, 3, 3, idx, DropOrder::token);
  EXPECT_EQ(p.routed, (std::vector<int32_t>{5, 3, 2}));
  EXPECT_EQ(p.counts, (std::vector<int32_t>{3, 3, 2}));
  EXPECT_EQ(p.offsets, (std::vector<int32_t>{0, 3, 6, 8}));
  // Expert 0 rows 0..2: t0, t1, t2 (second choices); t3 and t4's first choices are dropped.
  // Expert 1 rows 3..5: t0, t1 (first), t3 (second). Expert 2 rows 6, 7: t2 (first), t4 (second).
  EXPECT_EQ(p.slot, (std::vector<int32_t>{3, 0, 4, 1, 6, 2, -1, 5, -1, 7}));
  EXPECT_EQ(std::vector<int32_t>(p.row_token.begin(), p.row_token.begin() + 8),
            (std::vector<int32_t>{0, 1, 2, 0, 1, 3, 2, 4}));
}

TEST(MoePlan, CapacityDropsLaterTokensWithinARank) {
  CpuBackend be(DType::f32, 1);
  const std::vector<int32_t> idx = {1, 1, 1, 0, 1};  // k = 1, five tokens, expert 1 oversubscribed
  const Plan p = run_plan(be, 5, 1, 2, 2, idx);
  EXPECT_EQ(p.routed, (std::vector<int32_t>{1, 4}));
  EXPECT_EQ(p.counts, (std::vector<int32_t>{1, 2}));
  EXPECT_EQ(p.offsets, (std::vector<int32_t>{0, 1, 3}));
  EXPECT_EQ(p.slot, (std::vector<int32_t>{1, 2, -1, 0, -1}));
}

TEST(MoePlan, RandomRoutingInvariants) {
  const uint64_t seed = fresh_seed();
  SCOPED_TRACE("seed " + std::to_string(seed));
  Rng rng(seed);
  CpuBackend be(DType::f32, 2);
  const int64_t T = 200, k = 3;
  const int E = 7, cap = 60;
  std::vector<int32_t> idx;
  for (int64_t t = 0; t < T; ++t) {
    std::vector<int32_t> pool = {0, 1, 2, 3, 4, 5, 6};
    for (int64_t j = 0; j < k; ++j) {
      const size_t pick = size_t(rng.below(pool.size()));
      idx.push_back(pool[pick]);
      pool.erase(pool.begin() + long(pick));
    }
  }
  for (int capacity : {0, cap}) {
    const Plan p = run_plan(be, T, k, E, capacity, idx);
    std::vector<int> seen(size_t(T * k), 0);
    for (int64_t a = 0; a < T * k; ++a) {
      const int32_t s = p.slot[size_t(a)];
      if (s < 0) {
        EXPECT_GT(capacity, 0);
        continue;
      }
      const int32_t e = idx[size_t(a)];
      EXPECT_GE(s, p.offsets[size_t(e)]);
      EXPECT_LT(s, p.offsets[size_t(e + 1)]);
      EXPECT_EQ(p.row_token[size_t(s)], a / k);
      ++seen[size_t(s)];
    }
    for (int64_t r = 0; r < p.offsets[size_t(E)]; ++r) EXPECT_EQ(seen[size_t(r)], 1);
    for (int e = 0; e < E; ++e)
      EXPECT_EQ(p.counts[size_t(e)],
                capacity > 0 ? std::min(p.routed[size_t(e)], capacity) : p.routed[size_t(e)]);
  }
}

TEST(MoePlan, RejectsExpertOutOfRange) {
  CpuBackend be(DType::f32, 1);
  EXPECT_THROW(run_plan(be, 2, 1, 2, 0, {0, 2}), Error);
}

}  // namespace
}  // namespace moelab::test
