// Dispatch data movement: permute then combine returns the input in dropless mode, dropped
// assignments contribute nothing, backwards match finite differences, and grouped GEMMs match a
// per-expert naive product and their own finite-difference gradients.
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

TEST(MoeDispatch, BackwardsMatchFiniteDifferences) {
  for (int capacity : {0, 4}) {
    const uint64_t seed = fresh_seed();
    SCOPED_TRACE("seed " + std::to_string(seed) + " capacity " + std::to_string(capacity));
    Rng rng(seed);
    CpuBackend be(DType::f64, 2);
    const int64_t T = 8, E = 3, D = 4;
    const int k = 2;
    Routing r = random_routing(be, rng, T, E, k, capacity);
    // permute: L = <xp[rows kept], w>
    Tensor x = random_tensor(be, {T, D}, rng), xp = be.alloc({T * k, D}, DType::f64);
    be.fill(xp, 0.0f);
    const auto wp = randn(rng, T * k * D);
    auto lp = [&] {
      be.moe_permute(x, r.row_token, r.offsets, xp);
      return weighted_sum(xp, wp);
    };
    lp();
    Tensor dxp = tensor_from(be, {T * k, D}, wp), dx = be.alloc({T, D}, DType::f64);
    be.fill(dx, 0.0f);
    be.moe_permute_bwd(dxp, r.slot, dx);
    EXPECT_LT(normalized_error(values(dx), numeric_grad(x, lp)), 1e-8);
    // combine: L = <y, w> w.r.t. yp and gates
    Tensor yp = random_tensor(be, {T * k, D}, rng), y = be.alloc({T, D}, DType::f64);
    const auto wy = randn(rng, T * D);
    auto lc = [&] {
      be.moe_combine(yp, r.slot, r.gates, y, false);
      return weighted_sum(y, wy);
    };
    lc();
    Tensor dy = tensor_from(be, {T, D}, wy);
    Tensor dyp = be.alloc({T * k, D}, DType::f64), dgates = be.alloc({T, k}, DType::f64);
    be.fill(dyp, 0.0f);  // rows no slot points at stay untouched
    be.moe_combine_bwd(dy, yp, r.slot, r.gates, dyp, dgates);
    EXPECT_LT(normalized_error(values(dyp), numeric_grad(yp, lc)), 1e-8);
    EXPECT_LT(normalized_error(values(dgates), numeric_grad(r.gates, lc)), 1e-8);
  }
}

TEST(GroupedMatmul, MatchesPerExpertNaiveAndSkipsEmptyExperts) {
  const uint64_t seed = fresh_seed();
  SCOPED_TRACE("seed " + std::to_string(seed));
  Rng rng(seed);
  CpuBackend be(DType::f64, 2);
  const int64_t E = 4, N = 19, K = 13, R = 40;
  const std::vector<int32_t> off = {0, 11, 11, 30, 37};  // expert 1 empty, rows 37.. unused
  Tensor offsets = i32_tensor(be, {E + 1}, off);
  Tensor A = random_tensor(be, {R, K}, rng);
  for (bool trans_w : {true, false}) {
    Tensor W = random_tensor(be, trans_w ? Shape{E, N, K} : Shape{E, K, N}, rng);
    Tensor C = be.alloc({R, N}, DType::f64);
    be.fill(C, 5.0f);
    be.grouped_matmul(A, W, trans_w, C, offsets);
    const auto av = values(A), wv = values(W), cv = values(C);
    std::vector<double> ref(cv.size(), 5.0), got = cv;
    for (int64_t e = 0; e < E; ++e)
      for (int64_t r = off[size_t(e)]; r < off[size_t(e + 1)]; ++r)
        for (int64_t n = 0; n < N; ++n) {
          double s = 0;
          for (int64_t kk = 0; kk < K; ++kk)
            s += av[size_t(r * K + kk)] *
                 (trans_w ? wv[size_t((e * N + n) * K + kk)] : wv[size_t((e * K + kk) * N + n)]);
          ref[size_t(r * N + n)] = s;
        }
    EXPECT_LT(normalized_error(got, ref), 1e-13) << "trans_w " << trans_w;
  }
}

// C = alpha A op(W) + beta addend and dW = dY^T X + beta addend (Newton-Schulz's fused sums),
// against the plain products combined on the host; rows past the last expert stay untouched.
TEST(GroupedMatmul, AlphaBetaAndAddend) {
  const uint64_t seed = fresh_seed();
  SCOPED_TRACE("seed " + std::to_string(seed));
  Rng rng(seed);
  CpuBackend be(DType::f64, 2);
  const int64_t E = 3, N = 9, K = 7, R = 20;
  const std::vector<int32_t> off = {0, 6, 6, 17};
  Tensor offsets = i32_tensor(be, {E + 1}, off);
  Tensor A = random_tensor(be, {R, K}, rng), W = random_tensor(be, {E, N, K}, rng);
  Tensor addend = random_tensor(be, {R, N}, rng);
  Tensor plain = be.alloc({R, N}, DType::f64), fused = be.alloc({R, N}, DType::f64);
  be.fill(plain, 3.0f);
  be.fill(fused, 3.0f);
  be.grouped_matmul(A, W, true, plain, offsets);
  be.grouped_matmul(A, W, true, fused, offsets, 0.5f, -2.0f, &addend);
  const auto pv = values(plain), av = values(addend), fv = values(fused);
  std::vector<double> ref = pv;
  for (int64_t r = 0; r < off.back(); ++r)
    for (int64_t n = 0; n < N; ++n) ref[size_t(r * N + n)] = 0.5 * pv[size_t(r * N + n)] - 2.0 * av[size_t(r * N + n)];
  EXPECT_LT(normalized_error(fv, ref), 1e-13);
  // In place: the addend is C itself.
  be.grouped_matmul(A, W, true, addend, offsets, 1.0f, 0.25f, &addend);
  const auto iv = values(addend);
  for (int64_t r = 0; r < off.back(); ++r)
    for (int64_t n = 0; n < N; ++n)
      ASSERT_NEAR(iv[size_t(r * N + n)], pv[size_t(r * N + n)] + 0.25 * av[size_t(r * N + n)], 1e-12);
  // Weight gradient onto another tensor's values.
  Tensor dY = random_tensor(be, {R, N}, rng), X = random_tensor(be, {R, K}, rng);
  Tensor dW0 = be.alloc({E, N, K}, DType::f64), dW = be.alloc({E, N, K}, DType::f64);
  Tensor base = random_tensor(be, {E, N, K}, rng);
  be.grouped_matmul_wgrad(dY, X, dW0, offsets, 0.0f);
  be.grouped_matmul_wgrad(dY, X, dW, offsets, 1.5f, &base);
  const auto w0 = values(dW0), bv = values(base);
  std::vector<double> wref(w0.size());
  for (size_t i = 0; i < w0.size(); ++i) wref[i] = w0[i] + 1.5 * bv[i];
  EXPECT_LT(normalized_error(values(dW), wref), 1e-13);
}

TEST(GroupedMatmul, GradientsMatchFiniteDifferences) {
  const uint64_t seed = fresh_seed();
  SCOPED_TRACE("seed " + std::to_string(seed));
  Rng rng(seed);
  CpuBackend be(DType::f64, 2);
  const int64_t E = 3, N = 5, K = 4, R = 12;
  Tensor offsets = i32_tensor(be, {E + 1}, {0, 5, 5, 12});
  Tensor A = random_tensor(be, {R, K}, rng), W = random_tensor(be, {E, N, K}, rng);
  Tensor C = be.alloc({R, N}, DType::f64);
  const auto w = randn(rng, R * N);
  auto loss = [&] {
    be.grouped_matmul(A, W, true, C, offsets);
    return weighted_sum(C, w);
  };
  loss();
  Tensor dC = tensor_from(be, {R, N}, w);
  Tensor dA = be.alloc({R, K}, DType::f64), dW = random_tensor(be, {E, N, K}, rng);
  be.grouped_matmul(dC, W, false, dA, offsets);  // dA_e = dC_e W_e
  const auto dw_old = values(dW);
  be.grouped_matmul_wgrad(dC, A, dW, offsets, 1.0f);  // accumulate onto dw_old
  EXPECT_LT(normalized_error(values(dA), numeric_grad(A, loss)), 1e-8);
  auto num_w = numeric_grad(W, loss);
  for (size_t i = 0; i < num_w.size(); ++i) num_w[i] += dw_old[i];
  EXPECT_LT(normalized_error(values(dW), num_w), 1e-8);
  // beta = 0 overwrites, and an expert with no rows gets zeros even over NaN.
  be.fill(dW, std::nanf(""));
  be.grouped_matmul_wgrad(dC, A, dW, offsets, 0.0f);
  const auto dwv = values(dW);
  for (int64_t i = N * K; i < 2 * N * K; ++i) EXPECT_EQ(dwv[size_t(i)], 0.0);
  for (double v : dwv) ASSERT_FALSE(std::isnan(v));
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

TEST(MoeDispatch, ProducersRaiseEachExpertsAmaxOfWhatTheyWrote) {
  // The permute, ReLU² and its backward and the combine's backward record each expert's amax
  // of their output, over the experts' rows only (capacity leaves a tail past offsets[E]), and
  // raise it: a larger value already there stays.
  const uint64_t seed = fresh_seed();
  SCOPED_TRACE("seed " + std::to_string(seed));
  Rng rng(seed);
  CpuBackend be(DType::f64, 2);
  const int64_t T = 29, E = 6, D = 8, k = 2;
  Routing r = random_routing(be, rng, T, E, int(k), 7);  // capacity 7: drops, maybe an empty expert
  const int64_t R = T * k;
  Tensor x = random_tensor(be, {T, D}, rng);
  Tensor xp = be.alloc({R, D}, DType::f64);
  be.fill(xp, 1e30f);  // the tail rows past offsets[E] keep this and must not count
  Tensor amax = be.alloc({E}, DType::f32);
  auto fresh = [&] {
    be.fill(amax, 0.0f);
    return AmaxSink{amax, r.offsets};
  };
  auto host = [&] { return std::vector<float>(amax.as<float>(), amax.as<float>() + E); };
  AmaxSink a = fresh();
  be.moe_permute(x, r.row_token, r.offsets, xp, &a);
  EXPECT_EQ(host(), segment_amax(xp, r.offsets)) << "moe_permute";
  Tensor h = random_tensor(be, {R, D}, rng), act = be.alloc({R, D}, DType::f64);
  a = fresh();
  be.relu2_fwd(h, act, &a);
  EXPECT_EQ(host(), segment_amax(act, r.offsets)) << "relu2_fwd";
  Tensor da = random_tensor(be, {R, D}, rng), dh = be.alloc({R, D}, DType::f64);
  a = fresh();
  be.relu2_bwd(h, da, dh, &a);
  const std::vector<float> want = segment_amax(dh, r.offsets);
  EXPECT_EQ(host(), want) << "relu2_bwd";
  Tensor dy = random_tensor(be, {T, D}, rng), dyp = be.alloc({R, D}, DType::f64), dg = be.alloc({T, k}, DType::f64);
  be.fill(dyp, 1e30f);
  a = fresh();
  be.moe_combine_bwd(dy, xp, r.slot, r.gates, dyp, dg, &a);
  EXPECT_EQ(host(), segment_amax(dyp, r.offsets)) << "moe_combine_bwd";
  // Raised, never lowered.
  be.fill(amax, 1e20f);
  be.relu2_bwd(h, da, dh, &a);
  for (float v : host()) EXPECT_EQ(v, 1e20f);
  int64_t nonzero = 0;
  for (float v : want) nonzero += v > 0.0f;
  EXPECT_GT(nonzero, 0);
}

}  // namespace
}  // namespace moelab::test
