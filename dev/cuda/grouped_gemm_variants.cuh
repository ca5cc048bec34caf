// Kernel lab: launchers of the grouped-GEMM forward variants (grouped_gemm_variants.cu), same
// arguments as the engine's grouped_gemm::forward_sm90_tma_persistent without alpha/beta.
#pragma once
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "backend/cuda/grouped_gemm.cuh"
#include "core/dtype.hpp"

namespace moelab::grouped_gemm_lab {

// v2: wgmma from shared memory, tiles by cp.async (128 x 256 tiles, 3 stages).
void forward_sm90(const __nv_bfloat16* A, const __nv_bfloat16* W, void* C, DType c_dtype, const int32_t* offsets,
                  int E, int64_t R, int N, int K, cudaStream_t stream);
// v3: the same with the tiles brought in by the tensor-memory accelerator (TMA) and mbarriers.
void forward_sm90_tma(const __nv_bfloat16* A, const __nv_bfloat16* W, void* C, DType c_dtype, const int32_t* offsets,
                      int E, int64_t R, int N, int K, cudaStream_t stream,
                      int tile_n = grouped_gemm::kDefaultTileN);

}  // namespace moelab::grouped_gemm_lab
