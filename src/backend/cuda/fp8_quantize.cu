// quantize_fp8 on the GPU: amax, scales and FP8 data computed on the device (no host sync, so it
// is captured in the step's graph), bit for bit the rule of backend.hpp that the CPU emulates.
//
// Straight copies with tensor, row or 1x128 groups (activations in the forward, gradients in the
// data gradient) take a register-only kernel, one warp per row. Everything else (transposed
// copies, 128x128 weight blocks) takes a tile kernel that serves every granularity and both
// orientations: a block stages a
// 128 x 128 tile of x in shared memory as f32, takes the amax its groups need (per tile row, per
// tile column or the whole tile: 1x128 and 128x128 groups are tile-aligned), then writes FP8
// codes four to a 32-bit store, straight or transposed (the transposed copy that a weight or
// data gradient needs costs no extra pass). Groups that span tiles (a whole tensor, a whole row
// or column) get their amax from a pre-pass that max-reduces into a device scratch with
// atomicMax on the float bits (exact and order-independent, so the result is deterministic).
#include <cuda_fp8.h>

#include <cfloat>
#include <type_traits>

#include "backend/cuda/cuda_common.cuh"

namespace moelab {

using namespace cuda_detail;

namespace {

constexpr int kTile = 128;
constexpr int kThreads = 256;

// What the tile kernel reads the amax of a group from.
enum class AmaxSource : int { global, per_row, per_col, tile_row, tile_col, tile };

__device__ __forceinline__ float multiplier_of(float amax, float fmax) {
  const float a = fminf(fmaxf(amax, kFp8MinAmax), FLT_MAX);
  return __fdiv_rn(fmax, a);
}

template <class T>
__global__ void amax_all_kernel(const T* __restrict__ x, int64_t n, unsigned* __restrict__ out) {
  __shared__ float shm[32];
  float m = 0.0f;
  const int64_t n8 = n / 8;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n8; i += int64_t(gridDim.x) * blockDim.x) {
    float v[8];
    load8(x + 8 * i, v);
#pragma unroll
    for (int j = 0; j < 8; ++j) m = fmaxf(m, fabsf(v[j]));
  }
  for (int64_t i = 8 * n8 + blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x)
    m = fmaxf(m, fabsf(to_f32(x[i])));
  m = block_max(m, shm);
  if (threadIdx.x == 0) atomicMax(out, __float_as_uint(m));
}

// One warp per row of x [rows, cols] (cols a multiple of 8).
template <class T>
__global__ void amax_rows_kernel(const T* __restrict__ x, int64_t rows, int64_t cols, unsigned* __restrict__ out) {
  const int64_t r = blockIdx.x * int64_t(blockDim.x / 32) + threadIdx.x / 32;
  const int lane = threadIdx.x & 31;
  if (r >= rows) return;
  float m = 0.0f;
  for (int64_t c = 8 * lane; c < cols; c += 256) {
    float v[8];
    load8(x + r * cols + c, v);
#pragma unroll
    for (int j = 0; j < 8; ++j) m = fmaxf(m, fabsf(v[j]));
  }
  m = warp_max(m);
  if (lane == 0) out[r] = __float_as_uint(m);
}

// Column amax of x [rows, cols]: thread per column over a 256-row strip, then atomicMax.
template <class T>
__global__ void amax_cols_kernel(const T* __restrict__ x, int64_t rows, int64_t cols, unsigned* __restrict__ out) {
  const int64_t c = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (c >= cols) return;
  const int64_t r0 = int64_t(blockIdx.y) * 256, r1 = min(rows, r0 + 256);
  float m = 0.0f;
  for (int64_t r = r0; r < r1; ++r) m = fmaxf(m, fabsf(to_f32(x[r * cols + c])));
  atomicMax(out + c, __float_as_uint(m));
}

template <int kFormat>
__device__ __forceinline__ uint32_t encode4(float a, float b, float c, float d) {
  const auto fmt = kFormat == 0 ? __NV_E4M3 : __NV_E5M2;
  const uint32_t q0 = __nv_cvt_float_to_fp8(a, __NV_SATFINITE, fmt);
  const uint32_t q1 = __nv_cvt_float_to_fp8(b, __NV_SATFINITE, fmt);
  const uint32_t q2 = __nv_cvt_float_to_fp8(c, __NV_SATFINITE, fmt);
  const uint32_t q3 = __nv_cvt_float_to_fp8(d, __NV_SATFINITE, fmt);
  return q0 | (q1 << 8) | (q2 << 16) | (q3 << 24);
}

// Straight (not transposed) quantization with tensor, row or 1x128 groups, from registers: one
// warp per row, each lane eight consecutive elements (16-byte loads, 8-byte stores). 1x128
// groups are half-warps (shuffle amax); a row group takes its amax in a first pass over the row
// (the second pass reads it back from L2); a tensor group uses the pre-pass amax.
template <class T, int kFormat>
__global__ void __launch_bounds__(256) quantize_rows_kernel(const T* __restrict__ x, int64_t rows, int64_t cols, int granularity,
                                                            const unsigned* __restrict__ amax_all, uint8_t* __restrict__ out,
                                                            float* __restrict__ scale, float fmax) {
  const int64_t r = blockIdx.x * int64_t(blockDim.x / 32) + threadIdx.x / 32;
  const int lane = threadIdx.x & 31;
  if (r >= rows) return;
  const auto g = Fp8Granularity(granularity);
  const T* row = x + r * cols;
  uint8_t* orow = out + r * cols;
  float mult = 0.0f;
  if (g == Fp8Granularity::tensor) {
    mult = multiplier_of(__uint_as_float(amax_all[0]), fmax);
    if (r == 0 && lane == 0) scale[0] = __fdiv_rn(1.0f, mult);
  } else if (g == Fp8Granularity::row) {
    float m = 0.0f;
    for (int64_t c = 8 * lane; c < cols; c += 256) {
      float v[8];
      load8(row + c, v);
#pragma unroll
      for (int j = 0; j < 8; ++j) m = fmaxf(m, fabsf(v[j]));
    }
    mult = multiplier_of(warp_max(m), fmax);
    if (lane == 0) scale[r] = __fdiv_rn(1.0f, mult);
  }
  for (int64_t c0 = 0; c0 < cols; c0 += 256) {
    const int64_t c = c0 + 8 * lane;
    const bool in = c < cols;
    float v[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    if (in) load8(row + c, v);
    if (g == Fp8Granularity::block_1x128) {
      float m = 0.0f;
#pragma unroll
      for (int j = 0; j < 8; ++j) m = fmaxf(m, fabsf(v[j]));
#pragma unroll
      for (int o = 8; o > 0; o >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, o));  // within 16 lanes
      mult = multiplier_of(m, fmax);
      if (in && (lane & 15) == 0) scale[(c / 128) * rows + r] = __fdiv_rn(1.0f, mult);
    }
    if (in) {
      uint2 q;
      q.x = encode4<kFormat>(__fmul_rn(v[0], mult), __fmul_rn(v[1], mult), __fmul_rn(v[2], mult), __fmul_rn(v[3], mult));
      q.y = encode4<kFormat>(__fmul_rn(v[4], mult), __fmul_rn(v[5], mult), __fmul_rn(v[6], mult), __fmul_rn(v[7], mult));
      *reinterpret_cast<uint2*>(orow + c) = q;
    }
  }
}

struct TileArgs {
  int64_t xr, xc;            // x is [xr, xc]
  bool transpose;            // output [xc, xr] instead of [xr, xc]
  AmaxSource source;
  int granularity;           // Fp8Granularity, for where scales go
  const unsigned* amax_in;   // global / per_row / per_col amax bits (pre-pass)
  uint8_t* out;
  float* scale;
  float fmax;
};

// grid (ceil(xc / 128), ceil(xr / 128)), 256 threads. xc and xr multiples of 16.
template <class T, int kFormat>
__global__ void __launch_bounds__(kThreads) quantize_tile_kernel(const T* __restrict__ x, TileArgs a) {
  extern __shared__ float tile_smem[];  // [kTile][kTile + 1] f32 (66 KB: dynamic shared memory)
  auto tile = [&](int r, int c) -> float& { return tile_smem[r * (kTile + 1) + c]; };
  __shared__ float mult_row[kTile], mult_col[kTile];
  __shared__ float shm[32];
  const int64_t r0 = int64_t(blockIdx.y) * kTile, c0 = int64_t(blockIdx.x) * kTile;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;

  // Stage the tile as f32 (zeros outside x): 16 vectors of 8 per tile row.
  for (int i = tid; i < kTile * (kTile / 8); i += kThreads) {
    const int r = i / (kTile / 8), c = (i % (kTile / 8)) * 8;
    float v[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    if (r0 + r < a.xr && c0 + c < a.xc) load8(x + (r0 + r) * a.xc + c0 + c, v);
#pragma unroll
    for (int j = 0; j < 8; ++j) tile(r, c + j) = v[j];
  }
  __syncthreads();

  // Multipliers per tile row and per tile column (one value for all when the group is wider).
  switch (a.source) {
    case AmaxSource::global: {
      const float m = multiplier_of(__uint_as_float(a.amax_in[0]), a.fmax);
      for (int i = tid; i < kTile; i += kThreads) mult_row[i] = mult_col[i] = m;
    } break;
    case AmaxSource::per_row:
      for (int i = tid; i < kTile; i += kThreads)
        mult_row[i] = r0 + i < a.xr ? multiplier_of(__uint_as_float(a.amax_in[r0 + i]), a.fmax) : 1.0f;
      break;
    case AmaxSource::per_col:
      for (int i = tid; i < kTile; i += kThreads)
        mult_col[i] = c0 + i < a.xc ? multiplier_of(__uint_as_float(a.amax_in[c0 + i]), a.fmax) : 1.0f;
      break;
    case AmaxSource::tile_row:
      for (int r = warp; r < kTile; r += kThreads / 32) {
        float m = 0.0f;
#pragma unroll
        for (int j = 0; j < 4; ++j) m = fmaxf(m, fabsf(tile(r, lane + 32 * j)));
        m = warp_max(m);
        if (lane == 0) mult_row[r] = multiplier_of(m, a.fmax);
      }
      break;
    case AmaxSource::tile_col:
      for (int c = warp; c < kTile; c += kThreads / 32) {
        float m = 0.0f;
#pragma unroll
        for (int j = 0; j < 4; ++j) m = fmaxf(m, fabsf(tile(lane + 32 * j, c)));
        m = warp_max(m);
        if (lane == 0) mult_col[c] = multiplier_of(m, a.fmax);
      }
      break;
    case AmaxSource::tile: {
      float m = 0.0f;
      for (int i = tid; i < kTile * kTile; i += kThreads) m = fmaxf(m, fabsf(tile(i / kTile, i % kTile)));
      m = block_max(m, shm);
      if (tid == 0) mult_row[0] = multiplier_of(m, a.fmax);
      __syncthreads();
      const float mm = mult_row[0];
      __syncthreads();
      for (int i = tid; i < kTile; i += kThreads) mult_row[i] = mult_col[i] = mm;
    } break;
  }
  __syncthreads();
  const bool by_row = a.source == AmaxSource::per_row || a.source == AmaxSource::tile_row;
  auto mult_at = [&](int r, int c) { return by_row ? mult_row[r] : mult_col[c]; };

  // Codes: each warp writes output rows, each lane four consecutive codes.
  const int64_t out_cols = a.transpose ? a.xr : a.xc;
  if (!a.transpose) {
    for (int r = warp; r < kTile; r += kThreads / 32) {
      const int c = 4 * lane;
      if (r0 + r >= a.xr || c0 + c >= a.xc) continue;
      const uint32_t q = encode4<kFormat>(__fmul_rn(tile(r, c), mult_at(r, c)), __fmul_rn(tile(r, c + 1), mult_at(r, c + 1)),
                                          __fmul_rn(tile(r, c + 2), mult_at(r, c + 2)), __fmul_rn(tile(r, c + 3), mult_at(r, c + 3)));
      *reinterpret_cast<uint32_t*>(a.out + (r0 + r) * out_cols + c0 + c) = q;
    }
  } else {
    for (int c = warp; c < kTile; c += kThreads / 32) {
      const int r = 4 * lane;
      if (c0 + c >= a.xc || r0 + r >= a.xr) continue;
      const uint32_t q = encode4<kFormat>(__fmul_rn(tile(r, c), mult_at(r, c)), __fmul_rn(tile(r + 1, c), mult_at(r + 1, c)),
                                          __fmul_rn(tile(r + 2, c), mult_at(r + 2, c)), __fmul_rn(tile(r + 3, c), mult_at(r + 3, c)));
      *reinterpret_cast<uint32_t*>(a.out + (c0 + c) * out_cols + r0 + r) = q;
    }
  }

  // Scales (1 / multiplier), each written by exactly one block.
  const auto g = Fp8Granularity(a.granularity);
  const int64_t out_rows = a.transpose ? a.xc : a.xr;
  if (g == Fp8Granularity::tensor) {
    if (blockIdx.x == 0 && blockIdx.y == 0 && tid == 0) a.scale[0] = __fdiv_rn(1.0f, mult_row[0]);
  } else if (g == Fp8Granularity::row) {
    // Output rows are x's rows (straight) or columns (transposed); the first tile across writes.
    if (!a.transpose && blockIdx.x == 0)
      for (int i = tid; i < kTile && r0 + i < a.xr; i += kThreads) a.scale[r0 + i] = __fdiv_rn(1.0f, mult_row[i]);
    if (a.transpose && blockIdx.y == 0)
      for (int i = tid; i < kTile && c0 + i < a.xc; i += kThreads) a.scale[c0 + i] = __fdiv_rn(1.0f, mult_col[i]);
  } else if (g == Fp8Granularity::block_1x128) {
    // scale[kb, out_row]: kb is the tile index along the output's K.
    if (!a.transpose)
      for (int i = tid; i < kTile && r0 + i < a.xr; i += kThreads) a.scale[blockIdx.x * out_rows + r0 + i] = __fdiv_rn(1.0f, mult_row[i]);
    else
      for (int i = tid; i < kTile && c0 + i < a.xc; i += kThreads) a.scale[blockIdx.y * out_rows + c0 + i] = __fdiv_rn(1.0f, mult_col[i]);
  } else if (tid == 0) {  // 128x128: scale[row block, k block] of the output, row stride padded to 4
    const int64_t kblocks = (out_cols + kTile - 1) / kTile, stride = (kblocks + 3) / 4 * 4;
    const int64_t rb = a.transpose ? blockIdx.x : blockIdx.y, kb = a.transpose ? blockIdx.y : blockIdx.x;
    a.scale[rb * stride + kb] = __fdiv_rn(1.0f, mult_row[0]);
    if (kb == kblocks - 1)
      for (int64_t p = kblocks; p < stride; ++p) a.scale[rb * stride + p] = 1.0f;  // padding: no group
  }
}

}  // namespace

void CudaBackend::quantize_fp8(const Tensor& x, bool transpose, QuantizedOperand& out) {
  const std::string op = "quantize_fp8";
  require_float(x, op, "x");
  require_cuda(out.data, op, "out.data");
  require(out.data.dtype == DType::e4m3 || out.data.dtype == DType::e5m2, op,
          "out.data must be e4m3 or e5m2, got " + out.data.describe());
  require_dtype(out.scale, DType::f32, op, "out.scale");
  const int64_t xc = x.cols(), xr = xc ? x.numel() / xc : 0;
  const int64_t rows = transpose ? xc : xr, K = transpose ? xr : xc;
  require(out.data.ndim() == 2 && out.data.dim(0) == rows && out.data.dim(1) == K, op,
          "out.data is " + out.data.describe() + " but x" + (transpose ? "^T" : "") + " of " + x.describe() +
              " is [" + std::to_string(rows) + ", " + std::to_string(K) + "]");
  require(out.scale.shape == fp8_scale_shape(out.granularity, rows, K), op,
          "out.scale is " + out.scale.describe() + " but " + fp8_granularity_name(out.granularity) +
              " scaling of [" + std::to_string(rows) + ", " + std::to_string(K) + "] needs " +
              shape_str(fp8_scale_shape(out.granularity, rows, K)));
  require(xr % 16 == 0 && xc % 16 == 0 && aligned16(x.data) && aligned16(out.data.data), op,
          "FP8 operands on the GPU need both dimensions a multiple of 16 and 16-byte aligned data, got " +
              x.describe());
  if (xr == 0 || xc == 0) return;

  TileArgs a{};
  a.xr = xr;
  a.xc = xc;
  a.transpose = transpose;
  a.granularity = int(out.granularity);
  a.out = out.data.as<uint8_t>();
  a.scale = out.scale.as<float>();
  a.fmax = fp8_max(out.data.dtype);
  unsigned* amax = nullptr;
  const bool per_col = transpose;  // output rows are x's columns
  switch (out.granularity) {
    case Fp8Granularity::tensor: a.source = AmaxSource::global; break;
    case Fp8Granularity::row: a.source = per_col ? AmaxSource::per_col : AmaxSource::per_row; break;
    case Fp8Granularity::block_1x128: a.source = per_col ? AmaxSource::tile_col : AmaxSource::tile_row; break;
    case Fp8Granularity::block_128x128: a.source = AmaxSource::tile; break;
  }
  MOELAB_FLOAT_DISPATCH(x.dtype, T, {
    const T* px = x.as<T>();
    const bool straight = !transpose && out.granularity != Fp8Granularity::block_128x128;  // rows kernel below
    if (straight) {
      // the rows kernel takes its own amax (tensor: pre-pass there)
    } else if (a.source == AmaxSource::global || a.source == AmaxSource::per_col) {
      const int64_t n = a.source == AmaxSource::global ? 1 : xc;
      amax = static_cast<unsigned*>(scratch(ScratchSlot::fp8_amax, size_t(n) * sizeof(unsigned)));
      MOELAB_CUDA_CHECK(cudaMemsetAsync(amax, 0, size_t(n) * sizeof(unsigned), stream_));
      if (a.source == AmaxSource::global)
        amax_all_kernel<T><<<unsigned(std::min<int64_t>(2 * sm_count_, (x.numel() / 8 + 255) / 256 + 1)), 256, 0, stream_>>>(px, x.numel(), amax);
      else
        amax_cols_kernel<T><<<dim3(unsigned((xc + 255) / 256), unsigned((xr + 255) / 256)), 256, 0, stream_>>>(px, xr, xc, amax);
      MOELAB_CUDA_LAUNCH_CHECK("fp8 amax");
    } else if (a.source == AmaxSource::per_row) {  // (straight rows take the rows kernel)
      amax = static_cast<unsigned*>(scratch(ScratchSlot::fp8_amax, size_t(xr) * sizeof(unsigned)));
      amax_rows_kernel<T><<<unsigned((xr + 7) / 8), 256, 0, stream_>>>(px, xr, xc, amax);
      MOELAB_CUDA_LAUNCH_CHECK("fp8 row amax");
    }
    a.amax_in = amax;
    if (!transpose && out.granularity != Fp8Granularity::block_128x128) {
      if (out.granularity == Fp8Granularity::tensor) {
        amax = static_cast<unsigned*>(scratch(ScratchSlot::fp8_amax, sizeof(unsigned)));
        MOELAB_CUDA_CHECK(cudaMemsetAsync(amax, 0, sizeof(unsigned), stream_));
        amax_all_kernel<T><<<unsigned(std::min<int64_t>(2 * sm_count_, (x.numel() / 8 + 255) / 256 + 1)), 256, 0, stream_>>>(px, x.numel(), amax);
        MOELAB_CUDA_LAUNCH_CHECK("fp8 amax");
      }
      auto rows_kernel = out.data.dtype == DType::e4m3 ? quantize_rows_kernel<T, 0> : quantize_rows_kernel<T, 1>;
      rows_kernel<<<unsigned((xr + 7) / 8), 256, 0, stream_>>>(px, xr, xc, int(out.granularity), amax, a.out, a.scale, a.fmax);
      MOELAB_CUDA_LAUNCH_CHECK("fp8 quantize rows");
      return;
    }
    const dim3 grid(unsigned((xc + kTile - 1) / kTile), unsigned((xr + kTile - 1) / kTile));
    const size_t smem = size_t(kTile) * (kTile + 1) * sizeof(float);
    auto kernel = out.data.dtype == DType::e4m3 ? quantize_tile_kernel<T, 0> : quantize_tile_kernel<T, 1>;
    static bool raised[2][2] = {};  // per (T, format): lift the 48 KB default once per process
    bool& done = raised[std::is_same_v<T, float>][out.data.dtype == DType::e4m3];
    if (!done) {
      MOELAB_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)));
      done = true;
    }
    kernel<<<grid, kThreads, smem, stream_>>>(px, a);
    MOELAB_CUDA_LAUNCH_CHECK("fp8 quantize tile");
  });
}

}  // namespace moelab
