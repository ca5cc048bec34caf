// Launchers of the tensor-core flash-attention kernels (flash_attention.cu): bf16 q/k/v/out/dO
// of shape [B, T, H, 64], causal, grouped-query. The backend routes other shapes and types to
// the generic kernels in attention.cu.
#pragma once
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include "core/dtype.hpp"

namespace moelab::flash {

void forward(const __nv_bfloat16* q, const __nv_bfloat16* k, const __nv_bfloat16* v, __nv_bfloat16* out, float* lse,
             int B, int T, int Hq, int Hkv, float scale, cudaStream_t stream);
// D [B, Hq, T] = rowsum(dO * O), computed beforehand. dq, dk, dv in grad_dtype (bf16 or f32).
void backward(const __nv_bfloat16* q, const __nv_bfloat16* k, const __nv_bfloat16* v, const __nv_bfloat16* dout,
              const float* lse, const float* D, void* dq, void* dk, void* dv, DType grad_dtype, int B, int T, int Hq,
              int Hkv, float scale, cudaStream_t stream);

}  // namespace moelab::flash
