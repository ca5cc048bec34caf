// Kernel lab: launchers of the head-dim-64 flash-attention variants (attention_variants_hd64.cu):
// bf16 q/k/v/out/dO of shape [B, T, H, 64], causal, grouped-query, no window.
//
// Each of the three passes (forward, dq, dk/dv) has several numbered variants so that
// bench_attention_variants.cu can time and check them side by side on the same inputs, and
// test_attention_variants.cpp checks every one against the CPU reference on odd shapes;
// `kProduction` names the ones the engine's kernels were derived from.
#pragma once
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include "core/dtype.hpp"

namespace moelab::flash_lab {

void forward(const __nv_bfloat16* q, const __nv_bfloat16* k, const __nv_bfloat16* v, __nv_bfloat16* out, float* lse,
             int B, int T, int Hq, int Hkv, float scale, cudaStream_t stream);
// D [B, Hq, T] = rowsum(dO * O), computed beforehand. dq, dk, dv in grad_dtype (bf16 or f32).
void backward(const __nv_bfloat16* q, const __nv_bfloat16* k, const __nv_bfloat16* v, const __nv_bfloat16* dout,
              const float* lse, const float* D, void* dq, void* dk, void* dv, DType grad_dtype, int B, int T, int Hq,
              int Hkv, float scale, cudaStream_t stream);

// --- Variants (for the benchmark; the model goes through forward()/backward()) ---
// base:   the original kernels: 4 warps x 16 rows, masking on every tile.
// lean64: same tiling, masking only on tiles that cross the diagonal, warps skip fully masked
//         tiles, fused scale+exp2 (ex2.approx), heavy blocks of every head launched first, and
//         (dk/dv) lse and D fetched by cp.async with their Q/dO tile.
// m128 / n128: as lean64 with 128 rows per block: m128 gives each warp 32 query rows (each K/V
//         fragment feeds two mma), n128 uses 8 warps x 16 keys (each Q/dO tile feeds 128 keys).
enum class FwdKernel { base, lean64, m128 };
enum class DqKernel { base, lean64, m128 };
enum class DkvKernel { base, lean64, n128 };
struct Kernels {
  FwdKernel fwd;
  DqKernel dq;
  DkvKernel dkv;
};
extern const Kernels kProduction;

const char* name(FwdKernel k);
const char* name(DqKernel k);
const char* name(DkvKernel k);

void forward_with(FwdKernel kernel, const __nv_bfloat16* q, const __nv_bfloat16* k, const __nv_bfloat16* v,
                  __nv_bfloat16* out, float* lse, int B, int T, int Hq, int Hkv, float scale, cudaStream_t stream);
void dq_with(DqKernel kernel, const __nv_bfloat16* q, const __nv_bfloat16* k, const __nv_bfloat16* v,
             const __nv_bfloat16* dout, const float* lse, const float* D, void* dq, DType grad_dtype, int B, int T,
             int Hq, int Hkv, float scale, cudaStream_t stream);
void dkv_with(DkvKernel kernel, const __nv_bfloat16* q, const __nv_bfloat16* k, const __nv_bfloat16* v,
              const __nv_bfloat16* dout, const float* lse, const float* D, void* dk, void* dv, DType grad_dtype, int B,
              int T, int Hq, int Hkv, float scale, cudaStream_t stream);
// D [B, Hq, T] = rowsum(dout * out) for [B, T, Hq, 64] bf16 tensors (what backward() expects).
void row_dot(const __nv_bfloat16* out, const __nv_bfloat16* dout, float* D, int B, int T, int Hq,
             cudaStream_t stream);

}  // namespace moelab::flash_lab
