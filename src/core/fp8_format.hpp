// FP8 operand formats and scale layouts: what every layer that names FP8 shares (the recipe in
// src/config, the backends' FP8 ops, the model's quantization buffers).
//
// An FP8 GEMM operand is K-major: data [rows, K] in e4m3 or e5m2, each row one run along the
// reduction dimension (the only layout Hopper's FP8 tensor cores read), plus f32 dequantization
// scales: value[r, k] ~= decode(data[r, k]) * scale[group(r, k)]. The granularity says which
// elements share a scale; the scale tensor's layout (what cuBLASLt reads) is:
//   tensor         [1]
//   row            [rows]                                (one per row: outer-vector scaling)
//   block_1x128    [ceil(K / 128), rows], rows contiguous (1 x 128 tiles along K)
//   block_128x128  [ceil(rows / 128), kbp]                (128 x 128 blocks; row stride kbp =
//                  ceil(K / 128) rounded up to a multiple of 4, 16-byte aligned as cuBLASLt reads
//                  it: padding entries belong to no group and hold 1)
// Partial groups at the edges hold fewer elements.
#pragma once
#include <algorithm>
#include <cstdint>

#include "core/dtype.hpp"
#include "core/tensor.hpp"

namespace moelab {

enum class Fp8Granularity : uint8_t { tensor, row, block_1x128, block_128x128 };

inline const char* fp8_granularity_name(Fp8Granularity g) {
  switch (g) {
    case Fp8Granularity::tensor: return "tensor";
    case Fp8Granularity::row: return "row";
    case Fp8Granularity::block_1x128: return "1x128";
    case Fp8Granularity::block_128x128: return "128x128";
  }
  return "?";
}

inline Shape fp8_scale_shape(Fp8Granularity g, int64_t rows, int64_t k) {
  const int64_t kb = (k + 127) / 128, rb = (rows + 127) / 128;
  switch (g) {
    case Fp8Granularity::tensor: return {1};
    case Fp8Granularity::row: return {std::max<int64_t>(rows, 1)};
    case Fp8Granularity::block_1x128: return {std::max<int64_t>(kb, 1), std::max<int64_t>(rows, 1)};
    case Fp8Granularity::block_128x128: return {std::max<int64_t>(rb, 1), std::max<int64_t>((kb + 3) / 4 * 4, 4)};
  }
  return {1};
}

// Largest finite magnitude of an FP8 format (saturation bound and the scale's target).
inline float fp8_max(DType d) { return d == DType::e5m2 ? 57344.0f : 448.0f; }

// The scaling rule both backends implement bit for bit, per group with absolute maximum amax:
//   a = min(max(amax, kFp8MinAmax), FLT_MAX);  q = fp8_max / a;  scale = 1 / q   (f32 divisions)
//   data = saturate(round_to_nearest_even(x * q))                                (f32 product)
// The clamps keep every scale finite and non-zero: an all-zero group, one holding a huge value
// or Inf, and one of denormals all give finite scales (groups below kFp8MinAmax flush to zero).
inline constexpr float kFp8MinAmax = 1e-30f;

}  // namespace moelab
