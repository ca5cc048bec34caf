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

// Eight values of a row, each times m, as eight codes for one 8-byte store.
template <int kFormat>
__device__ __forceinline__ uint2 encode8(const float (&v)[8], float m) {
  return make_uint2(encode4<kFormat>(__fmul_rn(v[0], m), __fmul_rn(v[1], m), __fmul_rn(v[2], m), __fmul_rn(v[3], m)),
                    encode4<kFormat>(__fmul_rn(v[4], m), __fmul_rn(v[5], m), __fmul_rn(v[6], m), __fmul_rn(v[7], m)));
}

// Column j of four rows of 8 values, each times m, as one word of four codes (row 0 lowest): a
// word of the transposed copy.
template <int kFormat>
__device__ __forceinline__ uint32_t encode_column4(const float (&v)[4][8], int j, float m) {
  return encode4<kFormat>(__fmul_rn(v[0][j], m), __fmul_rn(v[1][j], m), __fmul_rn(v[2][j], m), __fmul_rn(v[3][j], m));
}

// Where the register-path quantizers keep word q (rows 4q .. 4q + 3) of a column of column group
// cg (tile columns 8 cg .. 8 cg + 7) in their shared [column][32 words] tile. A warp's threads
// write the 8 columns of their groups for two values of q, and a warp reads a column's 32 words;
// swizzling by the column group makes both touch 32 distinct banks.
__device__ __forceinline__ int word_slot(int q, int cg) { return q ^ (2 * cg); }

}  // namespace moelab::cuda_detail
