// Newton-Schulz: the engine's iteration matches a double-precision host iteration, its output is
// near-orthogonal (singular values in the quintic's band), and each singular value follows the
// scalar map s -> a s + b s^3 + c s^5 applied `steps` times, for square, tall and wide matrices.
#include <gtest/gtest.h>

#include <cmath>
#include <random>

#include "backend/cpu/cpu_backend.hpp"
#include "optim/newton_schulz.hpp"
#include "optim/optim_reference.hpp"

namespace moelab {
namespace {

using namespace testref;

double quintic_iterated(double s, int64_t steps) {
  for (int64_t i = 0; i < steps; ++i) s = 3.4445 * s - 4.7750 * s * s * s + 2.0315 * s * s * s * s * s;
  return s;
}

struct Case {
  DType dtype;
  double tol;  // normalized error against the double reference
};

class NewtonSchulzTest : public ::testing::TestWithParam<Case> {};

TEST_P(NewtonSchulzTest, MatchesReferenceAndIsNearOrthogonal) {
  const Case c = GetParam();
  CpuBackend b(c.dtype, 2);
  Rng rng = fresh_rng();
  const std::pair<int64_t, int64_t> shapes[] = {{48, 48}, {96, 32}, {32, 96}, {1, 24}, {40, 39}};
  NewtonSchulz ns(b, 96 * 32, 48);
  for (auto [m, n] : shapes) {
    SCOPED_TRACE(std::to_string(m) + "x" + std::to_string(n));
    Mat g = random_mat(rng, m, n, 0.01 + 10 * rng.uniform());  // the result must not depend on scale
    Tensor gt = b.alloc({m, n}, c.dtype);
    b.write(gt, to_floats(g));
    const int64_t steps = 5;
    Tensor x = ns.run(gt, steps);
    ASSERT_EQ(x.shape, (Shape{m, n}));
    const std::vector<double> out = read_exact(b, x);
    const Mat ref = newton_schulz(g, steps);
    EXPECT_LT(rel_err(out, ref.a), c.tol);

    // Singular values: each follows the iterated quintic; all with a non-negligible input value
    // land in the band, and random matrices of aspect >= 2 have no negligible ones (square and
    // near-square ones may have a few, which 5 steps cannot lift).
    const bool aspect2 = std::max(m, n) >= 2 * std::min(m, n);
    Mat xo(m, n);
    xo.a.assign(out.begin(), out.end());
    const std::vector<double> sv_out = singular_values(xo);
    std::vector<double> sv_in = singular_values(g);
    double fro = 0;
    for (double v : g.a) fro += v * v;
    fro = std::sqrt(fro);
    std::vector<double> predicted;
    for (double s : sv_in) predicted.push_back(quintic_iterated(s / fro, steps));
    std::sort(predicted.begin(), predicted.end());
    EXPECT_LT(rel_err(sv_out, predicted), 1e-3);
    for (size_t i = 0; i < sv_in.size(); ++i) {
      if (aspect2 || sv_in[i] / fro >= 3e-3) {
        EXPECT_GE(quintic_iterated(sv_in[i] / fro, steps), 0.6);
        EXPECT_LE(quintic_iterated(sv_in[i] / fro, steps), 1.3);
      }
    }
    size_t in_band = 0;
    for (double s : sv_out) in_band += (s >= 0.6 && s <= 1.3);
    if (aspect2) {
      EXPECT_EQ(in_band, sv_out.size());
    } else {
      EXPECT_GE(double(in_band), 0.9 * double(sv_out.size()));
    }
  }
}

TEST_P(NewtonSchulzTest, MoreStepsStayInBand) {
  const Case c = GetParam();
  CpuBackend b(c.dtype, 2);
  Rng rng = fresh_rng();
  NewtonSchulz ns(b, 64 * 32, 32);
  Mat g = random_mat(rng, 64, 32);
  Tensor gt = b.alloc({64, 32}, c.dtype);
  b.write(gt, to_floats(g));
  Tensor x = ns.run(gt, 12);
  const std::vector<double> out = read_exact(b, x);
  EXPECT_LT(rel_err(out, newton_schulz(g, 12).a), 10 * c.tol);
  Mat xo(64, 32);
  xo.a.assign(out.begin(), out.end());
  expect_near_orthogonal(xo);
}

TEST(NewtonSchulz, InputInMasterDtypeIsRoundedToActDtype) {
  // A non-act input (e.g. an f32 gradient on a backend computing in f64) goes through a copy.
  CpuBackend b(DType::f64, 1);
  Rng rng = fresh_rng();
  Mat g = random_mat(rng, 16, 24);
  Tensor g32 = b.alloc({16, 24}, DType::f32);
  b.write(g32, to_floats(g));
  NewtonSchulz ns(b, 16 * 24, 16);
  const std::vector<double> out = read_exact(b, ns.run(g32, 5));
  EXPECT_LT(rel_err(out, newton_schulz(g, 5).a), 1e-6);
}

TEST(NewtonSchulz, RejectsShapesBeyondItsScratch) {
  CpuBackend b(DType::f32, 1);
  NewtonSchulz ns(b, 16, 4);
  Tensor g = b.alloc({8, 8}, DType::f32);
  b.fill(g, 1.0f);
  EXPECT_THROW(ns.run(g, 1), Error);
}

INSTANTIATE_TEST_SUITE_P(Dtypes, NewtonSchulzTest,
                         ::testing::Values(Case{DType::f32, 1e-4}, Case{DType::f64, 1e-9}),
                         [](const auto& info) { return std::string(dtype_name(info.param.dtype)); });

}  // namespace
}  // namespace moelab

namespace moelab {
namespace {

// The batched pass over an [E, m, n] stack (grouped GEMMs, with A^T, P^T standing in for the
// symmetric A, P and the wide case's P X as the weight-gradient product) computes what E separate
// runs compute.
TEST(NewtonSchulz, BatchedStackMatchesMatrixByMatrix) {
  for (DType dt : {DType::f32, DType::f64}) {
    CpuBackend b(dt, 2);
    Rng rng = fresh_rng();
    const int64_t E = 5;
    const std::pair<int64_t, int64_t> shapes[] = {{48, 24}, {24, 48}, {32, 32}, {8, 40}};  // last: router-like
    NewtonSchulz ns(b, 48 * 24, 32, E);
    for (auto [m, n] : shapes) {
      ns.prepare_batched(E, m, n);
      Tensor g = b.alloc({E, m, n}, dt);
      std::vector<float> v(size_t(g.numel()));
      for (size_t i = 0; i < v.size(); ++i) v[i] = float(rng.normal() * (1.0 + double(i % 7)));  // unequal scales
      b.write(g, v);
      std::vector<float> batched = b.read(ns.run_batched(g, 5));
      double err2 = 0, ref2 = 0;
      for (int64_t e = 0; e < E; ++e) {
        std::vector<float> single = b.read(ns.run(g.index(e), 5));
        for (size_t i = 0; i < single.size(); ++i) {
          double d = double(batched[size_t(e * m * n) + i]) - double(single[i]);
          ASSERT_FALSE(std::isnan(batched[size_t(e * m * n) + i]));
          err2 += d * d;
          ref2 += double(single[i]) * double(single[i]);
        }
      }
      EXPECT_LT(std::sqrt(err2 / ref2), dt == DType::f64 ? 1e-6 : 1e-5) << m << "x" << n << " " << dtype_name(dt);
    }
  }
}

TEST(NewtonSchulz, BatchedNeedsPreparedShape) {
  CpuBackend b(DType::f32, 1);
  NewtonSchulz ns(b, 16 * 8, 8, 2);
  Tensor g = b.alloc({2, 16, 8}, DType::f32);
  b.fill(g, 1.0f);
  EXPECT_THROW(ns.run_batched(g, 1), Error);
}

}  // namespace
}  // namespace moelab
