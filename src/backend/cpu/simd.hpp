// Small vector helpers for the CPU kernels, written with GCC vector extensions so they compile
// to SSE on the x86-64-v2 baseline and to AVX2/FMA inside functions marked MOELAB_CPU_CLONES
// (GCC function multiversioning picks the clone at load time; results are deterministic on one
// machine). Reductions use fixed lane order, never the compiler's reassociation.
#pragma once
#include <cstdint>
#include <cstring>

#define MOELAB_CPU_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#define MOELAB_CPU_INLINE inline __attribute__((always_inline))

namespace moelab::cpu {

// The helpers below are always inlined, so no 32-byte vector ever crosses a call boundary and
// GCC's note about the AVX calling convention does not apply.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wpsabi"

template <class T>
struct Simd {
  static constexpr int64_t lanes = 32 / int64_t(sizeof(T));
  typedef T Vec __attribute__((vector_size(32)));
  static MOELAB_CPU_INLINE Vec load(const T* p) {
    Vec v;
    std::memcpy(&v, p, sizeof(Vec));
    return v;
  }
  static MOELAB_CPU_INLINE void store(T* p, Vec v) { std::memcpy(p, &v, sizeof(Vec)); }
};

// <a, b> with lane-wise partial sums added in a fixed order.
template <class T>
MOELAB_CPU_INLINE T dot(const T* a, const T* b, int64_t n) {
  using S = Simd<T>;
  typename S::Vec acc0{}, acc1{};
  int64_t i = 0;
  for (; i + 2 * S::lanes <= n; i += 2 * S::lanes) {
    acc0 += S::load(a + i) * S::load(b + i);
    acc1 += S::load(a + i + S::lanes) * S::load(b + i + S::lanes);
  }
  for (; i + S::lanes <= n; i += S::lanes) acc0 += S::load(a + i) * S::load(b + i);
  acc0 += acc1;
  T s = 0;
  for (int64_t l = 0; l < S::lanes; ++l) s += acc0[l];
  for (; i < n; ++i) s += a[i] * b[i];
  return s;
}

// y += a * x
template <class T>
MOELAB_CPU_INLINE void axpy(T a, const T* x, T* y, int64_t n) {
  using S = Simd<T>;
  int64_t i = 0;
  for (; i + S::lanes <= n; i += S::lanes) S::store(y + i, S::load(y + i) + a * S::load(x + i));
  for (; i < n; ++i) y[i] += a * x[i];
}

#pragma GCC diagnostic pop

}  // namespace moelab::cpu
