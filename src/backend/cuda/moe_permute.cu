// MoE permute / unpermute as row gathers and scatters driven by the device plan: permute gathers
// token rows into expert order, combine gathers expert outputs back per token with the gates
// fused in. Each token (or permuted row) is handled by one warp, summing its k assignments in
// order j = 0..k-1, so backward passes need no atomics and stay deterministic. Rows that are
// 16-byte aligned multiples of 8 elements move 8 elements per lane access.
#include <algorithm>

#include "backend/cuda/cuda_common.cuh"
#include "backend/cuda/expert_amax.cuh"

namespace moelab {
using namespace cuda_detail;

namespace {

constexpr int kWarps = 8;

// W: elements per lane access, 8 where rows are 16-byte aligned multiples of 8 elements, else 1.
// With am.amax, each expert's amax of the rows written is raised too (the block combines its warps').
template <int W, class TX, class TP>
__global__ void permute_kernel(const TX* x, const int32_t* row_token, const int32_t* offsets, int E, TP* xp,
                               int64_t rows_alloc, int d, ExpertAmaxArgs am) {
  const int64_t r = blockIdx.x * int64_t(kWarps) + (threadIdx.x >> 5);
  const bool live = r < rows_alloc && r < offsets[E];
  float m = 0.f;
  if (live) {
    const int64_t t = row_token[r];
    for (int i = (threadIdx.x & 31) * W; i < d; i += 32 * W) {
      float v[W];
      load_w<W>(x + t * d + i, v);
      store_w<W>(xp + r * d + i, v);
      if (am.amax)
#pragma unroll
        for (int q = 0; q < W; ++q) m = fmaxf(m, fabsf(stored<TP>(v[q])));
    }
  }
  if (!am.amax) return;  // uniform over the grid
  m = warp_max(m);
  raise_rows_amax<kWarps>(am, live ? expert_of_row(r, offsets, E) : -1, m);
}

template <int W, class TP, class TX>
__global__ void permute_bwd_kernel(const TP* dxp, const int32_t* slot, int64_t T, int k, int d, TX* dx) {
  int64_t t = blockIdx.x * int64_t(kWarps) + (threadIdx.x >> 5);
  if (t >= T) return;
  for (int i = (threadIdx.x & 31) * W; i < d; i += 32 * W) {
    float acc[W];
    load_w<W>(dx + t * d + i, acc);
    for (int j = 0; j < k; ++j) {
      int s = slot[t * k + j];
      if (s < 0) continue;
      float v[W];
      load_w<W>(dxp + int64_t(s) * d + i, v);
#pragma unroll
      for (int q = 0; q < W; ++q) acc[q] += v[q];
    }
    store_w<W>(dx + t * d + i, acc);
  }
}

template <int W, class TP, class TY>
__global__ void combine_kernel(const TP* yp, const int32_t* slot, const float* gates, int64_t T, int k, int d,
                               TY* y, bool accumulate) {
  int64_t t = blockIdx.x * int64_t(kWarps) + (threadIdx.x >> 5);
  if (t >= T) return;
  for (int i = (threadIdx.x & 31) * W; i < d; i += 32 * W) {
    float acc[W];
    if (accumulate) load_w<W>(y + t * d + i, acc);
    else
#pragma unroll
      for (int q = 0; q < W; ++q) acc[q] = 0.f;
    for (int j = 0; j < k; ++j) {
      int s = slot[t * k + j];
      if (s < 0) continue;
      const float g = gates[t * k + j];
      float v[W];
      load_w<W>(yp + int64_t(s) * d + i, v);
#pragma unroll
      for (int q = 0; q < W; ++q) acc[q] += g * v[q];
    }
    store_w<W>(y + t * d + i, acc);
  }
}

// One warp per (t, j): writes dyp's row and reduces the gate gradient across the warp.
// With am.amax (offsets of E experts), each expert's amax of the dyp rows written is raised too.
// Neighbouring assignments go to different experts, so then the grid is a few blocks a SM whose
// warps stride over the assignments and gather their maxima in the block's shared array: one
// global atomic per block and expert, where a block per 8 assignments made the atomics on E
// addresses the kernel's bottleneck.
template <int W, class TD, class TP, class TO>
__global__ void combine_bwd_kernel(const TD* dy, const TP* yp, const int32_t* slot, const float* gates, int64_t T,
                                   int k, int d, TO* dyp, float* dgates, ExpertAmaxArgs am) {
  __shared__ unsigned block_amax[kSharedExperts];
  unsigned* shared = am.amax ? begin_block_amax(am, block_amax) : nullptr;  // uniform over the grid
  const int lane = threadIdx.x & 31;
  const int64_t n = T * k, stride = int64_t(gridDim.x) * kWarps;
  for (int64_t a = blockIdx.x * int64_t(kWarps) + (threadIdx.x >> 5); a < n; a += stride) {
    const int s = slot[a];
    if (s < 0) {
      if (lane == 0) dgates[a] = 0.f;
      continue;
    }
    const int64_t t = a / k;
    float g = gates[a], dot = 0.f, m = 0.f;
    for (int i = lane * W; i < d; i += 32 * W) {
      float dv[W], yv[W], out[W];
      load_w<W>(dy + t * d + i, dv);
      load_w<W>(yp + int64_t(s) * d + i, yv);
#pragma unroll
      for (int q = 0; q < W; ++q) {
        dot += dv[q] * yv[q];
        out[q] = g * dv[q];
        if (am.amax) m = fmaxf(m, fabsf(stored<TO>(out[q])));
      }
      store_w<W>(dyp + int64_t(s) * d + i, out);
    }
    dot = warp_sum(dot);
    if (lane == 0) dgates[a] = dot;
    if (am.amax) {
      m = warp_max(m);
      const int e = expert_of_row(s, am.offsets, am.E);
      if (lane == 0 && e >= 0) raise_amax(shared ? shared + e : am.amax + e, m);
    }
  }
  flush_block_amax(am, shared);
}

// 8 when every row pointer is 16-byte aligned and rows are multiples of 8 elements.
int row_width(int64_t d, std::initializer_list<const void*> ptrs) {
  if (d % 8 != 0) return 1;
  for (const void* p : ptrs)
    if (!aligned16(p)) return 1;
  return 8;
}

#define MOELAB_WIDTH_DISPATCH(w, W, ...) \
  do {                                   \
    if ((w) == 8) {                      \
      constexpr int W = 8;               \
      __VA_ARGS__;                       \
    } else {                             \
      constexpr int W = 1;               \
      __VA_ARGS__;                       \
    }                                    \
  } while (0)

unsigned warps_grid(int64_t n) { return unsigned((n + kWarps - 1) / kWarps); }

}  // namespace

void CudaBackend::moe_permute(const Tensor& x, const Tensor& row_token, const Tensor& offsets, Tensor& xp,
                              const AmaxSink* amax) {
  require_float(x, "moe_permute", "x");
  require_float(xp, "moe_permute", "xp");
  require_dtype(row_token, DType::i32, "moe_permute", "row_token");
  require_dtype(offsets, DType::i32, "moe_permute", "offsets");
  require(x.cols() == xp.cols() && row_token.numel() >= xp.rows(), "moe_permute",
          "xp must be [R, D] with R <= row_token's length");
  int64_t R = xp.rows();
  int E = int(offsets.numel()) - 1;
  if (R == 0) return;
  const int w = row_width(x.cols(), {x.data, xp.data});
  ExpertAmaxArgs am;
  if (amax) {
    am = expert_amax_args(*amax, xp, true, "moe_permute");
    require(amax->offsets.data == offsets.data, "moe_permute", "amax.offsets must be the permute's offsets");
  }
  MOELAB_FLOAT_DISPATCH(x.dtype, TX, MOELAB_FLOAT_DISPATCH(xp.dtype, TP, MOELAB_WIDTH_DISPATCH(w, W,
      permute_kernel<W, TX, TP><<<warps_grid(R), 32 * kWarps, 0, stream_>>>(
          x.as<TX>(), row_token.as<int32_t>(), offsets.as<int32_t>(), E, xp.as<TP>(), R, int(x.cols()), am))));
  MOELAB_CUDA_LAUNCH_CHECK("moe_permute");
}

void CudaBackend::moe_permute_bwd(const Tensor& dxp, const Tensor& slot, Tensor& dx) {
  require_float(dxp, "moe_permute_bwd", "dxp");
  require_float(dx, "moe_permute_bwd", "dx");
  require_dtype(slot, DType::i32, "moe_permute_bwd", "slot");
  int64_t T = dx.rows();
  require(T > 0 ? slot.numel() % T == 0 : true, "moe_permute_bwd", "slot must be [T*k]");
  if (T == 0) return;
  int k = int(slot.numel() / T);
  const int w = row_width(dx.cols(), {dxp.data, dx.data});
  MOELAB_FLOAT_DISPATCH(dxp.dtype, TP, MOELAB_FLOAT_DISPATCH(dx.dtype, TX, MOELAB_WIDTH_DISPATCH(w, W,
      permute_bwd_kernel<W, TP, TX><<<warps_grid(T), 32 * kWarps, 0, stream_>>>(
          dxp.as<TP>(), slot.as<int32_t>(), T, k, int(dx.cols()), dx.as<TX>()))));
  MOELAB_CUDA_LAUNCH_CHECK("moe_permute_bwd");
}

void CudaBackend::moe_combine(const Tensor& yp, const Tensor& slot, const Tensor& gates, Tensor& y, bool accumulate) {
  require_float(yp, "moe_combine", "yp");
  require_float(y, "moe_combine", "y");
  require_dtype(slot, DType::i32, "moe_combine", "slot");
  require_dtype(gates, DType::f32, "moe_combine", "gates");
  int64_t T = y.rows();
  if (T == 0) return;
  require(slot.numel() % T == 0 && gates.numel() == slot.numel(), "moe_combine", "slot and gates must be [T, k]");
  int k = int(slot.numel() / T);
  const int w = row_width(y.cols(), {yp.data, y.data});
  MOELAB_FLOAT_DISPATCH(yp.dtype, TP, MOELAB_FLOAT_DISPATCH(y.dtype, TY, MOELAB_WIDTH_DISPATCH(w, W,
      combine_kernel<W, TP, TY><<<warps_grid(T), 32 * kWarps, 0, stream_>>>(
          yp.as<TP>(), slot.as<int32_t>(), gates.as<float>(), T, k, int(y.cols()), y.as<TY>(), accumulate))));
  MOELAB_CUDA_LAUNCH_CHECK("moe_combine");
}

void CudaBackend::moe_combine_bwd(const Tensor& dy, const Tensor& yp, const Tensor& slot, const Tensor& gates,
                                  Tensor& dyp, Tensor& dgates, const AmaxSink* amax) {
  require_float(dy, "moe_combine_bwd", "dy");
  require_float(yp, "moe_combine_bwd", "yp");
  require_float(dyp, "moe_combine_bwd", "dyp");
  require_dtype(slot, DType::i32, "moe_combine_bwd", "slot");
  require_dtype(gates, DType::f32, "moe_combine_bwd", "gates");
  require_dtype(dgates, DType::f32, "moe_combine_bwd", "dgates");
  int64_t T = dy.rows();
  if (T == 0) return;
  require(slot.numel() % T == 0 && gates.numel() == slot.numel() && dgates.numel() == slot.numel(),
          "moe_combine_bwd", "slot, gates and dgates must be [T, k]");
  int k = int(slot.numel() / T);
  require(yp.dtype == dy.dtype, "moe_combine_bwd", "yp and dy must share one dtype");
  const int w = row_width(dy.cols(), {dy.data, yp.data, dyp.data});
  const ExpertAmaxArgs am = amax ? expert_amax_args(*amax, dyp, true, "moe_combine_bwd") : ExpertAmaxArgs{};
  // With an amax, four blocks a SM stride over the assignments (see the kernel); else one pass.
  const unsigned blocks = amax ? std::min(warps_grid(T * k), unsigned(4 * sm_count_)) : warps_grid(T * k);
  MOELAB_FLOAT_DISPATCH(dy.dtype, TD, MOELAB_FLOAT_DISPATCH(dyp.dtype, TO, MOELAB_WIDTH_DISPATCH(w, W,
      combine_bwd_kernel<W, TD, TD, TO><<<blocks, 32 * kWarps, 0, stream_>>>(
          dy.as<TD>(), reinterpret_cast<const TD*>(yp.data), slot.as<int32_t>(), gates.as<float>(), T, k,
          int(dy.cols()), dyp.as<TO>(), dgates.as<float>(), am))));
  MOELAB_CUDA_LAUNCH_CHECK("moe_combine_bwd");
}

}  // namespace moelab
