// Raw launchers of the grouped BF16 GEMM kernels (grouped_gemm.cu, grouped_gemm_sm90.cu), shared
// by the backend ops and the kernel lab's benchmark (dev/cuda) so both time exactly the same code.
#pragma once
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "core/dtype.hpp"

namespace moelab::grouped_gemm {

// Output tile width of the TMA kernels: 256 (one block per SM) or 128 (two per SM); the
// weight-gradient kernel also has 192 (one per SM).
constexpr int kDefaultTileN = 256;

// C[rows of e] = A[rows of e] @ op(W[e]): W is [E, N, K] when w_kmajor else [E, K, N]. A [R, K],
// C [R, N] (bf16 or f32). Rows past offsets[E] are not touched. mma.sync (sm_80-style) kernel,
// the reference the benchmarks check the Hopper kernels against (the engine runs those).
void forward(const __nv_bfloat16* A, const __nv_bfloat16* W, bool w_kmajor, void* C, DType c_dtype,
             const int32_t* offsets, int E, int64_t R, int N, int K, cudaStream_t stream);
// The same product on Hopper tensor cores (wgmma fed by TMA) as a persistent kernel (blocks loop
// over all tiles, loading the next tile while storing the current one); `sms` is the GPU's
// multiprocessor count. W is [E, N, K] (K-major), or [E, K, N] when w_mn_major (read MN-major in
// place; K must be a multiple of 64). With beta != 0 the stored value is alpha A op(W) + beta
// addend (addend [R, N] of C's dtype, may be C), rounded once.
// The expert MLP's ReLU² in the persistent kernel's store (bf16 C, alpha 1, beta 0), one at a
// time: out [R, N] also receives relu²(C) (the up projection's forward); in [R, N] (h) makes the
// stored C relu2_bwd(h, C) (the down projection's data gradient). Rounded as relu2_fwd / relu2_bwd.
struct Relu2Epilogue {
  __nv_bfloat16* out = nullptr;
  const __nv_bfloat16* in = nullptr;
};
enum Relu2EpiMode : int { kRelu2None, kRelu2Output, kRelu2Backward };
void forward_sm90_tma_persistent(const __nv_bfloat16* A, const __nv_bfloat16* W, bool w_mn_major, void* C, DType c_dtype,
                                 const int32_t* offsets, int E, int64_t R, int N, int K, int sms, cudaStream_t stream,
                                 int tile_n = kDefaultTileN, float alpha = 1.0f, float beta = 0.0f,
                                 const void* addend = nullptr, const Relu2Epilogue& relu2 = {});
// dW[e] = beta addend[e] + dY_e^T X_e on wgmma with TMA loads (dY [R, N], X [R, K]); addend is
// dW itself when null.
void wgrad_sm90_tma(const __nv_bfloat16* dY, const __nv_bfloat16* X, void* dW, DType dw_dtype,
                    const int32_t* offsets, int E, int64_t R, int N, int K, float beta, cudaStream_t stream,
                    int tile_n = kDefaultTileN, const void* addend = nullptr);
// The weight-gradient tile width (256, 192 or 128) that wastes the least of the last wave on
// `sms` multiprocessors for dW [E, N, K].
int wgrad_tile_n(int E, int N, int K, int sms);
// Wt[e] = W[e]^T: W [E, R, S] -> Wt [E, S, R] (turns an N-major expert weight K-major, for the
// shapes the MN-major read does not take).
void transpose_experts(const __nv_bfloat16* W, __nv_bfloat16* Wt, int E, int R, int S, cudaStream_t stream);
// dW[e] = beta dW[e] + dY_e^T X_e; dY [R, N], X [R, K], dW [E, N, K] (f32 or bf16).
void wgrad(const __nv_bfloat16* dY, const __nv_bfloat16* X, void* dW, DType dw_dtype, const int32_t* offsets,
           int E, int N, int K, float beta, cudaStream_t stream);

}  // namespace moelab::grouped_gemm
