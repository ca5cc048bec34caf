// Element conversion between the dtypes the CPU backend stores: f32, f64, bf16 (raw bits, round
// to nearest even through core/dtype.hpp), the fp8 formats e4m3 (OCP "fn": no infinities, max 448)
// and e5m2 (max 57344), both rounded to nearest even and saturated at their largest finite value
// as FP8 training recipes do, and i32 (float -> int rounds to nearest even). Emulating fp8 here
// lets FP8 numerics be tested without a GPU.
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <type_traits>

#include "backend/cpu/cpu_common.hpp"
#include "core/dtype.hpp"

namespace moelab::cpu {

struct Bf16 {
  uint16_t bits;
};

struct Fp8E4M3 {
  uint8_t bits;
};
struct Fp8E5M2 {
  uint8_t bits;
};

// A small binary float format: exponent and mantissa widths, bias, largest finite code, NaN code,
// and whether the all-ones exponent means inf/NaN (IEEE style, e5m2) or is a normal binade (e4m3).
struct MiniFloat {
  int exp_bits, man_bits, bias;
  uint8_t max_code, nan_code;
  bool ieee_specials;
};
inline constexpr MiniFloat kE4M3{4, 3, 7, 0x7e, 0x7f, false};
inline constexpr MiniFloat kE5M2{5, 2, 15, 0x7b, 0x7e, true};

inline uint8_t encode_minifloat(double v, const MiniFloat& f) {
  if (std::isnan(v)) return f.nan_code;
  const uint8_t sign = std::signbit(v) ? 0x80 : 0;
  const double a = std::fabs(v);
  if (std::isinf(a)) return uint8_t(sign | f.max_code);
  const int emin = 1 - f.bias;  // exponent of the smallest normal
  int code;
  if (a < std::ldexp(1.0, emin)) {
    // Subnormal: a multiple of 2^(emin - M); rounding up to 2^M lands on the smallest normal,
    // whose code is that same integer.
    code = int(std::nearbyint(std::ldexp(a, f.man_bits - emin)));
  } else {
    int e;
    std::frexp(a, &e);  // a = m * 2^e, m in [0.5, 1)
    e -= 1;             // a = 1.x * 2^e
    if (e - emin > 40) return uint8_t(sign | f.max_code);  // far past the range
    double q = std::nearbyint(std::ldexp(a, f.man_bits - e));  // in [2^M, 2^(M+1)]
    if (q >= std::ldexp(1.0, f.man_bits + 1)) {
      q = std::ldexp(1.0, f.man_bits);
      e += 1;
    }
    code = ((e + f.bias) << f.man_bits) | (int(q) - (1 << f.man_bits));
  }
  if (code > f.max_code) code = f.max_code;  // saturate
  return uint8_t(sign | code);
}

inline double decode_minifloat(uint8_t bits, const MiniFloat& f) {
  const int mag = bits & 0x7f;
  const double sign = (bits & 0x80) ? -1.0 : 1.0;
  const int ef = mag >> f.man_bits, mf = mag & ((1 << f.man_bits) - 1);
  const int emax_field = (1 << f.exp_bits) - 1;
  if (f.ieee_specials && ef == emax_field) return mf ? NAN : sign * INFINITY;
  if (!f.ieee_specials && mag == f.nan_code) return NAN;
  if (ef == 0) return sign * std::ldexp(double(mf), 1 - f.bias - f.man_bits);
  return sign * std::ldexp(1.0 + std::ldexp(double(mf), -f.man_bits), ef - f.bias);
}

template <class E>
inline double to_double(E v) {
  return double(v);
}
template <>
inline double to_double<Bf16>(Bf16 v) {
  return double(bf16_bits_to_f32(v.bits));
}

template <>
inline double to_double<Fp8E4M3>(Fp8E4M3 v) {
  return decode_minifloat(v.bits, kE4M3);
}
template <>
inline double to_double<Fp8E5M2>(Fp8E5M2 v) {
  return decode_minifloat(v.bits, kE5M2);
}

template <class E>
inline E from_double(double v) {
  return E(v);
}
template <>
inline float from_double<float>(double v) {
  return float(v);
}
template <>
inline Bf16 from_double<Bf16>(double v) {
  float f = float(v);
  // Avoid double rounding: if f64 -> f32 landed exactly on a bf16 tie that v itself is not on,
  // step one f32 ulp toward v so the tie breaks the way v's exact value says.
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0xffffu) == 0x8000u && double(f) != v && !std::isnan(v))
    f = std::nextafter(f, v > double(f) ? INFINITY : -INFINITY);
  return Bf16{f32_to_bf16_bits(f)};
}
template <>
inline Fp8E4M3 from_double<Fp8E4M3>(double v) {
  return Fp8E4M3{encode_minifloat(v, kE4M3)};
}
template <>
inline Fp8E5M2 from_double<Fp8E5M2>(double v) {
  return Fp8E5M2{encode_minifloat(v, kE5M2)};
}
template <>
inline int32_t from_double<int32_t>(double v) {
  return int32_t(std::nearbyint(v));
}

// Calls f(E{}) with E the storage type of dtype.
template <class F>
decltype(auto) with_element(DType dtype, const char* op, F&& f) {
  switch (dtype) {
    case DType::f32: return f(float{});
    case DType::f64: return f(double{});
    case DType::bf16: return f(Bf16{});
    case DType::e4m3: return f(Fp8E4M3{});
    case DType::e5m2: return f(Fp8E5M2{});
    case DType::i32: return f(int32_t{});
  }
  fail(op, std::string("unknown dtype code ") + std::to_string(int(dtype)));
}

template <class S, class D>
inline void convert_range(const S* src, D* dst, int64_t n) {
  if constexpr (std::is_same_v<S, D>) {
    std::memcpy(dst, src, size_t(n) * sizeof(S));
  } else if constexpr (std::is_same_v<S, float> && std::is_same_v<D, Bf16>) {
    for (int64_t i = 0; i < n; ++i) dst[i] = Bf16{f32_to_bf16_bits(src[i])};
  } else {
    for (int64_t i = 0; i < n; ++i) dst[i] = from_double<D>(to_double(src[i]));
  }
}

// dst[i] = src[i] converted, n elements.
inline void convert_elements(DType sdt, const void* src, DType ddt, void* dst, int64_t n,
                             const char* op) {
  if (n <= 0) return;
  if (sdt == ddt) {
    std::memcpy(dst, src, size_t(n) * dtype_size(sdt));
    return;
  }
  with_element(sdt, op, [&](auto s) {
    using S = decltype(s);
    with_element(ddt, op, [&](auto d) {
      using D = decltype(d);
      convert_range(static_cast<const S*>(src), static_cast<D*>(dst), n);
    });
  });
}

}  // namespace moelab::cpu
