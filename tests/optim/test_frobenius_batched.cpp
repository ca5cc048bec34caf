// Backend::frobenius_normalize_batched (Muon's per-matrix pre-scaling of a whole stack) against a
// double-precision host reference: each slice by its own norm, with slices of very different
// scales so that a shared norm would fail, plus shape checks.
#include <gtest/gtest.h>

#include <cmath>
#include <random>

#include "backend/cpu/cpu_backend.hpp"
#include "optim/optim_reference.hpp"

namespace moelab {
namespace {

using namespace testref;

TEST(FrobeniusNormalizeBatched, EachSliceByItsOwnNorm) {
  for (DType dt : {DType::f32, DType::f64}) {
    CpuBackend b(dt, 2);
    Rng rng = fresh_rng();
    const Shape shapes[] = {{5, 24, 16}, {3, 7}, {1, 33, 9}, {4, 2, 3, 5}};
    for (const Shape& shape : shapes) {
      SCOPED_TRACE(shape_str(shape) + " " + dtype_name(dt));
      Tensor x = b.alloc(shape, dt), y = b.alloc(shape, dt);
      const int64_t groups = shape[0], per = x.numel() / groups;
      std::vector<float> v(size_t(x.numel()));
      for (size_t i = 0; i < v.size(); ++i) v[i] = float(rng.normal() * std::pow(10.0, double(int64_t(i) / per) - 2.0));
      b.write(x, v);
      b.fill(y, std::nanf(""));
      b.frobenius_normalize_batched(x, y, 1e-7f);
      const std::vector<double> got = read_exact(b, y);
      std::vector<double> ref(v.size());
      for (int64_t g = 0; g < groups; ++g) {
        double ss = 0;
        for (int64_t i = g * per; i < (g + 1) * per; ++i) ss += double(v[size_t(i)]) * double(v[size_t(i)]);
        const double inv = 1.0 / (std::sqrt(ss) + 1e-7);
        for (int64_t i = g * per; i < (g + 1) * per; ++i) ref[size_t(i)] = double(v[size_t(i)]) * inv;
      }
      for (double d : got) ASSERT_FALSE(std::isnan(d));
      // Per slice: a shared norm would leave the small slices far from unit norm.
      for (int64_t g = 0; g < groups; ++g) {
        std::vector<double> gs(got.begin() + g * per, got.begin() + (g + 1) * per);
        std::vector<double> rs(ref.begin() + g * per, ref.begin() + (g + 1) * per);
        EXPECT_LT(rel_err(gs, rs), dt == DType::f64 ? 1e-12 : 1e-6) << "slice " << g;
      }
    }
  }
}

TEST(FrobeniusNormalizeBatched, RejectsMismatchedShapes) {
  CpuBackend b(DType::f32, 1);
  Tensor x = b.alloc({2, 4, 4}, DType::f32), y = b.alloc({4, 2, 4}, DType::f32);
  b.fill(x, 1.0f);
  EXPECT_THROW(b.frobenius_normalize_batched(x, y, 1e-7f), Error);
}

}  // namespace
}  // namespace moelab
