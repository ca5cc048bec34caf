// Launchers of the tensor-core flash-attention kernels (flash_attention.cu): bf16 q/k/v/out/dO of
// shape [B, T, H, head_dim] with head_dim 64 or 128, causal, grouped-query, optional sliding
// window (query t sees keys t - window .. t; window <= 0 or >= T: full causal). The backend
// routes other shapes and types to the generic kernels in attention.cu.
#pragma once
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include "core/dtype.hpp"

namespace moelab::flash {

// Head dims these kernels serve (the model refuses others on the GPU at start-up).
bool supports_head_dim(int head_dim);

void forward(const __nv_bfloat16* q, const __nv_bfloat16* k, const __nv_bfloat16* v, __nv_bfloat16* out, float* lse,
             int B, int T, int Hq, int Hkv, int head_dim, int window, float scale, cudaStream_t stream);
// D [B, Hq, T] = rowsum(dout * out), which backward() expects.
void row_dot(const __nv_bfloat16* out, const __nv_bfloat16* dout, float* D, int B, int T, int Hq, int head_dim,
             cudaStream_t stream);
// dq, dk, dv in grad_dtype (bf16 or f32), overwritten.
void backward(const __nv_bfloat16* q, const __nv_bfloat16* k, const __nv_bfloat16* v, const __nv_bfloat16* dout,
              const float* lse, const float* D, void* dq, void* dk, void* dv, DType grad_dtype, int B, int T, int Hq,
              int Hkv, int head_dim, int window, float scale, cudaStream_t stream);

}  // namespace moelab::flash
