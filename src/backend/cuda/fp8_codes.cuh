// The device side of backend.hpp's FP8 scaling rule, shared by every kernel that writes FP8
// codes (fp8_quantize.cu, grouped_gemm_fp8.cu): the multiplier of a group's amax, and four
// saturating round-to-nearest-even conversions packed into one 32-bit store.
#pragma once
#include <cuda_fp8.h>

#include <cfloat>
#include <cstdint>

#include "backend/backend.hpp"

namespace moelab::cuda_detail {

__device__ __forceinline__ float multiplier_of(float amax, float fmax) {
  const float a = fminf(fmaxf(amax, kFp8MinAmax), FLT_MAX);
  return __fdiv_rn(fmax, a);
}

// kFormat 0: e4m3, 1: e5m2.
template <int kFormat>
__device__ __forceinline__ uint32_t encode4(float a, float b, float c, float d) {
  const auto fmt = kFormat == 0 ? __NV_E4M3 : __NV_E5M2;
  const uint32_t q0 = __nv_cvt_float_to_fp8(a, __NV_SATFINITE, fmt);
  const uint32_t q1 = __nv_cvt_float_to_fp8(b, __NV_SATFINITE, fmt);
  const uint32_t q2 = __nv_cvt_float_to_fp8(c, __NV_SATFINITE, fmt);
  const uint32_t q3 = __nv_cvt_float_to_fp8(d, __NV_SATFINITE, fmt);
  return q0 | (q1 << 8) | (q2 << 16) | (q3 << 24);
}

}  // namespace moelab::cuda_detail
