// Softcap cross-entropy: losses against a naive double reference, ignored targets, dlogits
// against finite differences of sum(losses) * grad_scale, and in-place (aliased) use.
#include <cmath>

#include "gradcheck.hpp"

namespace moelab::test {
namespace {

std::vector<double> naive_losses(const std::vector<double>& lg, const std::vector<int32_t>& tg,
                                 int64_t V, double cap) {
  std::vector<double> out;
  for (size_t n = 0; n < tg.size(); ++n) {
    if (tg[n] < 0) {
      out.push_back(0);
      continue;
    }
    double m = -INFINITY, z = 0;
    std::vector<double> zc(static_cast<size_t>(V));
    for (int64_t i = 0; i < V; ++i) {
      const double x = lg[n * size_t(V) + size_t(i)];
      zc[size_t(i)] = cap > 0 ? cap * std::tanh(x / cap) : x;
      m = std::max(m, zc[size_t(i)]);
    }
    for (double v : zc) z += std::exp(v - m);
    out.push_back(m + std::log(z) - zc[size_t(tg[n])]);
  }
  return out;
}

TEST(SoftcapXent, LossesMatchNaiveAndIgnoreNegativeTargets) {
  const uint64_t seed = fresh_seed();
  SCOPED_TRACE("seed " + std::to_string(seed));
  Rng rng(seed);
  CpuBackend be(DType::f32, 2);
  const int64_t N = 9, V = 50;
  Tensor logits = random_tensor(be, {N, V}, rng, 20.0);  // large logits so the cap matters
  std::vector<int32_t> tg;
  for (int64_t n = 0; n < N; ++n) tg.push_back(n % 4 == 1 ? -1 : int32_t(rng.below(V)));
  Tensor targets = i32_tensor(be, {N}, tg);
  Tensor losses = be.alloc({N}, DType::f32), dl = be.alloc({N, V}, DType::f32);
  be.softcap_xent(logits, targets, 15.0f, 1.0f, losses, dl);
  const auto lv = values(losses), dv = values(dl);
  EXPECT_LT(normalized_error(lv, naive_losses(values(logits), tg, V, 15.0)), 1e-6);
  for (int64_t n = 0; n < N; ++n)
    if (tg[size_t(n)] < 0) {
      EXPECT_EQ(lv[size_t(n)], 0.0);
      for (int64_t i = 0; i < V; ++i) EXPECT_EQ(dv[size_t(n * V + i)], 0.0);
    }
}

TEST(SoftcapXent, GradientMatchesFiniteDifferences) {
  for (float cap : {15.0f, 0.0f}) {
    const uint64_t seed = fresh_seed();
    SCOPED_TRACE("seed " + std::to_string(seed) + " cap " + std::to_string(cap));
    Rng rng(seed);
    CpuBackend be(DType::f64, 2);
    const int64_t N = 5, V = 11;
    const float scale = 0.37f;
    Tensor logits = random_tensor(be, {N, V}, rng, 8.0);
    Tensor targets = i32_tensor(be, {N}, {3, -1, 0, 10, 7});
    Tensor losses = be.alloc({N}, DType::f64), dl = be.alloc({N, V}, DType::f64);
    Tensor scratch = be.alloc({N, V}, DType::f64);
    auto loss = [&] {
      be.softcap_xent(logits, targets, cap, scale, losses, scratch);
      double s = 0;
      for (double v : values(losses)) s += v;
      return s * double(scale);
    };
    be.softcap_xent(logits, targets, cap, scale, losses, dl);
    EXPECT_LT(normalized_error(values(dl), numeric_grad(logits, loss)), 1e-8);
  }
}

TEST(SoftcapXent, InPlaceGradientMatchesSeparate) {
  const uint64_t seed = fresh_seed();
  SCOPED_TRACE("seed " + std::to_string(seed));
  Rng rng(seed);
  CpuBackend be(DType::f32, 2);
  const int64_t N = 16, V = 300;
  Tensor logits = random_tensor(be, {N, V}, rng, 5.0);
  std::vector<int32_t> tg;
  for (int64_t n = 0; n < N; ++n) tg.push_back(int32_t(rng.below(V)));
  Tensor targets = i32_tensor(be, {N}, tg);
  Tensor losses = be.alloc({N}, DType::f32), sep = be.alloc({N, V}, DType::f32);
  be.softcap_xent(logits, targets, 15.0f, 0.5f, losses, sep);
  const auto l1 = values(losses);
  be.softcap_xent(logits, targets, 15.0f, 0.5f, losses, logits);
  EXPECT_TRUE(same_bits(logits, sep));
  EXPECT_EQ(values(losses), l1);
}

TEST(SoftcapXent, RejectsTargetOutsideVocab) {
  CpuBackend be(DType::f32, 1);
  Tensor logits = be.alloc({1, 4}, DType::f32), losses = be.alloc({1}, DType::f32);
  be.fill(logits, 0.0f);
  Tensor targets = i32_tensor(be, {1}, {4});
  EXPECT_THROW(be.softcap_xent(logits, targets, 15.0f, 1.0f, losses, logits), Error);
}

}  // namespace
}  // namespace moelab::test
