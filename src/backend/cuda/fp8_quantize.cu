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

#include <algorithm>
#include <cfloat>
#include <type_traits>

#include "backend/cuda/cuda_common.cuh"
#include "backend/cuda/expert_amax.cuh"
#include "backend/cuda/fp8_codes.cuh"

namespace moelab {

using namespace cuda_detail;

namespace {

constexpr int kTile = 128;
constexpr int kThreads = 256;

// What the tile kernel reads the amax of a group from.
enum class AmaxSource : int { global, per_row, per_col, tile_row, tile_col, tile };


// This lane's share of a row's amax: elements 8 * lane + 256 i (cols a multiple of 8), four
// 16-byte loads in flight while the row lasts.
template <class T>
__device__ __forceinline__ float lane_row_amax(const T* row, int64_t cols, int lane) {
  float m = 0.0f;
  int64_t c = 8 * lane;
  for (; c + 768 < cols; c += 1024) {
    float v[4][8];
#pragma unroll
    for (int u = 0; u < 4; ++u) load8(row + c + 256 * u, v[u]);
#pragma unroll
    for (int u = 0; u < 4; ++u)
#pragma unroll
      for (int j = 0; j < 8; ++j) m = fmaxf(m, fabsf(v[u][j]));
  }
  for (; c < cols; c += 256) {
    float v[8];
    load8(row + c, v);
#pragma unroll
    for (int j = 0; j < 8; ++j) m = fmaxf(m, fabsf(v[j]));
  }
  return m;
}

// amax of a whole tensor: each thread keeps four independent 16-byte loads in flight (one at a
// time leaves most of HBM's bandwidth idle), then a block maximum and one atomicMax per block.
template <class T>
__device__ __forceinline__ void block_amax_into(const T* __restrict__ x, int64_t n, unsigned* __restrict__ out) {
  __shared__ float shm[32];
  float m = 0.0f;
  const int64_t n8 = n / 8, stride = int64_t(gridDim.x) * blockDim.x;
  int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  for (; i + 3 * stride < n8; i += 4 * stride) {
    float v[4][8];
#pragma unroll
    for (int u = 0; u < 4; ++u) load8(x + 8 * (i + u * stride), v[u]);
#pragma unroll
    for (int u = 0; u < 4; ++u)
#pragma unroll
      for (int j = 0; j < 8; ++j) m = fmaxf(m, fabsf(v[u][j]));
  }
  for (; i < n8; i += stride) {
    float v[8];
    load8(x + 8 * i, v);
#pragma unroll
    for (int j = 0; j < 8; ++j) m = fmaxf(m, fabsf(v[j]));
  }
  for (int64_t k = 8 * n8 + blockIdx.x * int64_t(blockDim.x) + threadIdx.x; k < n; k += stride)
    m = fmaxf(m, fabsf(to_f32(x[k])));
  m = block_max(m, shm);
  if (threadIdx.x == 0) atomicMax(out, __float_as_uint(m));
}

template <class T>
__global__ void amax_all_kernel(const T* __restrict__ x, int64_t n, unsigned* __restrict__ out) {
  block_amax_into(x, n, out);
}

// The addresses of one matrix of quantize_fp8_pairs' batch: x and both copies' codes and scales.
struct PairMember {
  const void* x;
  uint8_t* out;
  float* scale;
  uint8_t* out_t;
  float* scale_t;
  const unsigned* amax;  // x's amax from its producer, or null: the batch's pass wrote amax_all[z]
};

// Each member's amax (blockIdx.y the member) into out[member], as amax_all_kernel.
template <class T>
__global__ void amax_members_kernel(const PairMember* __restrict__ members, int64_t n, unsigned* __restrict__ out) {
  block_amax_into(static_cast<const T*>(members[blockIdx.y].x), n, out + blockIdx.y);
}

// Launch shape of amax_all_kernel: enough blocks to cover x once with four loads a thread, at
// most four blocks an SM.
inline unsigned amax_all_blocks(int64_t n, int sms) {
  return unsigned(std::max<int64_t>(1, std::min<int64_t>(4 * int64_t(sms), (n / 8 + 1023) / 1024)));
}

// One warp per row of x [rows, cols] (cols a multiple of 8).
template <class T>
__global__ void amax_rows_kernel(const T* __restrict__ x, int64_t rows, int64_t cols, unsigned* __restrict__ out) {
  const int64_t r = blockIdx.x * int64_t(blockDim.x / 32) + threadIdx.x / 32;
  const int lane = threadIdx.x & 31;
  if (r >= rows) return;
  float m = lane_row_amax(x + r * cols, cols, lane);
  m = warp_max(m);
  if (lane == 0) out[r] = __float_as_uint(m);
}

// Column amax of x [rows, cols]: thread per column over a 256-row strip, then atomicMax.
template <class T>
__global__ void amax_cols_kernel(const T* __restrict__ x, int64_t rows, int64_t cols, unsigned* __restrict__ out) {
  const int64_t c = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (c >= cols) return;
  x += int64_t(blockIdx.z) * rows * cols;  // batch member z
  out += int64_t(blockIdx.z) * cols;
  const int64_t r0 = int64_t(blockIdx.y) * 256, r1 = min(rows, r0 + 256);
  float m = 0.0f;
  for (int64_t r = r0; r < r1; ++r) m = fmaxf(m, fabsf(to_f32(x[r * cols + c])));
  atomicMax(out + c, __float_as_uint(m));
}


// Straight (not transposed) quantization with tensor, row or 1x128 groups, from registers: one
// warp per row, each lane eight consecutive elements (16-byte loads, 8-byte stores). 1x128
// groups are half-warps (shuffle amax); a row group takes its amax in a first pass over the row
// (the second pass reads it back from L2); a tensor group uses the pre-pass amax.
// Which of the row groups that share one "tensor" scale row r belongs to: groups of group_rows
// rows, or the expert segments of offsets (E + 1 entries) when given.
struct RowGroups {
  int64_t group_rows = INT64_MAX;  // one group: the whole tensor
  const int32_t* offsets = nullptr;
  int experts = 0;
  __device__ __forceinline__ int of(int64_t r) const {
    if (!offsets) return int(r / group_rows);
    int e = 0;
    while (e + 1 < experts && offsets[e + 1] <= r) ++e;
    return e;
  }
  // One past the last row that belongs to a group: rows past the last expert segment (capacity
  // dispatch's unused tail, whatever it holds) belong to none.
  __device__ __forceinline__ int64_t rows_end(int64_t rows) const {
    return offsets ? min(rows, int64_t(offsets[experts])) : rows;
  }
  // One past the last row of group g.
  __device__ __forceinline__ int64_t end(int g) const {
    return offsets ? int64_t(offsets[g + 1]) : (group_rows == INT64_MAX ? INT64_MAX : (g + 1) * group_rows);
  }
};

// amax of each row group (RowGroups) of x [rows, cols]: each warp takes a run of rows_per_warp
// consecutive rows and keeps a running maximum while the group stays the same (groups are runs of
// rows), so it issues one atomicMax into out[group] per group it touches, not one per row (E
// addresses taking an atomic per row serialize).
template <class T>
__global__ void amax_row_groups_kernel(const T* __restrict__ x, int64_t rows, int64_t cols, RowGroups groups,
                                       int64_t rows_per_warp, unsigned* __restrict__ out) {
  const int64_t w = blockIdx.x * int64_t(blockDim.x / 32) + threadIdx.x / 32;
  const int lane = threadIdx.x & 31;
  const int64_t last = groups.rows_end(rows);
  const int64_t r0 = w * rows_per_warp, r1 = min(last, r0 + rows_per_warp);
  if (r0 >= last) return;
  int g = groups.of(r0);
  int64_t g_end = groups.end(g);
  float m = 0.0f;
  for (int64_t r = r0; r < r1; ++r) {
    if (r >= g_end) {  // the same for every lane of the warp
      m = warp_max(m);
      if (lane == 0) atomicMax(out + g, __float_as_uint(m));
      m = 0.0f;
      g = groups.of(r);
      g_end = groups.end(g);
    }
    m = fmaxf(m, lane_row_amax(x + r * cols, cols, lane));
  }
  m = warp_max(m);
  if (lane == 0) atomicMax(out + g, __float_as_uint(m));
}

// Launch shape of amax_row_groups_kernel, 8 warps a block: enough warps to fill the GPU (about
// 32 an SM), each taking at most 16 rows (fewer rows a warp means more atomics).
struct AmaxRowGroupsLaunch {
  int64_t rows_per_warp;
  unsigned blocks;
};
inline AmaxRowGroupsLaunch amax_row_groups_launch(int64_t rows, int sms) {
  const int64_t warps = 32 * int64_t(sms);
  const int64_t per_warp = std::clamp<int64_t>((rows + warps - 1) / warps, 1, 16);
  return {per_warp, unsigned(std::max<int64_t>(1, (rows + 8 * per_warp - 1) / (8 * per_warp)))};
}

// scale[g] = 1 / multiplier of group g's amax (every group's scale, empty ones included).
__global__ void group_scales_kernel(const unsigned* __restrict__ amax, int groups, float fmax, float* __restrict__ scale) {
  const int g = blockIdx.x * blockDim.x + threadIdx.x;
  if (g < groups) scale[g] = __fdiv_rn(1.0f, multiplier_of(__uint_as_float(amax[g]), fmax));
}

template <class T, int kFormat>
__global__ void __launch_bounds__(256) quantize_rows_kernel(const T* __restrict__ x, int64_t rows, int64_t cols, int granularity,
                                                            const unsigned* __restrict__ amax_all, RowGroups groups,
                                                            uint8_t* __restrict__ out, float* __restrict__ scale, float fmax) {
  const int64_t r = blockIdx.x * int64_t(blockDim.x / 32) + threadIdx.x / 32;
  const int lane = threadIdx.x & 31;
  if (r >= rows) return;
  const auto g = Fp8Granularity(granularity);
  const T* row = x + r * cols;
  uint8_t* orow = out + r * cols;
  float mult = 0.0f;
  if (g == Fp8Granularity::tensor) {  // the group's scale is written by group_scales_kernel
    mult = multiplier_of(__uint_as_float(amax_all[groups.of(r)]), fmax);
  } else if (g == Fp8Granularity::row) {
    mult = multiplier_of(warp_max(lane_row_amax(row, cols, lane)), fmax);
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
  int64_t xr, xc;            // x is [xr, xc] (blockIdx.z picks one of a batch of them, each its own groups)
  int64_t scale_stride;      // scale entries of one batch member
  int64_t amax_stride;       // amax_in entries of one batch member
  bool transpose;            // output [xc, xr] instead of [xr, xc]
  AmaxSource source;
  int granularity;           // Fp8Granularity, for where scales go
  const unsigned* amax_in;   // global / per_row / per_col amax bits (pre-pass)
  uint8_t* out;
  float* scale;
  float fmax;
};

// Stages the kTile x kTile tile at (r0, c0) of x [xr, xc] in shared memory as f32 (zeros outside
// x), row stride kTile + 1: 16 vectors of 8 per tile row, four loads in flight per thread.
template <class T>
__device__ __forceinline__ void stage_tile(const T* __restrict__ x, int64_t xr, int64_t xc, int64_t r0, int64_t c0,
                                           float* tile_smem) {
  constexpr int kVecs = kTile * (kTile / 8) / kThreads, kBatch = 4;
#pragma unroll
  for (int b = 0; b < kVecs; b += kBatch) {
    float v[kBatch][8];
#pragma unroll
    for (int u = 0; u < kBatch; ++u) {
      const int i = threadIdx.x + (b + u) * kThreads, r = i / (kTile / 8), c = (i % (kTile / 8)) * 8;
      if (r0 + r < xr && c0 + c < xc) load8(x + (r0 + r) * xc + c0 + c, v[u]);
      else
#pragma unroll
        for (int j = 0; j < 8; ++j) v[u][j] = 0.0f;
    }
#pragma unroll
    for (int u = 0; u < kBatch; ++u) {
      const int i = threadIdx.x + (b + u) * kThreads, r = i / (kTile / 8), c = (i % (kTile / 8)) * 8;
#pragma unroll
      for (int j = 0; j < 8; ++j) tile_smem[r * (kTile + 1) + c + j] = v[u][j];
    }
  }
}

// The staged tile's codes into out [xr, xc] (straight: each warp a tile row, each lane four
// consecutive codes as one 32-bit store), element (r, c) multiplied by mult(r, c).
template <int kFormat, class Mult>
__device__ __forceinline__ void write_tile_straight(const float* tile_smem, int64_t xr, int64_t xc, int64_t r0, int64_t c0,
                                                    uint8_t* __restrict__ out, Mult mult) {
  auto tile = [&](int r, int c) { return tile_smem[r * (kTile + 1) + c]; };
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  for (int r = warp; r < kTile; r += kThreads / 32) {
    const int c = 4 * lane;
    if (r0 + r >= xr || c0 + c >= xc) continue;
    const uint32_t q = encode4<kFormat>(__fmul_rn(tile(r, c), mult(r, c)), __fmul_rn(tile(r, c + 1), mult(r, c + 1)),
                                        __fmul_rn(tile(r, c + 2), mult(r, c + 2)), __fmul_rn(tile(r, c + 3), mult(r, c + 3)));
    *reinterpret_cast<uint32_t*>(out + (r0 + r) * xc + c0 + c) = q;
  }
}

// The same into out [xc, xr] (transposed: each warp a tile column, four consecutive rows a lane).
template <int kFormat, class Mult>
__device__ __forceinline__ void write_tile_transposed(const float* tile_smem, int64_t xr, int64_t xc, int64_t r0,
                                                      int64_t c0, uint8_t* __restrict__ out, Mult mult) {
  auto tile = [&](int r, int c) { return tile_smem[r * (kTile + 1) + c]; };
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  for (int c = warp; c < kTile; c += kThreads / 32) {
    const int r = 4 * lane;
    if (c0 + c >= xc || r0 + r >= xr) continue;
    const uint32_t q = encode4<kFormat>(__fmul_rn(tile(r, c), mult(r, c)), __fmul_rn(tile(r + 1, c), mult(r + 1, c)),
                                        __fmul_rn(tile(r + 2, c), mult(r + 2, c)), __fmul_rn(tile(r + 3, c), mult(r + 3, c)));
    *reinterpret_cast<uint32_t*>(out + (c0 + c) * xr + r0 + r) = q;
  }
}

// Multipliers of the staged tile's 1x128 groups: one per tile row (mult[r]) or per tile column.
__device__ __forceinline__ void tile_row_multipliers(const float* tile_smem, float fmax, float* mult) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  for (int r = warp; r < kTile; r += kThreads / 32) {
    float m = 0.0f;
#pragma unroll
    for (int j = 0; j < 4; ++j) m = fmaxf(m, fabsf(tile_smem[r * (kTile + 1) + lane + 32 * j]));
    m = warp_max(m);
    if (lane == 0) mult[r] = multiplier_of(m, fmax);
  }
}
__device__ __forceinline__ void tile_col_multipliers(const float* tile_smem, float fmax, float* mult) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  for (int c = warp; c < kTile; c += kThreads / 32) {
    float m = 0.0f;
#pragma unroll
    for (int j = 0; j < 4; ++j) m = fmaxf(m, fabsf(tile_smem[(lane + 32 * j) * (kTile + 1) + c]));
    m = warp_max(m);
    if (lane == 0) mult[c] = multiplier_of(m, fmax);
  }
}

// grid (ceil(xc / 128), ceil(xr / 128)), 256 threads. xc and xr multiples of 16.
template <class T, int kFormat>
__global__ void __launch_bounds__(kThreads) quantize_tile_kernel(const T* __restrict__ x, TileArgs a) {
  extern __shared__ float tile_smem[];  // [kTile][kTile + 1] f32 (66 KB: dynamic shared memory)
  auto tile = [&](int r, int c) -> float& { return tile_smem[r * (kTile + 1) + c]; };
  __shared__ float mult_row[kTile], mult_col[kTile];
  __shared__ float shm[32];
  const int64_t r0 = int64_t(blockIdx.y) * kTile, c0 = int64_t(blockIdx.x) * kTile;
  if (blockIdx.z) {  // batch member z: its own matrix, codes, scales and amax
    x += int64_t(blockIdx.z) * a.xr * a.xc;
    a.out += int64_t(blockIdx.z) * a.xr * a.xc;
    a.scale += int64_t(blockIdx.z) * a.scale_stride;
    if (a.amax_in) a.amax_in += int64_t(blockIdx.z) * a.amax_stride;
  }
  const int tid = threadIdx.x;

  stage_tile(x, a.xr, a.xc, r0, c0, tile_smem);
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
    case AmaxSource::tile_row: tile_row_multipliers(tile_smem, a.fmax, mult_row); break;
    case AmaxSource::tile_col: tile_col_multipliers(tile_smem, a.fmax, mult_col); break;
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

  const int64_t out_cols = a.transpose ? a.xr : a.xc;
  if (!a.transpose) write_tile_straight<kFormat>(tile_smem, a.xr, a.xc, r0, c0, a.out, mult_at);
  else write_tile_transposed<kFormat>(tile_smem, a.xr, a.xc, r0, c0, a.out, mult_at);

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

// Row and column amax of x [xr, xc] in one read (the pre-pass of a row-scaled pair): block
// (column tile, row tile) of 128 x 128, 16 lanes of 8 columns a row; rows reduced by shuffles,
// columns through shared memory; one atomicMax per row and per column a block.
template <class T>
__global__ void __launch_bounds__(kThreads)
    amax_rows_cols_kernel(const T* __restrict__ x, int64_t xr, int64_t xc, unsigned* __restrict__ row_amax,
                          unsigned* __restrict__ col_amax) {
  constexpr int kLanes = kTile / 8, kRowsAtOnce = kThreads / kLanes, kBatch = 4;  // 16, 16, 4
  __shared__ float col_part[kRowsAtOnce][kTile];
  const int tid = threadIdx.x, cv = tid % kLanes, ty = tid / kLanes;
  const int64_t r0 = int64_t(blockIdx.y) * kTile, c0 = int64_t(blockIdx.x) * kTile + 8 * cv;
  // Batch member z along the grid's z: its x, and its row and column maxima (xr + xc of them).
  x += int64_t(blockIdx.z) * xr * xc;
  row_amax += int64_t(blockIdx.z) * (xr + xc);
  col_amax += int64_t(blockIdx.z) * (xr + xc);
  float cm[8] = {0, 0, 0, 0, 0, 0, 0, 0};
#pragma unroll
  for (int rr = 0; rr < kTile; rr += kRowsAtOnce * kBatch) {
    float v[kBatch][8];
#pragma unroll
    for (int u = 0; u < kBatch; ++u) {
      const int64_t r = r0 + rr + ty + kRowsAtOnce * u;
      if (r < xr && c0 < xc) load8(x + r * xc + c0, v[u]);
      else
#pragma unroll
        for (int j = 0; j < 8; ++j) v[u][j] = 0.0f;
    }
#pragma unroll
    for (int u = 0; u < kBatch; ++u) {
      float m = 0.0f;
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        m = fmaxf(m, fabsf(v[u][j]));
        cm[j] = fmaxf(cm[j], fabsf(v[u][j]));
      }
#pragma unroll
      for (int o = kLanes / 2; o > 0; o >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, o));  // the row's 16 lanes
      const int64_t r = r0 + rr + ty + kRowsAtOnce * u;
      if (cv == 0 && r < xr) atomicMax(row_amax + r, __float_as_uint(m));
    }
  }
#pragma unroll
  for (int j = 0; j < 8; ++j) col_part[ty][8 * cv + j] = cm[j];
  __syncthreads();
  if (tid < kTile) {
    float m = 0.0f;
#pragma unroll
    for (int k = 0; k < kRowsAtOnce; ++k) m = fmaxf(m, col_part[k][tid]);
    const int64_t c = int64_t(blockIdx.x) * kTile + tid;
    if (c < xc) atomicMax(col_amax + c, __float_as_uint(m));
  }
}

struct PairArgs {
  int64_t xr, xc;             // x is [xr, xc] (per batch member)
  int granularity;            // tensor, row or 1x128, both copies alike
  const unsigned* amax_all;   // tensor: [1]
  const unsigned* amax_rows;  // row: [xr] (the straight copy's groups)
  const unsigned* amax_cols;  // row: [xc] (the transposed copy's groups)
  uint8_t* out;               // straight [xr, xc]
  float* scale;
  uint8_t* out_t;             // transposed [xc, xr]
  float* scale_t;
  float fmax;
  // A batch of matrices along the grid's z: member z's x, codes, scales and maxima start these
  // many elements after member 0's (an expert stack), or, given members, at members[z]'s
  // addresses (tensor groups; its amax at amax_all[z]).
  int64_t amax_stride = 0, scale_stride = 0, scale_t_stride = 0;
  const PairMember* members = nullptr;

  // Points this thread's arguments at member z; returns its x.
  template <class T>
  __device__ __forceinline__ const T* select_member(const T* x, int64_t z) {
    if (members) {
      const PairMember m = members[z];
      out = m.out, scale = m.scale, out_t = m.out_t, scale_t = m.scale_t;
      amax_all = m.amax ? m.amax : amax_all + z;
      return static_cast<const T*>(m.x);
    }
    const int64_t elems = xr * xc;
    x += z * elems;
    out += z * elems;
    out_t += z * elems;
    scale += z * scale_stride;
    scale_t += z * scale_t_stride;
    if (amax_all) amax_all += z * amax_stride;
    if (amax_rows) amax_rows += z * amax_stride;
    if (amax_cols) amax_cols += z * amax_stride;
    return x;
  }
};

// The pair with 1x128 groups: both copies of one staged tile, the straight one with the groups of
// its rows, the transposed one with those of its columns (both inside the tile), so the pair costs
// one read of x. Scales as quantize_tile_kernel writes them for each orientation.
// grid (ceil(xc / 128), ceil(xr / 128)), 256 threads. Tensor and row groups take the kernel below.
template <class T, int kFormat>
__global__ void __launch_bounds__(kThreads) quantize_pair_tile_kernel(const T* __restrict__ x, PairArgs a) {
  extern __shared__ float tile_smem[];  // [kTile][kTile + 1] f32
  __shared__ float mult_row[kTile], mult_col[kTile];
  const int64_t r0 = int64_t(blockIdx.y) * kTile, c0 = int64_t(blockIdx.x) * kTile;
  const int tid = threadIdx.x;
  stage_tile(x, a.xr, a.xc, r0, c0, tile_smem);
  __syncthreads();
  tile_row_multipliers(tile_smem, a.fmax, mult_row);
  tile_col_multipliers(tile_smem, a.fmax, mult_col);
  __syncthreads();
  write_tile_straight<kFormat>(tile_smem, a.xr, a.xc, r0, c0, a.out, [&](int r, int) { return mult_row[r]; });
  write_tile_transposed<kFormat>(tile_smem, a.xr, a.xc, r0, c0, a.out_t, [&](int, int c) { return mult_col[c]; });
  // scale[k block, output row]
  for (int i = tid; i < kTile && r0 + i < a.xr; i += kThreads)
    a.scale[blockIdx.x * a.xr + r0 + i] = __fdiv_rn(1.0f, mult_row[i]);
  for (int i = tid; i < kTile && c0 + i < a.xc; i += kThreads)
    a.scale_t[blockIdx.y * a.xc + c0 + i] = __fdiv_rn(1.0f, mult_col[i]);
}

// The pair for tensor and row groups, whose multipliers the amax pre-pass already knows: no f32
// tile (the kernel above runs at about 1.9 TB/s). A thread reads four rows x 8 columns, writes
// its straight codes as read and its transposed codes to shared memory as one 32-bit word of
// four rows per column (word_slot's swizzle); the warps then store whole 128-row columns. Same
// grid and scales as above.
template <class T, int kFormat>
__global__ void __launch_bounds__(kThreads) quantize_pair_scaled_kernel(const T* __restrict__ x, PairArgs a) {
  __shared__ uint32_t words[kTile][kTile / 4];  // [tile column][four-row word, swizzled]
  x = a.select_member(x, blockIdx.z);
  const int64_t r0 = int64_t(blockIdx.y) * kTile, c0 = int64_t(blockIdx.x) * kTile;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const bool row = Fp8Granularity(a.granularity) == Fp8Granularity::row;
  const float all = row ? 0.0f : multiplier_of(__uint_as_float(a.amax_all[0]), a.fmax);
  const int cg = tid % (kTile / 8);
  const int64_t c = c0 + 8 * cg;  // this thread's 8 columns (xc is a multiple of 16: all in or all out)
  const bool col_ok = c < a.xc;
  float col_mult[8];
#pragma unroll
  for (int j = 0; j < 8; ++j)
    col_mult[j] = !row ? all : col_ok ? multiplier_of(__uint_as_float(a.amax_cols[c + j]), a.fmax) : 0.0f;
#pragma unroll
  for (int pass = 0; pass < 2; ++pass) {
    const int q = pass * (kTile / 8) + tid / (kTile / 8);  // rows r0 + 4q .. r0 + 4q + 3
    const bool rows_ok = r0 + 4 * q < a.xr;                // xr is a multiple of 16
    float v[4][8];
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      if (rows_ok && col_ok) load8(x + (r0 + 4 * q + i) * a.xc + c, v[i]);
      else
#pragma unroll
        for (int j = 0; j < 8; ++j) v[i][j] = 0.0f;
    }
    if (rows_ok && col_ok)
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int64_t r = r0 + 4 * q + i;
        const float m = row ? multiplier_of(__uint_as_float(a.amax_rows[r]), a.fmax) : all;
        *reinterpret_cast<uint2*>(a.out + r * a.xc + c) = encode8<kFormat>(v[i], m);
      }
#pragma unroll
    for (int j = 0; j < 8; ++j) words[8 * cg + j][word_slot(q, cg)] = encode_column4<kFormat>(v, j, col_mult[j]);
  }
  __syncthreads();
  if (r0 + 4 * lane < a.xr)
    for (int col = warp; col < kTile && c0 + col < a.xc; col += kThreads / 32)
      *reinterpret_cast<uint32_t*>(a.out_t + (c0 + col) * a.xr + r0 + 4 * lane) = words[col][word_slot(lane, col / 8)];
  if (!row) {
    if (blockIdx.x == 0 && blockIdx.y == 0 && tid == 0) a.scale[0] = a.scale_t[0] = __fdiv_rn(1.0f, all);
    return;
  }
  if (blockIdx.x == 0)
    for (int i = tid; i < kTile && r0 + i < a.xr; i += kThreads)
      a.scale[r0 + i] = __fdiv_rn(1.0f, multiplier_of(__uint_as_float(a.amax_rows[r0 + i]), a.fmax));
  if (blockIdx.y == 0 && tid < kTile / 8 && col_ok)
#pragma unroll
    for (int j = 0; j < 8; ++j) a.scale_t[c + j] = __fdiv_rn(1.0f, col_mult[j]);
}

}  // namespace

namespace {

// Checks x and the operand it is quantized into (transposed or not) as quantize_fp8 needs them.
void check_quantize_args(const Tensor& x, bool transpose, const QuantizedOperand& out, const std::string& op) {
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
}

// Checks x and its two copies as quantize_fp8_pair needs them: each as quantize_fp8's, one format
// and one granularity for both.
void check_pair_args(const Tensor& x, const QuantizedOperand& straight, const QuantizedOperand& transposed,
                     const std::string& op) {
  check_quantize_args(x, false, straight, op);
  check_quantize_args(x, true, transposed, op);
  require(straight.data.dtype == transposed.data.dtype && straight.granularity == transposed.granularity, op,
          "both copies take one format and granularity, got " + std::string(dtype_name(straight.data.dtype)) + " " +
              fp8_granularity_name(straight.granularity) + " and " + dtype_name(transposed.data.dtype) + " " +
              fp8_granularity_name(transposed.granularity));
}

}  // namespace

void CudaBackend::quantize_fp8(const Tensor& x, bool transpose, QuantizedOperand& out) {
  check_quantize_args(x, transpose, out, "quantize_fp8");
  const int64_t xc = x.cols(), xr = xc ? x.numel() / xc : 0;
  if (xr == 0 || xc == 0) return;
  quantize_fp8_batch(x.data, x.dtype, 1, xr, xc, transpose, out.granularity, out.data.as<uint8_t>(), out.data.dtype,
                     out.scale.as<float>(), nullptr, 0);
}

void CudaBackend::raise_amax_by_pass(const Tensor& out, const Tensor& amax) {
  const int64_t n = out.numel();
  if (n == 0) return;
  unsigned* am = tensor_amax_arg(&amax, "amax pass");
  MOELAB_FLOAT_DISPATCH(out.dtype, T, {
    const T* p = out.as<T>();
    if (!aligned16(p)) throw Error("amax pass: the output " + out.describe() + " is not 16-byte aligned");
    amax_all_kernel<T><<<amax_all_blocks(n, sm_count_), 256, 0, stream_>>>(p, n, am);
  });
  MOELAB_CUDA_LAUNCH_CHECK("amax pass");
}

void CudaBackend::quantize_fp8_pair(const Tensor& x, QuantizedOperand& straight, QuantizedOperand& transposed,
                                    const Tensor* amax) {
  const std::string op = "quantize_fp8_pair";
  check_pair_args(x, straight, transposed, op);
  const Fp8Granularity g = straight.granularity;
  if (g == Fp8Granularity::block_128x128) return Backend::quantize_fp8_pair(x, straight, transposed);  // weights only
  const int64_t xc = x.cols(), xr = xc ? x.numel() / xc : 0;
  if (xr == 0 || xc == 0) return;
  const unsigned* known = g == Fp8Granularity::tensor ? tensor_amax_arg(amax, op.c_str()) : nullptr;
  quantize_fp8_pair_batch(x.data, x.dtype, 1, xr, xc, g, straight.data.as<uint8_t>(), straight.scale.as<float>(),
                          transposed.data.as<uint8_t>(), transposed.scale.as<float>(), straight.data.dtype, known);
}

void CudaBackend::quantize_fp8_pairs(const std::vector<Fp8PairJob>& jobs) {
  // Same-shaped matrices under tensor scaling (a model's attention weights) take two launches
  // over a table of their addresses, an amax pass and the pair, where one launch each a matrix
  // left a small one mostly latency; with their producers' amax, the pair alone. The rest go one
  // by one.
  std::map<std::tuple<int64_t, int64_t, int, int, bool>, std::vector<const Fp8PairJob*>> groups;
  for (const Fp8PairJob& j : jobs) {
    const Tensor& x = *j.x;
    const int64_t xc = x.cols(), xr = xc ? x.numel() / xc : 0;
    if (j.straight->granularity != Fp8Granularity::tensor || j.transposed->granularity != Fp8Granularity::tensor ||
        xr == 0) {
      quantize_fp8_pair(x, *j.straight, *j.transposed, j.known_amax);
      continue;
    }
    groups[{xr, xc, int(x.dtype), int(j.straight->data.dtype), j.known_amax != nullptr}].push_back(&j);
  }
  for (const auto& [key, members] : groups) {
    const auto [xr, xc, x_dtype, format, known] = key;
    std::vector<uint64_t> addresses;
    for (const Fp8PairJob* j : members) {
      check_pair_args(*j->x, *j->straight, *j->transposed, "quantize_fp8_pairs");
      const void* amax = known ? tensor_amax_arg(j->known_amax, "quantize_fp8_pairs") : nullptr;
      for (const void* p : {static_cast<const void*>(j->x->data), static_cast<const void*>(j->straight->data.data),
                            static_cast<const void*>(j->straight->scale.data),
                            static_cast<const void*>(j->transposed->data.data),
                            static_cast<const void*>(j->transposed->scale.data), amax})
        addresses.push_back(reinterpret_cast<uint64_t>(p));
    }
    const auto* table = members.size() > 1 ? static_cast<const PairMember*>(pair_member_table(addresses)) : nullptr;
    if (!table) {
      for (const Fp8PairJob* j : members) quantize_fp8_pair(*j->x, *j->straight, *j->transposed, j->known_amax);
      continue;
    }
    const unsigned n = unsigned(members.size());
    auto* amax = known ? nullptr : static_cast<unsigned*>(scratch(ScratchSlot::fp8_amax, n * sizeof(unsigned)));
    if (!known) MOELAB_CUDA_CHECK(cudaMemsetAsync(amax, 0, n * sizeof(unsigned), stream_));
    PairArgs a{};
    a.xr = xr;
    a.xc = xc;
    a.granularity = int(Fp8Granularity::tensor);
    a.amax_all = amax;
    a.fmax = fp8_max(DType(format));
    a.members = table;
    const bool e4m3 = DType(format) == DType::e4m3;
    MOELAB_FLOAT_DISPATCH(DType(x_dtype), T, {
      if (!known) {
        const dim3 amax_grid(amax_all_blocks(xr * xc, sm_count_), n);  // each member as amax_all_kernel covers it
        amax_members_kernel<T><<<amax_grid, 256, 0, stream_>>>(table, xr * xc, amax);
        MOELAB_CUDA_LAUNCH_CHECK("fp8 pairs amax");
      }
      const dim3 grid(unsigned((xc + kTile - 1) / kTile), unsigned((xr + kTile - 1) / kTile), n);
      auto scaled = e4m3 ? quantize_pair_scaled_kernel<T, 0> : quantize_pair_scaled_kernel<T, 1>;
      scaled<<<grid, kThreads, 0, stream_>>>(static_cast<const T*>(nullptr), a);
      MOELAB_CUDA_LAUNCH_CHECK("fp8 pairs");
    });
  }
}

const void* CudaBackend::pair_member_table(const std::vector<uint64_t>& addresses) {
  auto it = pair_member_tables_.find(addresses);
  if (it != pair_member_tables_.end()) return it->second.data;
  cudaStreamCaptureStatus capturing = cudaStreamCaptureStatusNone;
  MOELAB_CUDA_CHECK(cudaStreamIsCapturing(stream_, &capturing));
  if (capturing != cudaStreamCaptureStatusNone) return nullptr;
  Tensor table = alloc({int64_t(addresses.size()) * 2}, DType::i32);  // 64-bit addresses as i32 pairs
  MOELAB_CUDA_CHECK(cudaMemcpyAsync(table.data, addresses.data(), addresses.size() * sizeof(uint64_t),
                                    cudaMemcpyHostToDevice, stream_));
  return pair_member_tables_.emplace(addresses, table).first->second.data;
}

void CudaBackend::quantize_fp8_pair_batch(const void* x, DType x_dtype, int64_t batch, int64_t xr, int64_t xc,
                                          Fp8Granularity g, uint8_t* out, float* scale, uint8_t* out_t,
                                          float* scale_t, DType format, const unsigned* known_amax) {
  MOELAB_CHECK(batch == 1 || g == Fp8Granularity::tensor || g == Fp8Granularity::row,
               "quantize_fp8_pair_batch: a batch takes tensor or row groups");
  MOELAB_CHECK(!known_amax || g == Fp8Granularity::tensor,
               "quantize_fp8_pair_batch: a known amax (one per member) serves tensor groups");
  PairArgs a{};
  a.xr = xr;
  a.xc = xc;
  a.granularity = int(g);
  a.out = out;
  a.scale = scale;
  a.out_t = out_t;
  a.scale_t = scale_t;
  a.fmax = fp8_max(format);
  const bool row = g == Fp8Granularity::row;
  a.amax_stride = row ? xr + xc : 1;
  a.scale_stride = row ? xr : 1;
  a.scale_t_stride = row ? xc : 1;
  const bool e4m3 = format == DType::e4m3;
  MOELAB_FLOAT_DISPATCH(x_dtype, T, {
    const T* px = static_cast<const T*>(x);
    if (known_amax) {
      a.amax_all = known_amax;
    } else if (g != Fp8Granularity::block_1x128) {
      const size_t n = size_t(batch) * size_t(a.amax_stride);
      auto* amax = static_cast<unsigned*>(scratch(ScratchSlot::fp8_amax, n * sizeof(unsigned)));
      MOELAB_CUDA_CHECK(cudaMemsetAsync(amax, 0, n * sizeof(unsigned), stream_));
      if (g == Fp8Granularity::tensor) {
        if (batch == 1) {
          amax_all_kernel<T><<<amax_all_blocks(xr * xc, sm_count_), 256, 0, stream_>>>(px, xr * xc, amax);
        } else {  // one maximum per member, shared by its two copies
          RowGroups groups;
          groups.group_rows = xr;
          const AmaxRowGroupsLaunch l = amax_row_groups_launch(batch * xr, sm_count_);
          amax_row_groups_kernel<T><<<l.blocks, 256, 0, stream_>>>(px, batch * xr, xc, groups, l.rows_per_warp, amax);
        }
        a.amax_all = amax;
      } else {
        const dim3 grid(unsigned((xc + kTile - 1) / kTile), unsigned((xr + kTile - 1) / kTile), unsigned(batch));
        amax_rows_cols_kernel<T><<<grid, kThreads, 0, stream_>>>(px, xr, xc, amax, amax + xr);
        a.amax_rows = amax;
        a.amax_cols = amax + xr;
      }
      MOELAB_CUDA_LAUNCH_CHECK("fp8 pair amax");
    }
    const dim3 grid(unsigned((xc + kTile - 1) / kTile), unsigned((xr + kTile - 1) / kTile), unsigned(batch));
    if (g != Fp8Granularity::block_1x128) {
      auto scaled = e4m3 ? quantize_pair_scaled_kernel<T, 0> : quantize_pair_scaled_kernel<T, 1>;
      scaled<<<grid, kThreads, 0, stream_>>>(px, a);
      MOELAB_CUDA_LAUNCH_CHECK("fp8 quantize pair");
      return;
    }
    const size_t smem = size_t(kTile) * (kTile + 1) * sizeof(float);
    auto kernel = e4m3 ? quantize_pair_tile_kernel<T, 0> : quantize_pair_tile_kernel<T, 1>;
    static bool raised[2][2] = {};  // per (T, format): lift the 48 KB default once per process
    bool& done = raised[std::is_same_v<T, float>][e4m3];
    if (!done) {
      MOELAB_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)));
      done = true;
    }
    kernel<<<grid, kThreads, smem, stream_>>>(px, a);
    MOELAB_CUDA_LAUNCH_CHECK("fp8 quantize pair");
  });
}

void CudaBackend::quantize_fp8_batch(const void* x, DType x_dtype, int64_t batch, int64_t xr, int64_t xc,
                                     bool transpose, Fp8Granularity g, uint8_t* out, DType format, float* scale,
                                     const int32_t* segments, int segment_count) {
  const int64_t rows = transpose ? xc : xr, K = transpose ? xr : xc;
  int64_t member_scales = 1;
  for (int64_t d : fp8_scale_shape(g, rows, K)) member_scales *= d;
  const float fmax = fp8_max(format);
  // Straight copies with tensor or row groups (and 1x128 of a single matrix) take the rows
  // kernel; the rest the tile kernel.
  const bool straight = !transpose && (g == Fp8Granularity::tensor || g == Fp8Granularity::row ||
                                       (g == Fp8Granularity::block_1x128 && batch == 1));
  MOELAB_FLOAT_DISPATCH(x_dtype, T, {
    const T* px = static_cast<const T*>(x);
    const int64_t all_rows = batch * xr;
    if (straight) {
      RowGroups groups;
      int ngroups = 1;
      if (segments) groups.offsets = segments, groups.experts = segment_count, ngroups = segment_count;
      else groups.group_rows = xr, ngroups = int(batch);
      unsigned* amax = nullptr;
      if (g == Fp8Granularity::tensor) {
        amax = static_cast<unsigned*>(scratch(ScratchSlot::fp8_amax, size_t(ngroups) * sizeof(unsigned)));
        MOELAB_CUDA_CHECK(cudaMemsetAsync(amax, 0, size_t(ngroups) * sizeof(unsigned), stream_));
        if (ngroups == 1)
          amax_all_kernel<T><<<amax_all_blocks(all_rows * xc, sm_count_), 256, 0, stream_>>>(px, all_rows * xc, amax);
        else {
          const AmaxRowGroupsLaunch l = amax_row_groups_launch(all_rows, sm_count_);
          amax_row_groups_kernel<T><<<l.blocks, 256, 0, stream_>>>(px, all_rows, xc, groups, l.rows_per_warp, amax);
        }
        MOELAB_CUDA_LAUNCH_CHECK("fp8 amax");
        group_scales_kernel<<<unsigned((ngroups + 255) / 256), 256, 0, stream_>>>(amax, ngroups, fmax, scale);
        MOELAB_CUDA_LAUNCH_CHECK("fp8 group scales");
      }
      auto rows_kernel = format == DType::e4m3 ? quantize_rows_kernel<T, 0> : quantize_rows_kernel<T, 1>;
      rows_kernel<<<unsigned((all_rows + 7) / 8), 256, 0, stream_>>>(px, all_rows, xc, int(g), amax, groups, out, scale, fmax);
      MOELAB_CUDA_LAUNCH_CHECK("fp8 quantize rows");
      return;
    }
    if (segments) throw Error("quantize_fp8: expert segments apply only to straight tensor-scaled copies");
    TileArgs a{};
    a.xr = xr;
    a.xc = xc;
    a.transpose = transpose;
    a.granularity = int(g);
    a.out = out;
    a.scale = scale;
    a.scale_stride = member_scales;
    a.fmax = fmax;
    unsigned* amax = nullptr;
    const bool per_col = transpose;  // output rows are x's columns
    switch (g) {
      case Fp8Granularity::tensor: a.source = AmaxSource::global; break;
      case Fp8Granularity::row: a.source = per_col ? AmaxSource::per_col : AmaxSource::per_row; break;
      case Fp8Granularity::block_1x128: a.source = per_col ? AmaxSource::tile_col : AmaxSource::tile_row; break;
      case Fp8Granularity::block_128x128: a.source = AmaxSource::tile; break;
    }
    // Groups that span tiles get their amax from a pre-pass, one set per batch member.
    if (a.source == AmaxSource::global) {
      a.amax_stride = 1;
      amax = static_cast<unsigned*>(scratch(ScratchSlot::fp8_amax, size_t(batch) * sizeof(unsigned)));
      MOELAB_CUDA_CHECK(cudaMemsetAsync(amax, 0, size_t(batch) * sizeof(unsigned), stream_));
      if (batch == 1)
        amax_all_kernel<T><<<amax_all_blocks(xr * xc, sm_count_), 256, 0, stream_>>>(px, xr * xc, amax);
      else {
        RowGroups groups;
        groups.group_rows = xr;
        const AmaxRowGroupsLaunch l = amax_row_groups_launch(all_rows, sm_count_);
        amax_row_groups_kernel<T><<<l.blocks, 256, 0, stream_>>>(px, all_rows, xc, groups, l.rows_per_warp, amax);
      }
      MOELAB_CUDA_LAUNCH_CHECK("fp8 amax");
    } else if (a.source == AmaxSource::per_col) {
      a.amax_stride = xc;
      amax = static_cast<unsigned*>(scratch(ScratchSlot::fp8_amax, size_t(batch * xc) * sizeof(unsigned)));
      MOELAB_CUDA_CHECK(cudaMemsetAsync(amax, 0, size_t(batch * xc) * sizeof(unsigned), stream_));
      amax_cols_kernel<T><<<dim3(unsigned((xc + 255) / 256), unsigned((xr + 255) / 256), unsigned(batch)), 256, 0, stream_>>>(
          px, xr, xc, amax);
      MOELAB_CUDA_LAUNCH_CHECK("fp8 column amax");
    } else if (a.source == AmaxSource::per_row) {
      a.amax_stride = xr;
      amax = static_cast<unsigned*>(scratch(ScratchSlot::fp8_amax, size_t(all_rows) * sizeof(unsigned)));
      amax_rows_kernel<T><<<unsigned((all_rows + 7) / 8), 256, 0, stream_>>>(px, all_rows, xc, amax);
      MOELAB_CUDA_LAUNCH_CHECK("fp8 row amax");
    }
    a.amax_in = amax;
    const dim3 grid(unsigned((xc + kTile - 1) / kTile), unsigned((xr + kTile - 1) / kTile), unsigned(batch));
    const size_t smem = size_t(kTile) * (kTile + 1) * sizeof(float);
    auto kernel = format == DType::e4m3 ? quantize_tile_kernel<T, 0> : quantize_tile_kernel<T, 1>;
    static bool raised[2][2] = {};  // per (T, format): lift the 48 KB default once per process
    bool& done = raised[std::is_same_v<T, float>][format == DType::e4m3];
    if (!done) {
      MOELAB_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)));
      done = true;
    }
    kernel<<<grid, kThreads, smem, stream_>>>(px, a);
    MOELAB_CUDA_LAUNCH_CHECK("fp8 quantize tile");
  });
}

}  // namespace moelab
