// Test helpers for backend ops: random f64/f32 tensors, reading any float tensor back at full
// precision, normalized error, and central finite differences for gradient checks. The usual
// check: L = sum(out * w) for random w, so dL/dout = w feeds the op's backward and the result is
// compared against the numerical gradient of L.
#pragma once
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <functional>
#include <limits>
#include <random>
#include <vector>

#include "backend/cpu/cpu_backend.hpp"
#include "core/rng.hpp"

namespace moelab::test {

// Values of a float tensor (f32 or f64) as double, straight from memory (read() rounds to f32).
inline std::vector<double> values(const Tensor& t) {
  std::vector<double> out(size_t(t.numel()));
  for (int64_t i = 0; i < t.numel(); ++i)
    out[size_t(i)] = t.dtype == DType::f64 ? t.as<double>()[i] : double(t.as<float>()[i]);
  return out;
}

inline void set_values(Tensor& t, const std::vector<double>& v) {
  EXPECT_EQ(int64_t(v.size()), t.numel());
  for (int64_t i = 0; i < t.numel(); ++i) {
    if (t.dtype == DType::f64)
      t.as<double>()[i] = v[size_t(i)];
    else
      t.as<float>()[i] = float(v[size_t(i)]);
  }
}

inline std::vector<double> randn(Rng& rng, int64_t n, double scale = 1.0) {
  std::vector<double> v(static_cast<size_t>(n));
  for (auto& x : v) x = rng.normal() * scale;
  return v;
}

// A tensor of the backend's master dtype filled with N(0, scale^2).
inline Tensor random_tensor(CpuBackend& be, const Shape& shape, Rng& rng, double scale = 1.0) {
  Tensor t = be.alloc(shape, be.master_dtype());
  set_values(t, randn(rng, t.numel(), scale));
  return t;
}

inline Tensor tensor_from(CpuBackend& be, const Shape& shape, const std::vector<double>& v) {
  Tensor t = be.alloc(shape, be.master_dtype());
  set_values(t, v);
  return t;
}

inline Tensor i32_tensor(CpuBackend& be, const Shape& shape, const std::vector<int32_t>& v) {
  Tensor t = be.alloc(shape, DType::i32);
  be.write_i32(t, v);
  return t;
}

// ||out - ref|| / ||ref|| (absolute norm when ref is zero); NaN or a size mismatch gives +inf so
// a broken result never passes.
inline double normalized_error(const std::vector<double>& out, const std::vector<double>& ref) {
  if (out.size() != ref.size()) return std::numeric_limits<double>::infinity();
  double num = 0, den = 0;
  for (size_t i = 0; i < out.size(); ++i) {
    if (std::isnan(out[i]) || std::isnan(ref[i])) return std::numeric_limits<double>::infinity();
    num += (out[i] - ref[i]) * (out[i] - ref[i]);
    den += ref[i] * ref[i];
  }
  const double e = den > 0 ? std::sqrt(num / den) : std::sqrt(num);
  return std::isnan(e) ? std::numeric_limits<double>::infinity() : e;
}

inline double dot(const std::vector<double>& a, const std::vector<double>& b) {
  double s = 0;
  for (size_t i = 0; i < a.size() && i < b.size(); ++i) s += a[i] * b[i];
  return s;
}

// sum(out * w) for the loss L = <out, w>.
inline double weighted_sum(const Tensor& out, const std::vector<double>& w) {
  return dot(values(out), w);
}

// dL/dx by central differences, perturbing each element of the f64 tensor x in place. loss() is
// run once more at the end so any outputs it writes match the unperturbed x again.
inline std::vector<double> numeric_grad(Tensor& x, const std::function<double()>& loss,
                                        double h = 1e-5) {
  EXPECT_EQ(x.dtype, DType::f64) << "finite differences need f64 tensors";
  std::vector<double> g(size_t(x.numel()));
  double* p = x.as<double>();
  for (int64_t i = 0; i < x.numel(); ++i) {
    const double keep = p[i];
    p[i] = keep + h;
    const double lp = loss();
    p[i] = keep - h;
    const double lm = loss();
    p[i] = keep;
    g[size_t(i)] = (lp - lm) / (2 * h);
  }
  loss();
  return g;
}

// Bitwise equality of two tensors' memory.
inline bool same_bits(const Tensor& a, const Tensor& b) {
  return a.bytes() == b.bytes() && std::memcmp(a.data, b.data, a.bytes()) == 0;
}

// Fresh seed per test so each run sees new inputs; printed on failure via SCOPED_TRACE.
inline uint64_t fresh_seed() {
  static uint64_t base = uint64_t(std::random_device{}()) << 32 | std::random_device{}();
  static uint64_t n = 0;
  return splitmix64(base + n++);
}

}  // namespace moelab::test
