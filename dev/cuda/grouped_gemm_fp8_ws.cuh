// Kernel lab: a warp-specialized FP8 grouped GEMM (forward and data gradient, tensor and row
// scaling), the candidate to replace the engine's fp8_grouped_fwd_kernel
// (src/backend/cuda/grouped_gemm_fp8.cu). The engine's kernel is latency-bound (Nsight Compute:
// 26% SM, 52% L2 throughput, 60% of cycles on scoreboard waits): one thread of the consumer
// warpgroups issues each stage's loads after a block-wide barrier, so the copies run at most
// about two stages ahead. Here a producer warpgroup issues the loads as soon as the consumers
// release a stage (per-stage "empty" mbarriers, no block barrier in the main loop), and the tiles
// are 128 x 256 (a third less L2 traffic per product than 128 x 128): two consumer warpgroups
// of 64 rows x 256 columns each, wgmma m64n256k32, four stages of 48 KB, one block per SM,
// persistent over the output tiles so the producer loads the next tile during the epilogue.
// Same operands, scales and output as grouped_gemm::forward_fp8 (modes tensor and row).
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

#include "backend/cuda/grouped_gemm_fp8.cuh"
#include "core/dtype.hpp"

namespace moelab::grouped_gemm_lab {

// C[rows of e] = deq(A[rows of e]) deq(W[e])^T, as grouped_gemm::forward_fp8 (scales.mode tensor or row).
void forward_fp8_ws(const uint8_t* A, DType a_format, const uint8_t* W, const grouped_gemm::Fp8GroupedScales& scales,
                    void* C, DType c_dtype, const int32_t* offsets, int E, int64_t R, int N, int K, int sms,
                    cudaStream_t stream);

}  // namespace moelab::grouped_gemm_lab
