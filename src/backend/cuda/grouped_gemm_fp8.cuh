// Raw launchers of the FP8 grouped GEMM kernels (grouped_gemm_fp8.cu), shared by the backend's
// grouped_matmul_fp8 / grouped_matmul_wgrad_fp8 and the kernel benchmark, so both time the same
// code. Operands are FP8 codes, K-major, already quantized with the recipe's scales; the
// kernels read the expert offsets on the device and apply the scales in their epilogue
// (tensor, row) or per 128-long k-block as they accumulate (block).
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

#include "core/dtype.hpp"

namespace moelab::grouped_gemm {

// How the operands' dequantization scales are laid out (per expert e of E; N output columns):
//   tensor  a[e],                 w[e]
//   row     a[row],               w[e * N + n]
//   block   a[kb * R + row] (1x128 tiles), w[(e * ceil(N / 128) + n / 128) * w_kb_stride + kb]
//           (128x128 blocks: the per-expert 128x128 layout of backend.hpp stacked over experts)
enum class Fp8ScaleMode : int { tensor, row, block };

struct Fp8GroupedScales {
  Fp8ScaleMode mode = Fp8ScaleMode::tensor;
  const float* a = nullptr;  // token-side operand
  const float* w = nullptr;  // expert weights
  int w_kb_stride = 0;       // block mode: row stride of w's 128x128 scales
};

// What forward_fp8's epilogue does beside storing a bf16 C (the expert MLP's ReLU² folded in;
// amax values are f32 bits, raised per expert e over the rows of e):
//   relu2_amax    raise amax[e] to the max of relu²(C) as relu2_fwd stores it (the up projection);
//   relu2_input   store relu2_bwd(H, C) in place of C, H [R, N] bf16 (the down projection's data
//                 gradient: C is da, the stored value dh); with out_amax, raise it to max |dh|.
struct Fp8Epilogue {
  unsigned* relu2_amax = nullptr;
  const void* relu2_input = nullptr;
  unsigned* out_amax = nullptr;
};

// C[rows of e] = deq(A[rows of e]) deq(W[e])^T: A [R, K] codes (e4m3 or e5m2: a_format),
// W [E, N, K] e4m3 codes, C [R, N] bf16 or f32 (bf16 with an epilogue). Persistent wgmma kernel
// on `sms` multiprocessors. K a multiple of 16; N a multiple of 128 in block mode.
void forward_fp8(const uint8_t* A, DType a_format, const uint8_t* W, const Fp8GroupedScales& scales, void* C,
                 DType c_dtype, const int32_t* offsets, int E, int64_t R, int N, int K, int sms, cudaStream_t stream,
                 const Fp8Epilogue& epilogue = {});

// Expert row segments padded to whole 128-row blocks, for the weight gradient's transposed
// operands: padded[e] = sum over experts before e of ceil(count / 128) * 128 (E + 1 entries),
// computed on the device from offsets. padded_rows_bound is what the padded segments can need.
void padded_offsets(const int32_t* offsets, int E, int32_t* padded, cudaStream_t stream);
inline int64_t padded_rows_bound(int64_t R, int E) { return (R + 127 * int64_t(E) + 127) / 128 * 128; }

// dW[e] (N x K, f32 or bf16) += deq(dYt_e) deq(Xt_e)^T where dYt [N, Rp] (dy_format) and Xt [K, Rp]
// (e4m3) hold each expert's tokens transposed in its padded segment [padded[e], padded[e+1])
// (zeros past the expert's tokens). Scales, per expert e, padded 128-token block pb:
//   tensor  a[e], w[e]    row  a[e * N + n], w[e * K + k]    block  a[pb * N + n], w[pb * K + k]
// (here `a` scales dYt and `w` scales Xt). Experts without tokens leave dW[e] unchanged.
void wgrad_fp8(const uint8_t* dYt, DType dy_format, const uint8_t* Xt, const Fp8GroupedScales& scales, void* dW,
               DType dw_dtype, const int32_t* padded, int E, int64_t Rp, int N, int K, cudaStream_t stream);

// The straight copy that quantize_segments_transposed can write in the same pass (the data
// gradient's operand, which forward_fp8 reads): out [R, C] codes of each expert's tokens (rows past
// the last expert are not written), scales as forward_fp8 lists them for a token-side operand:
// row scale[row], block scale[kb * R + row]; tensor scaling shares the transposed copy's per-expert
// scales, so scale is unused. row_amax is set by the launcher.
struct StraightCopy {
  uint8_t* out = nullptr;
  float* scale = nullptr;
  int64_t R = 0;
  const unsigned* row_amax = nullptr;
};

// Quantizes x [R, C] (bf16) expert segment by expert segment into the transposed, padded layout
// that wgrad_fp8 reads: out [C, Rp] codes of `format`, scales as wgrad_fp8 lists them for `mode`
// (tensor and row scales over each expert's own tokens, 1x128 tiles along them); with
// straight.out, also the straight copy from the same read of x. amax is device scratch of at
// least E * C unsigned values (E * C + R with a row-scaled straight copy); with amax_known
// (tensor scaling only) it already holds each expert's amax as f32 bits and the pre-pass is skipped.
// relu2_of_x (e4m3 with the straight copy: the down projection's operand) quantizes relu²(x)
// as relu2_fwd would store it, in place of x; a known amax is then relu²(x)'s.
void quantize_segments_transposed(const void* x, int C, const int32_t* offsets, const int32_t* padded,
                                  int E, int64_t Rp, Fp8ScaleMode mode, DType format, uint8_t* out, float* scale,
                                  unsigned* amax, cudaStream_t stream, StraightCopy straight = {},
                                  bool amax_known = false, bool relu2_of_x = false);

}  // namespace moelab::grouped_gemm
