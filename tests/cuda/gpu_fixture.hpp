// What the GPU tests share: normalized error on float vectors (tests/ops' measure), the fixture
// that skips without a GPU and holds a CUDA and a CPU backend with a fresh seed, and tensor pairs
// (the same values on both backends) compared by normalized error.
#pragma once
#include <gtest/gtest.h>

#include <chrono>
#include <memory>
#include <string>
#include <vector>

#include "backend/cpu/cpu_backend.hpp"
#include "backend/cuda/cuda_backend.hpp"
#include "core/dtype.hpp"
#include "core/rng.hpp"
#include "ops/op_harness.hpp"

namespace moelab {

using ops::kRowTolFactor;
constexpr double kBf16Tol = 1e-2;  // outputs stored in bf16, or computed from bf16 operands
constexpr double kF32Tol = 1e-4;   // f32 math on identical inputs

inline std::vector<double> as_double(const std::vector<float>& v) { return std::vector<double>(v.begin(), v.end()); }
// ||out - ref|| / ||ref||; infinite on a size mismatch or a NaN or Inf in out.
inline double nerr(const std::vector<float>& out, const std::vector<float>& ref) {
  return ops::nerr(as_double(out), as_double(ref));
}
// The worst row's normalized error (ops::worst_row_nerr).
inline double worst_row_nerr(const std::vector<float>& out, const std::vector<float>& ref, size_t row_len) {
  return ops::worst_row_nerr(as_double(out), as_double(ref), row_len);
}

class GpuTest : public ::testing::Test {
 protected:
  void SetUp() override {
    if (!CudaBackend::cuda_device_available()) GTEST_SKIP() << "no CUDA GPU on this machine";
    gpu = std::make_unique<CudaBackend>();
    cpu = std::make_unique<CpuBackend>(DType::f32, 2);
    seed = uint64_t(std::chrono::high_resolution_clock::now().time_since_epoch().count());
    rng = std::make_unique<Rng>(seed);
    RecordProperty("seed", std::to_string(seed));
  }

  // A tensor on both backends with the same values: f32 on the CPU, `dt` on the GPU (values
  // rounded to bf16 first when dt is bf16).
  struct Pair {
    Tensor c, g;
  };
  std::vector<float> randn(int64_t n, float scale = 1.f) {
    std::vector<float> v(static_cast<size_t>(n));
    for (auto& x : v) x = float(rng->normal()) * scale;
    return v;
  }
  Pair pair_from(const Shape& s, DType dt, std::vector<float> v) {
    if (dt == DType::bf16)
      for (auto& x : v) x = round_to_bf16(x);
    Pair p{cpu->alloc(s, DType::f32), gpu->alloc(s, dt)};
    cpu->write(p.c, v);
    gpu->write(p.g, v);
    return p;
  }
  Pair rand_pair(const Shape& s, DType dt, float scale = 1.f) {
    int64_t n = 1;
    for (auto d : s) n *= d;
    return pair_from(s, dt, randn(n, scale));
  }
  Pair i32_pair(const Shape& s, const std::vector<int32_t>& v) {
    Pair p{cpu->alloc(s, DType::i32), gpu->alloc(s, DType::i32)};
    cpu->write_i32(p.c, v);
    gpu->write_i32(p.g, v);
    return p;
  }
  // Output buffers: CPU f32, GPU `dt`, the GPU one poisoned with NaN so unwritten elements fail.
  Pair out_pair(const Shape& s, DType dt) {
    Pair p{cpu->alloc(s, dt == DType::i32 ? DType::i32 : DType::f32), gpu->alloc(s, dt)};
    if (dt != DType::i32) gpu->fill(p.g, NAN);
    else gpu->fill(p.g, -7777);
    return p;
  }
  // The global normalized error within tol, and every row (the last dimension; elements of a
  // vector) within kRowTolFactor x tol of its own norm, so a few bad rows cannot hide in a
  // large output.
  void expect_close(const Pair& p, double tol, const std::string& what) {
    const std::vector<float> out = gpu->read(p.g), ref = cpu->read(p.c);
    EXPECT_LT(nerr(out, ref), tol) << what << " (seed " << seed << ")";
    const size_t row_len = p.c.ndim() >= 2 ? size_t(p.c.shape.back()) : 1;
    EXPECT_LT(worst_row_nerr(out, ref, row_len), kRowTolFactor * tol)
        << what << ": a row is off by more than " << kRowTolFactor << " x the tolerance (seed " << seed << ")";
  }
  std::unique_ptr<CudaBackend> gpu;
  std::unique_ptr<CpuBackend> cpu;
  std::unique_ptr<Rng> rng;
  uint64_t seed = 0;
};

}  // namespace moelab
