// Optimizer-side ops: AdamW over several steps against a naive double implementation,
// Frobenius normalization and the sum of squares (with accumulate).
#include <algorithm>
#include <cmath>

#include "gradcheck.hpp"

namespace moelab::test {
namespace {

TEST(AdamW, RaisesEachPartsAmaxOfTheNewWeights) {
  // An AmaxSink of G parts: the largest |value| of each of G equal parts of the updated param, raised (an
  // FP8 weight form's tensor scale then needs no pass); a G that does not split it is refused.
  Rng rng(fresh_seed());
  CpuBackend be(DType::f32, 2);
  const int64_t G = 3, per = 500;
  Tensor p = random_tensor(be, {G, per}, rng), g = random_tensor(be, {G, per}, rng);
  Tensor m = be.alloc({G, per}, DType::f32), v = be.alloc({G, per}, DType::f32), amax = be.alloc({G}, DType::f32);
  be.fill(m, 0.0f);
  be.fill(v, 0.0f);
  be.fill(amax, 0.0f);
  p.as<float>()[per + 17] = 40.0f;  // part 1's maximum stands out
  AdamWStep s;
  s.lr = 0.01f;
  const AmaxSink sink{amax, {}};
  be.adamw_update(p, g, m, v, s, &sink);
  const std::vector<double> pv = values(p), av = values(amax);
  for (int64_t e = 0; e < G; ++e) {
    double want = 0;
    for (int64_t i = e * per; i < (e + 1) * per; ++i) want = std::max(want, std::fabs(pv[size_t(i)]));
    EXPECT_EQ(av[size_t(e)], want) << "part " << e;
  }
  EXPECT_GT(av[1], 39.0);
  Tensor bad = be.alloc({7}, DType::f32);
  be.fill(bad, 0.0f);
  const AmaxSink bad_sink{bad, {}};
  EXPECT_THROW(be.adamw_update(p, g, m, v, s, &bad_sink), Error);
}

TEST(AdamW, MatchesNaiveOverSeveralSteps) {
  const uint64_t seed = fresh_seed();
  SCOPED_TRACE("seed " + std::to_string(seed));
  Rng rng(seed);
  CpuBackend be(DType::f64, 2);
  const int64_t n = 40000;
  Tensor p = random_tensor(be, {n}, rng), m = be.alloc({n}, DType::f64), v = be.alloc({n}, DType::f64);
  be.fill(m, 0.0f);
  be.fill(v, 0.0f);
  auto rp = values(p);
  std::vector<double> rm(size_t(n), 0.0), rv(size_t(n), 0.0);
  AdamWStep s;
  s.lr = 0.01f;
  s.beta1 = 0.8f;
  s.beta2 = 0.95f;
  s.eps = 1e-8f;
  s.weight_decay = 0.1f;
  for (int64_t step = 1; step <= 4; ++step) {
    s.step = step;
    Tensor g = random_tensor(be, {n}, rng);
    const auto gv = values(g);
    be.adamw_update(p, g, m, v, s);
    const double b1 = s.beta1, b2 = s.beta2, lr = s.lr;
    for (size_t i = 0; i < size_t(n); ++i) {
      rm[i] = b1 * rm[i] + (1 - b1) * gv[i];
      rv[i] = b2 * rv[i] + (1 - b2) * gv[i] * gv[i];
      const double mhat = rm[i] / (1 - std::pow(b1, double(step)));
      const double vhat = rv[i] / (1 - std::pow(b2, double(step)));
      rp[i] -= lr * double(s.weight_decay) * rp[i];
      rp[i] -= lr * mhat / (std::sqrt(vhat) + double(s.eps));
    }
  }
  EXPECT_LT(normalized_error(values(p), rp), 1e-13);
  EXPECT_LT(normalized_error(values(m), rm), 1e-13);
  EXPECT_LT(normalized_error(values(v), rv), 1e-13);
}

TEST(FrobeniusNormalize, UnitNormOutput) {
  const uint64_t seed = fresh_seed();
  SCOPED_TRACE("seed " + std::to_string(seed));
  Rng rng(seed);
  CpuBackend be(DType::f32, 2);
  Tensor x = random_tensor(be, {130, 70}, rng, 3.0), y = be.alloc({130, 70}, DType::f32);
  be.frobenius_normalize(x, y, 1e-7f);
  const auto xv = values(x);
  double ss = 0;
  for (double v : xv) ss += v * v;
  std::vector<double> ref;
  for (double v : xv) ref.push_back(v / (std::sqrt(ss) + 1e-7));
  EXPECT_LT(normalized_error(values(y), ref), 1e-6);
  // In place is fine too.
  be.frobenius_normalize(x, x, 1e-7f);
  EXPECT_TRUE(same_bits(x, y));
}

TEST(SumSquares, SumsAndAccumulates) {
  const uint64_t seed = fresh_seed();
  SCOPED_TRACE("seed " + std::to_string(seed));
  Rng rng(seed);
  CpuBackend be(DType::f32, 2);
  Tensor x = random_tensor(be, {54321}, rng), out = be.alloc({1}, DType::f32);
  double ref = 0;
  for (double v : values(x)) ref += v * v;
  be.sum_squares(x, out, false);
  EXPECT_NEAR(values(out)[0], ref, 1e-6 * ref);
  be.sum_squares(x, out, true);
  EXPECT_NEAR(values(out)[0], 2 * ref, 2e-6 * ref);
}

}  // namespace
}  // namespace moelab::test
