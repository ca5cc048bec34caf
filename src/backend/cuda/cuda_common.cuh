// Device-side helpers shared by the kernel files: element loads/stores that convert to and from
// f32 by the tensor's dtype, warp and block reductions, and host-side argument checks. Kernels
// compute in f32 whatever the storage type, so one template serves f32 and bf16 tensors.
#pragma once
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <string>

#include "backend/cuda/cuda_backend.hpp"
#include "backend/cuda/cuda_check.hpp"
#include "core/tensor.hpp"

namespace moelab::cuda_detail {

using bf16 = __nv_bfloat16;

__device__ __forceinline__ float to_f32(float x) { return x; }
__device__ __forceinline__ float to_f32(bf16 x) { return __bfloat162float(x); }
template <class T> __device__ __forceinline__ T from_f32(float x);
template <> __device__ __forceinline__ float from_f32<float>(float x) { return x; }
template <> __device__ __forceinline__ bf16 from_f32<bf16>(float x) { return __float2bfloat16_rn(x); }

// Eight consecutive elements as f32, moved in 16-byte accesses (one for bf16, two for f32). The
// memory-bound kernels use these where a row or buffer is 16-byte aligned and a multiple of 8
// elements long (aligned16 on the host side), and scalar loops otherwise.
__device__ __forceinline__ void load8(const float* p, float (&v)[8]) {
  const float4 a = reinterpret_cast<const float4*>(p)[0], b = reinterpret_cast<const float4*>(p)[1];
  v[0] = a.x, v[1] = a.y, v[2] = a.z, v[3] = a.w, v[4] = b.x, v[5] = b.y, v[6] = b.z, v[7] = b.w;
}
__device__ __forceinline__ void load8(const bf16* p, float (&v)[8]) {
  const uint4 u = *reinterpret_cast<const uint4*>(p);
  const auto* h = reinterpret_cast<const __nv_bfloat162*>(&u);
#pragma unroll
  for (int k = 0; k < 4; ++k) {
    const float2 f = __bfloat1622float2(h[k]);
    v[2 * k] = f.x, v[2 * k + 1] = f.y;
  }
}
__device__ __forceinline__ void store8(float* p, const float (&v)[8]) {
  reinterpret_cast<float4*>(p)[0] = make_float4(v[0], v[1], v[2], v[3]);
  reinterpret_cast<float4*>(p)[1] = make_float4(v[4], v[5], v[6], v[7]);
}
__device__ __forceinline__ void store8(bf16* p, const float (&v)[8]) {
  uint4 u;
  auto* h = reinterpret_cast<__nv_bfloat162*>(&u);
#pragma unroll
  for (int k = 0; k < 4; ++k) h[k] = __floats2bfloat162_rn(v[2 * k], v[2 * k + 1]);
  *reinterpret_cast<uint4*>(p) = u;
}
inline bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

// W consecutive elements (W = 1 or 8), for kernels instantiated both scalar and 8-wide.
template <int W, class T>
__device__ __forceinline__ void load_w(const T* p, float (&v)[W]) {
  if constexpr (W == 8) load8(p, v);
  else v[0] = to_f32(*p);
}
template <int W, class T>
__device__ __forceinline__ void store_w(T* p, const float (&v)[W]) {
  if constexpr (W == 8) store8(p, v);
  else *p = from_f32<T>(v[0]);
}

__device__ __forceinline__ float warp_sum(float v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}
__device__ __forceinline__ float warp_max(float v) {
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// Sum over the block (blockDim.x a multiple of 32, at most 1024); every thread gets the result.
// `shm` holds 32 floats; the function syncs before reuse so it can be called repeatedly.
__device__ __forceinline__ float block_sum(float v, float* shm) {
  int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
  v = warp_sum(v);
  __syncthreads();
  if (lane == 0) shm[warp] = v;
  __syncthreads();
  float r = lane < nw ? shm[lane] : 0.f;
  return warp_sum(r);
}
__device__ __forceinline__ float block_max(float v, float* shm) {
  int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
  v = warp_max(v);
  __syncthreads();
  if (lane == 0) shm[warp] = v;
  __syncthreads();
  float r = lane < nw ? shm[lane] : -INFINITY;
  return warp_max(r);
}

inline unsigned grid_for(int64_t n, int threads, int64_t cap = 1 << 20) {
  int64_t g = (n + threads - 1) / threads;
  if (g < 1) g = 1;
  return unsigned(g < cap ? g : cap);
}

inline void require(bool ok, const std::string& op, const std::string& what) {
  if (!ok) throw Error("cuda backend: " + op + ": " + what);
}
inline void require_cuda(const Tensor& t, const std::string& op, const char* name) {
  require(t.device == Device::cuda, op, std::string(name) + " must live on the GPU, got " + t.describe());
}
inline void require_float(const Tensor& t, const std::string& op, const char* name) {
  require_cuda(t, op, name);
  require(t.dtype == DType::f32 || t.dtype == DType::bf16, op,
          std::string(name) + " must be f32 or bf16, got " + t.describe());
}
inline void require_dtype(const Tensor& t, DType d, const std::string& op, const char* name) {
  require_cuda(t, op, name);
  require(t.dtype == d, op, std::string(name) + " must be " + dtype_name(d) + ", got " + t.describe());
}

}  // namespace moelab::cuda_detail

// Calls F<T>() with T the C++ element type of float dtype `dt` (f32 or bf16).
#define MOELAB_FLOAT_DISPATCH(dt, T, ...)                                                  \
  do {                                                                                     \
    if ((dt) == ::moelab::DType::f32) {                                                    \
      using T = float;                                                                     \
      __VA_ARGS__;                                                                         \
    } else if ((dt) == ::moelab::DType::bf16) {                                            \
      using T = ::moelab::cuda_detail::bf16;                                               \
      __VA_ARGS__;                                                                         \
    } else {                                                                               \
      throw ::moelab::Error(std::string("cuda backend: unsupported dtype ") + dtype_name(dt) + \
                            " at " + __FILE__ + ":" + std::to_string(__LINE__));           \
    }                                                                                      \
  } while (0)
