// The experts' GEMMs in FP8 on Hopper (precision = fp8, fp8.layers = experts | all): wgmma k32
// on e4m3/e5m2 codes fed by TMA, reading the expert offsets on the device (no host sync, so the
// step is captured in a graph in both dispatch modes), with the recipe's scales applied
// per expert, per row or per 128-long k-block.
//
// The kernels are the BF16 TMA kernels' (grouped_gemm_sm90.cu) shape at twice the k-depth per
// stage: an FP8 shared-memory row of 128 bytes holds 128 values, so a stage of the same bytes
// carries twice the products. Forward and data gradient share one persistent kernel (both
// operands K-major: the data gradient multiplies by the transposed quantized copy of W, which
// quantization writes at no extra pass). The weight gradient reduces over each expert's tokens,
// which FP8 wgmma needs K-major too: quantization writes dY^T and X^T with every expert's
// tokens in a segment padded with zeros to whole 128-token blocks, so each k-block belongs to
// one expert and needs no masking. Block scaling (1x128 / 128x128) multiplies each k-block's
// partial sums by its scales before adding them to the f32 accumulator (DeepSeek-V3's
// promotion), which also bounds how long the tensor cores' own accumulation runs.
#include <cuda.h>

#include <algorithm>
#include <set>
#include <type_traits>

#include "backend/cuda/cuda_backend.hpp"
#include "backend/cuda/cuda_common.cuh"
#include "backend/cuda/expert_amax.cuh"
#include "backend/cuda/fp8_codes.cuh"
#include "backend/cuda/grouped_gemm_fp8.cuh"
#include "backend/cuda/grouped_gemm_sm90.cuh"
#include "backend/cuda/mma_utils.cuh"
#include "backend/cuda/wgmma.cuh"
#include "backend/cuda/wgmma_epilogue.cuh"
#include "backend/cuda/wgmma_fp8.cuh"
#include "core/fp8_recipe.hpp"

namespace moelab {
using namespace cuda_detail;

namespace grouped_gemm {

namespace {

using namespace sm90;

constexpr int TBN = 128;                  // output tile columns
constexpr int KB = 128;                   // FP8 values per stage row (128 bytes) = one scale block
constexpr int A_TILE = BM * KB;           // bytes
constexpr int STAGE = A_TILE + TBN * KB;  // bytes
// Tensor and row scaling run two blocks per SM (three stages each), so one block's epilogue
// overlaps the other's products; block scaling keeps a second accumulator and runs one (five stages).
template <int MODE>
constexpr int stages() { return MODE == int(Fp8ScaleMode::block) ? 5 : 3; }
template <int MODE>
constexpr int smem_bytes() { return stages<MODE>() * STAGE + 1024 + 64; }

template <int AFMT>
__device__ __forceinline__ void mma_k32(float (&d)[64], uint64_t a, uint64_t b, int accumulate) {
  if constexpr (AFMT == 0) wgmma_m64n128k32_e4m3_e4m3(d, a, b, accumulate);
  else wgmma_m64n128k32_e5m2_e4m3(d, a, b, accumulate);
}

// One stage's products: 4 k32 steps over the 128-byte rows.
template <int AFMT>
__device__ __forceinline__ void mma_stage(float (&d)[64], uint32_t sa, uint32_t sb, bool overwrite) {
#pragma unroll
  for (int kk = 0; kk < KB / 32; ++kk)
    mma_k32<AFMT>(d, wgmma_desc_kmajor_sw128(sa + kk * 32), wgmma_desc_kmajor_sw128(sb + kk * 32),
                  overwrite && kk == 0 ? 0 : 1);
}

template <class TC>
__device__ __forceinline__ void store2(TC* p, float v0, float v1, bool accumulate) {
  if constexpr (std::is_same_v<TC, float>) {
    float2 o = make_float2(v0, v1);
    if (accumulate) {
      const float2 old = *reinterpret_cast<const float2*>(p);
      o.x += old.x, o.y += old.y;
    }
    *reinterpret_cast<float2*>(p) = o;
  } else {
    if (accumulate) {
      const float2 old = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(p));
      v0 += old.x, v1 += old.y;
    }
    *reinterpret_cast<__nv_bfloat162*>(p) = __floats2bfloat162_rn(v0, v1);
  }
}

// The forward kernel's epilogues (Fp8Epilogue): store C; also raise relu²(C)'s amax; store
// relu2_bwd(H, C).
enum Fp8Epi : int { kEpiStore, kEpiRelu2Amax, kEpiRelu2Bwd };

// Forward / data gradient: C[rows of e] = deq(A) deq(W[e])^T, persistent over the output tiles
// (the step sequence g runs over all of a block's tiles, as in the BF16 persistent kernel).
template <int MODE, int AFMT, class TC, int EPI>
__global__ void __launch_bounds__(THREADS, MODE == int(Fp8ScaleMode::block) ? 1 : 2)
    fp8_grouped_fwd_kernel(const __grid_constant__ CUtensorMap map_a, const __grid_constant__ CUtensorMap map_b, TC* C,
                           const int32_t* offsets, int E, int N, int K, int64_t R, Fp8GroupedScales sc,
                           Fp8Epilogue epi) {
  static_assert(EPI == kEpiStore || std::is_same_v<TC, bf16>, "the ReLU² epilogues write bf16");
  constexpr int TST = stages<MODE>();
  constexpr bool kBlock = MODE == int(Fp8ScaleMode::block);
  extern __shared__ char smem_raw[];
  const int n_tiles_n = (N + TBN - 1) / TBN;
  FwdTile cur = fwd_tile<TBN>(blockIdx.x, offsets, E, n_tiles_n);
  if (!cur.valid) return;
  const uint32_t s0 = (smem_u32(smem_raw) + 1023) & ~1023u;
  const uint32_t bars = s0 + TST * STAGE;
  const int ktiles = (K + KB - 1) / KB;
  const bool leader = threadIdx.x == 0;
  init_stage_barriers(bars, TST, leader);
  int p_t = blockIdx.x, p_k = 0, p_g = 0;
  FwdTile p_tile = cur;
  auto produce = [&] {
    if (!p_tile.valid) return;
    const int st = p_g % TST;
    const uint32_t sa = s0 + st * STAGE, bar = bars + st * 8;
    mbar_expect_tx(bar, STAGE);
    tma_load_2d(sa, &map_a, p_k * KB, p_tile.row0, bar);
    tma_load_2d(sa + A_TILE, &map_b, p_k * KB, p_tile.e * N + p_tile.n0, bar);
    ++p_g;
    if (++p_k == ktiles) {
      p_k = 0;
      p_t += gridDim.x;
      p_tile = fwd_tile<TBN>(p_t, offsets, E, n_tiles_n);
    }
  };
  if (leader)
    for (int st = 0; st < TST; ++st) produce();
  const int wg = threadIdx.x >> 7;
  const int w = (threadIdx.x >> 5) & 3, lane = threadIdx.x & 31, g4 = lane >> 2, t4 = lane & 3;
  const int w_rows = (N + 127) / 128;  // 128-row weight blocks per expert (block mode)
  // The ReLU² epilogues' amax over this thread's values (all >= 0) of the tiles of one expert in a
  // row; a warp raises it once per such run (its rows all belong to the tile's expert).
  float run_max = 0.0f;
  int run_e = cur.e;
  auto flush_run = [&] {
    float m = run_max;
    if constexpr (EPI == kEpiRelu2Amax) {  // rounding is monotonic: relu²(stored(max)), stored, is the largest
      const float r = stored<bf16>(m);
      m = stored<bf16>(r * r);
    }
    m = warp_max(m);
    unsigned* amax = EPI == kEpiRelu2Amax ? epi.relu2_amax : epi.out_amax;
    if (lane == 0 && amax) raise_amax(amax + run_e, m);
    run_max = 0.0f;
  };
  int g = 0;
  for (int t = blockIdx.x; cur.valid; t += gridDim.x, cur = fwd_tile<TBN>(t, offsets, E, n_tiles_n)) {
    if constexpr (EPI != kEpiStore)
      if (cur.e != run_e) {
        flush_run();
        run_e = cur.e;
      }
    if constexpr (EPI == kEpiRelu2Bwd) {
      // The tile's h into L2 while its products run (two 128-byte lines of a row a thread), so
      // the epilogue's reads of it wait on L2, not DRAM.
      const int r = threadIdx.x >> 1, n = cur.n0 + 64 * (threadIdx.x & 1);
      if (r < cur.rows && n < N)
        asm volatile("prefetch.global.L2 [%0];" ::"l"(static_cast<const bf16*>(epi.relu2_input) +
                                                      (int64_t(cur.row0) + r) * N + n));
    }
    float acc[64];
#pragma unroll
    for (int i = 0; i < 64; ++i) acc[i] = 0.f;
    for (int kt = 0; kt < ktiles; ++kt, ++g) {
      const int st = g % TST;
      mbar_wait(bars + st * 8, uint32_t((g / TST) & 1));
      const uint32_t sa = s0 + st * STAGE + wg * 64 * KB, sb = s0 + st * STAGE + A_TILE;
      wgmma_fence();
      if constexpr (kBlock) {
        float part[64];
        mma_stage<AFMT>(part, sa, sb, true);
        wgmma_commit();
        // This k-block's scales, read while the products run: one weight block, a row each.
        const float sw = sc.w[(int64_t(cur.e) * w_rows + cur.n0 / 128) * sc.w_kb_stride + kt];
        float f[2];
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const int m = wg * 64 + w * 16 + g4 + h * 8;
          f[h] = m < cur.rows ? sc.a[int64_t(kt) * R + cur.row0 + m] * sw : 0.0f;
        }
        wgmma_wait<0>();
#pragma unroll
        for (int i = 0; i < 64; ++i) acc[i] = fmaf(part[i], f[(i >> 1) & 1], acc[i]);
      } else {
        mma_stage<AFMT>(acc, sa, sb, false);
        wgmma_commit();
        wgmma_wait<1>();  // step g - 1 is done: its stage may be refilled
      }
      __syncthreads();
      if (leader && g >= 1) produce();
    }
    // The ReLU² backward's h at this thread's places of a row of the tile (8 columns of each
    // 32-column group, as store_row_bf16 hands them out), loaded ahead: row 0's while the last
    // products run, row 1's while row 0 is stored (loaded where it is used, each load's latency
    // stood between a row's stores; both rows at once spill).
    constexpr int kGroups = TBN / 32;
    uint4 h_pre[kGroups];
    auto load_h = [&](int h, uint4 (&dst)[kGroups]) {
      const int m = wg * 64 + w * 16 + g4 + h * 8;
      const bf16* h_row = static_cast<const bf16*>(epi.relu2_input) + (int64_t(cur.row0) + m) * N;
#pragma unroll
      for (int q = 0; q < kGroups; ++q) {
        const int n = cur.n0 + 32 * q + 8 * t4;
        dst[q] = m < cur.rows && n < N ? __ldg(reinterpret_cast<const uint4*>(h_row + n)) : make_uint4(0, 0, 0, 0);
      }
    };
    if constexpr (EPI == kEpiRelu2Bwd) load_h(0, h_pre);
    wgmma_wait<0>();
    float tensor_f = 1.0f;
    if constexpr (MODE == int(Fp8ScaleMode::tensor)) tensor_f = sc.a[cur.e] * sc.w[cur.e];
    TC* c_base = C + int64_t(cur.row0) * N;
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      uint4 h_next[kGroups];
      if constexpr (EPI == kEpiRelu2Bwd)
        if (h == 0) load_h(1, h_next);
      const int m = wg * 64 + w * 16 + g4 + h * 8;
      if (m >= cur.rows) continue;  // the same for the four lanes of a quad (one row)
      float fr = tensor_f;
      if constexpr (MODE == int(Fp8ScaleMode::row)) fr = sc.a[cur.row0 + m];
      auto scaled = [&](int j, int i) {  // accumulator value i (0, 1) of step j, dequantized
        float f = fr;
        if constexpr (MODE == int(Fp8ScaleMode::row)) {
          const int n = cur.n0 + j * 8 + 2 * t4 + i;
          f *= n < N ? sc.w[int64_t(cur.e) * N + n] : 0.0f;
        }
        return acc[4 * j + 2 * h + i] * f;
      };
      if constexpr (std::is_same_v<TC, bf16>) {
        float v[TBN / 8][2];
#pragma unroll
        for (int j = 0; j < TBN / 8; ++j) v[j][0] = scaled(j, 0), v[j][1] = scaled(j, 1);
        TC* c_row = c_base + int64_t(m) * N;
        if constexpr (EPI == kEpiRelu2Bwd) {
          store_row_bf16(c_row, cur.n0, N, v, lane, [&](int q, int, uint32_t (&w)[4]) { relu2_bwd8(w, h_pre[q], run_max); });
          if (h == 0)
#pragma unroll
            for (int q = 0; q < kGroups; ++q) h_pre[q] = h_next[q];
        } else {
          if constexpr (EPI == kEpiRelu2Amax)  // columns past N hold zeros (TMA fills them)
#pragma unroll
            for (int j = 0; j < TBN / 8; ++j) run_max = fmaxf(run_max, fmaxf(v[j][0], v[j][1]));
          store_row_bf16(c_row, cur.n0, N, v, lane);  // whole sectors
        }
      } else {
#pragma unroll
        for (int j = 0; j < TBN / 8; ++j) {  // f32 pairs of a quad already fill a sector
          const int n = cur.n0 + j * 8 + 2 * t4;
          if (n < N) store2(c_base + int64_t(m) * N + n, scaled(j, 0), scaled(j, 1), false);
        }
      }
    }
  }
  if constexpr (EPI != kEpiStore) flush_run();
}

// Weight gradient: dW[e] (N x K) += deq(dYt_e) deq(Xt_e)^T over the expert's padded token
// segment, one block per (K tile, N tile, expert).
template <int MODE, int AFMT, class TC>
__global__ void __launch_bounds__(THREADS, MODE == int(Fp8ScaleMode::block) ? 1 : 2)
    fp8_grouped_wgrad_kernel(const __grid_constant__ CUtensorMap map_dy, const __grid_constant__ CUtensorMap map_x,
                             TC* dW, const int32_t* padded, int N, int K, Fp8GroupedScales sc) {
  constexpr int TST = stages<MODE>();
  constexpr bool kBlock = MODE == int(Fp8ScaleMode::block);
  extern __shared__ char smem_raw[];
  __shared__ int by_size[kWgradOrderedExperts];
  const WgradTile wt = wgrad_tile_by_size<TBN>(padded, by_size);  // largest expert first
  const int e = wt.e, m0 = wt.m0, n0 = wt.n0;
  const int p_begin = padded[e];
  const int ktiles = (padded[e + 1] - p_begin) / KB;
  if (ktiles == 0) return;  // no tokens: dW[e] stays as it is
  const uint32_t s0 = (smem_u32(smem_raw) + 1023) & ~1023u;
  const uint32_t bars = s0 + TST * STAGE;
  const bool leader = threadIdx.x == 0;
  init_stage_barriers(bars, TST, leader);
  auto issue = [&](int st, int kt) {
    const uint32_t sa = s0 + st * STAGE, bar = bars + st * 8;
    mbar_expect_tx(bar, STAGE);
    tma_load_2d(sa, &map_dy, p_begin + kt * KB, m0, bar);
    tma_load_2d(sa + A_TILE, &map_x, p_begin + kt * KB, n0, bar);
  };
  if (leader)
    for (int st = 0; st < TST && st < ktiles; ++st) issue(st, st);
  const int wg = threadIdx.x >> 7;
  const int w = (threadIdx.x >> 5) & 3, lane = threadIdx.x & 31, g4 = lane >> 2, t4 = lane & 3;
  float acc[64];
#pragma unroll
  for (int i = 0; i < 64; ++i) acc[i] = 0.f;
  for (int kt = 0; kt < ktiles; ++kt) {
    const int st = kt % TST;
    mbar_wait(bars + st * 8, uint32_t((kt / TST) & 1));
    const uint32_t sa = s0 + st * STAGE + wg * 64 * KB, sb = s0 + st * STAGE + A_TILE;
    wgmma_fence();
    if constexpr (kBlock) {
      float part[64];
      mma_stage<AFMT>(part, sa, sb, true);
      wgmma_commit();
      // Scales of this 128-token block: one per output row (dY^T) and one per column (X^T).
      const int64_t pb = p_begin / KB + kt;
      float fa[2], fb[TBN / 4];
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int m = m0 + wg * 64 + w * 16 + g4 + h * 8;
        fa[h] = m < N ? sc.a[pb * N + m] : 0.0f;
      }
#pragma unroll
      for (int j = 0; j < TBN / 8; ++j)
#pragma unroll
        for (int q = 0; q < 2; ++q) {
          const int n = n0 + j * 8 + 2 * t4 + q;
          fb[2 * j + q] = n < K ? sc.w[pb * K + n] : 0.0f;
        }
      wgmma_wait<0>();
#pragma unroll
      for (int j = 0; j < TBN / 8; ++j)
#pragma unroll
        for (int h = 0; h < 2; ++h)
#pragma unroll
          for (int q = 0; q < 2; ++q) {
            const int i = 4 * j + 2 * h + q;
            acc[i] = fmaf(part[i], fa[h] * fb[2 * j + q], acc[i]);
          }
    } else {
      mma_stage<AFMT>(acc, sa, sb, false);
      wgmma_commit();
      wgmma_wait<1>();
    }
    __syncthreads();
    if (leader && kt >= 1 && kt - 1 + TST < ktiles) issue((kt - 1) % TST, kt - 1 + TST);
  }
  wgmma_wait<0>();
  TC* base = dW + int64_t(e) * N * K;
  float tensor_f = 1.0f;
  if constexpr (MODE == int(Fp8ScaleMode::tensor)) tensor_f = sc.a[e] * sc.w[e];
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int m = m0 + wg * 64 + w * 16 + g4 + h * 8;
    if (m >= N) continue;
    float fr = tensor_f;
    if constexpr (MODE == int(Fp8ScaleMode::row)) fr = sc.a[int64_t(e) * N + m];
#pragma unroll
    for (int j = 0; j < TBN / 8; ++j) {
      const int n = n0 + j * 8 + 2 * t4;
      if (n >= K) continue;
      float f0 = fr, f1 = fr;
      if constexpr (MODE == int(Fp8ScaleMode::row)) {
        f0 *= sc.w[int64_t(e) * K + n];
        f1 *= sc.w[int64_t(e) * K + n + 1];
      }
      store2(base + int64_t(m) * K + n, acc[4 * j + 2 * h] * f0, acc[4 * j + 2 * h + 1] * f1, true);
    }
  }
}

__global__ void padded_offsets_kernel(const int32_t* offsets, int E, int32_t* padded) {
  if (threadIdx.x != 0) return;
  int32_t p = 0;
  for (int e = 0; e < E; ++e) {
    padded[e] = p;
    p += (offsets[e + 1] - offsets[e] + KB - 1) / KB * KB;
  }
  padded[E] = p;
}

// Columns per block of the amax pre-pass and of block scaling's segment codes without a straight
// copy: 64 keeps the f32 tile at 33 KB (six blocks an SM). With the straight copy block scaling
// takes 128, so each straight 1x128 group lies inside one block.
constexpr int SEG_COLS = 64;

// Padded 128-token block p of an expert-segmented x: its expert, first token and how many of
// its 128 tokens exist (the rest are the segment's zero padding).
struct SegmentBlock {
  int e = 0;
  int64_t t0 = 0;
  int valid = 0;
};
// Called by the whole block (it synchronizes): the threads test the experts' segments in parallel,
// one round of loads rather than a walk over E dependent ones at the start of every block.
__device__ __forceinline__ SegmentBlock segment_block(int64_t prow, const int32_t* offsets, const int32_t* padded, int E) {
  __shared__ int block_expert;
  for (int e = threadIdx.x; e < E; e += blockDim.x)
    if (padded[e] <= prow && prow < padded[e + 1]) block_expert = e;  // exactly one (empty segments never hold prow)
  __syncthreads();
  SegmentBlock b;
  b.e = block_expert;
  b.t0 = offsets[b.e] + (prow - padded[b.e]);
  b.valid = int(offsets[b.e + 1] - b.t0 < KB ? offsets[b.e + 1] - b.t0 : KB);
  return b;
}

// The operand as quantization reads it: x itself, or with kRelu2 (the down projection's operand
// folded into its quantization) relu²(x) rounded to bf16, as relu2_fwd stores it.
template <bool kRelu2>
__device__ __forceinline__ void operand_values(float (&v)[8]) {
  if constexpr (kRelu2)
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      const float r = fmaxf(v[j], 0.f);
      v[j] = stored<bf16>(r * r);
    }
}

// The amax pre-pass of tensor and row scaling, from registers: block (column tile of SEG_COLS,
// padded 128-token block) max-reduces its columns into the expert's amax (tensor: amax[e]; row:
// amax[e * C + column]) and, given row_amax, each token's amax over these columns into
// row_amax[token] (the straight copy's row groups). Eight lanes of eight columns a row.
template <class T, bool kRelu2>
__global__ void __launch_bounds__(256)
    segments_amax_kernel(const T* __restrict__ x, int C, const int32_t* __restrict__ offsets,
                         const int32_t* __restrict__ padded, int E, int mode, unsigned* __restrict__ amax,
                         unsigned* __restrict__ row_amax) {
  constexpr int kLanes = SEG_COLS / 8, kRowsAtOnce = 256 / kLanes, kBatch = KB / kRowsAtOnce;  // 8, 32, 4
  __shared__ float col_part[kRowsAtOnce][SEG_COLS];
  __shared__ float shm[32];
  const int64_t prow = int64_t(blockIdx.y) * KB;
  if (prow >= padded[E]) return;
  const SegmentBlock b = segment_block(prow, offsets, padded, E);
  const int tid = threadIdx.x, cv = tid % kLanes, ty = tid / kLanes;
  const int c0 = blockIdx.x * SEG_COLS, c = c0 + 8 * cv;
  float v[kBatch][8];
#pragma unroll
  for (int u = 0; u < kBatch; ++u) {
    const int r = ty + kRowsAtOnce * u;
    if (r < b.valid && c < C) load8(x + (b.t0 + r) * C + c, v[u]);
    else
#pragma unroll
      for (int j = 0; j < 8; ++j) v[u][j] = 0.0f;
  }
#pragma unroll
  for (int u = 0; u < kBatch; ++u) operand_values<kRelu2>(v[u]);  // after the loads: all in flight at once
  float cm[8] = {0, 0, 0, 0, 0, 0, 0, 0};
#pragma unroll
  for (int u = 0; u < kBatch; ++u) {
    float m = 0.0f;
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      m = fmaxf(m, fabsf(v[u][j]));
      cm[j] = fmaxf(cm[j], fabsf(v[u][j]));
    }
    if (row_amax) {
#pragma unroll
      for (int o = kLanes / 2; o > 0; o >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, o));
      const int r = ty + kRowsAtOnce * u;
      if (cv == 0 && r < b.valid) atomicMax(row_amax + b.t0 + r, __float_as_uint(m));
    }
  }
#pragma unroll
  for (int j = 0; j < 8; ++j) col_part[ty][8 * cv + j] = cm[j];
  __syncthreads();
  float m = 0.0f;
  if (tid < SEG_COLS)
#pragma unroll
    for (int k = 0; k < kRowsAtOnce; ++k) m = fmaxf(m, col_part[k][tid]);
  if (Fp8ScaleMode(mode) == Fp8ScaleMode::row) {
    if (tid < SEG_COLS && c0 + tid < C) atomicMax(amax + int64_t(b.e) * C + c0 + tid, __float_as_uint(m));
  } else {
    m = block_max(m, shm);
    if (tid == 0) atomicMax(amax + b.e, __float_as_uint(m));
  }
}

// Block scaling's codes of an expert-segmented x [R, C], transposed and padded: block (column
// tile of COLS, padded 128-token block p) stages its 128 tokens x COLS columns in f32 (zeros past
// the expert's tokens), takes each 1x128 group's amax from the staged column, and writes them
// transposed, 128 tokens of a column per warp as 32 four-code stores, with the scales the wgrad
// kernel reads. kStraight (COLS = 128) also writes the straight copy [R, C] of the same tokens,
// which the data gradient reads, its 1x128 groups from the staged row. Tensor and row scaling
// take segments_codes_scaled_kernel below.
template <class T, int kFormat, int COLS, bool kStraight, bool kRelu2>
__global__ void __launch_bounds__(256)
    segments_codes_kernel(const T* __restrict__ x, int C, const int32_t* __restrict__ offsets,
                          const int32_t* __restrict__ padded, int E, int64_t Rp, uint8_t* __restrict__ out,
                          float* __restrict__ scale, StraightCopy straight, float fmax) {
  static_assert(!kStraight || COLS == 128, "a straight 1x128 group must lie inside one block");
  extern __shared__ float tile_smem[];  // [KB][COLS + 1] f32 (odd row stride)
  auto tile = [&](int r, int c) -> float& { return tile_smem[r * (COLS + 1) + c]; };
  __shared__ float mult[COLS], mult_s[kStraight ? KB : 1];
  const int64_t prow = int64_t(blockIdx.y) * KB;
  if (prow >= padded[E]) return;
  const SegmentBlock b = segment_block(prow, offsets, padded, E);
  const int c0 = blockIdx.x * COLS;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  constexpr int kVecs = KB * (COLS / 8) / 256, kBatch = kVecs < 4 ? kVecs : 4;
#pragma unroll
  for (int b0 = 0; b0 < kVecs; b0 += kBatch) {
    float v[kBatch][8];
#pragma unroll
    for (int u = 0; u < kBatch; ++u) {
      const int i = tid + (b0 + u) * 256, r = i / (COLS / 8), c = (i % (COLS / 8)) * 8;
      if (r < b.valid && c0 + c < C) load8(x + (b.t0 + r) * C + c0 + c, v[u]);
      else
#pragma unroll
        for (int j = 0; j < 8; ++j) v[u][j] = 0.0f;
    }
#pragma unroll
    for (int u = 0; u < kBatch; ++u) operand_values<kRelu2>(v[u]);
#pragma unroll
    for (int u = 0; u < kBatch; ++u) {
      const int i = tid + (b0 + u) * 256, r = i / (COLS / 8), c = (i % (COLS / 8)) * 8;
#pragma unroll
      for (int j = 0; j < 8; ++j) tile(r, c + j) = v[u][j];
    }
  }
  __syncthreads();
  for (int c = warp; c < COLS; c += 8) {
    float a = 0.0f;
#pragma unroll
    for (int j = 0; j < 4; ++j) a = fmaxf(a, fabsf(tile(lane + 32 * j, c)));
    a = warp_max(a);
    if (lane == 0) mult[c] = multiplier_of(a, fmax);
  }
  if constexpr (kStraight) {
    for (int r = warp; r < KB; r += 8) {
      float a = 0.0f;
#pragma unroll
      for (int j = 0; j < COLS / 32; ++j) a = fmaxf(a, fabsf(tile(r, lane + 32 * j)));
      a = warp_max(a);
      if (lane == 0) mult_s[r] = multiplier_of(a, fmax);
    }
  }
  __syncthreads();
  for (int c = warp; c < COLS; c += 8) {
    if (c0 + c >= C) continue;
    const int r = 4 * lane;
    const float q = mult[c];
    const uint32_t codes = encode4<kFormat>(__fmul_rn(tile(r, c), q), __fmul_rn(tile(r + 1, c), q),
                                            __fmul_rn(tile(r + 2, c), q), __fmul_rn(tile(r + 3, c), q));
    *reinterpret_cast<uint32_t*>(out + int64_t(c0 + c) * Rp + prow + r) = codes;
  }
  for (int c = tid; c < COLS && c0 + c < C; c += 256) scale[int64_t(blockIdx.y) * C + c0 + c] = __fdiv_rn(1.0f, mult[c]);
  if constexpr (kStraight) {
    // Tokens of this block, four codes a lane; the segment's padding has no straight rows.
    for (int i = tid; i < KB * (COLS / 4); i += 256) {
      const int r = i / (COLS / 4), c = (i % (COLS / 4)) * 4;
      if (r >= b.valid || c0 + c >= C) continue;
      const float q = mult_s[r];
      const uint32_t codes = encode4<kFormat>(__fmul_rn(tile(r, c), q), __fmul_rn(tile(r, c + 1), q),
                                              __fmul_rn(tile(r, c + 2), q), __fmul_rn(tile(r, c + 3), q));
      *reinterpret_cast<uint32_t*>(straight.out + (b.t0 + r) * C + c0 + c) = codes;
    }
    for (int r = tid; r < b.valid; r += 256) straight.scale[int64_t(c0 / 128) * straight.R + b.t0 + r] = __fdiv_rn(1.0f, mult_s[r]);
  }
}

template <class Kernel>
void raise_smem_once(Kernel kernel, int bytes) {
  static std::set<const void*> done;
  if (done.insert(reinterpret_cast<const void*>(kernel)).second)
    MOELAB_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes));
}

// Picks the kernel instance for (scale mode, A format, output type) and launches it.
template <template <int, int, class> class Launch, class... Args>
void dispatch(Fp8ScaleMode mode, DType a_format, DType c_dtype, Args&&... args) {
  auto with_c = [&](auto mode_c, auto fmt_c) {
    if (c_dtype == DType::f32) Launch<decltype(mode_c)::value, decltype(fmt_c)::value, float>::run(args...);
    else Launch<decltype(mode_c)::value, decltype(fmt_c)::value, bf16>::run(args...);
  };
  auto with_fmt = [&](auto mode_c) {
    if (a_format == DType::e5m2) with_c(mode_c, std::integral_constant<int, 1>{});
    else with_c(mode_c, std::integral_constant<int, 0>{});
  };
  switch (mode) {
    case Fp8ScaleMode::tensor: with_fmt(std::integral_constant<int, 0>{}); break;
    case Fp8ScaleMode::row: with_fmt(std::integral_constant<int, 1>{}); break;
    case Fp8ScaleMode::block: with_fmt(std::integral_constant<int, 2>{}); break;
  }
}

template <int MODE, int AFMT, class TC>
struct LaunchForward {
  template <int EPI>
  static void launch(const CUtensorMap& ma, const CUtensorMap& mb, void* C, const int32_t* offsets, int E, int N, int K,
                     int64_t R, const Fp8GroupedScales& sc, int sms, cudaStream_t stream, const Fp8Epilogue& epi) {
    auto kernel = fp8_grouped_fwd_kernel<MODE, AFMT, TC, EPI>;
    constexpr int smem = smem_bytes<MODE>();
    raise_smem_once(kernel, smem);
    const int per_sm = MODE == int(Fp8ScaleMode::block) ? 1 : 2;
    const int64_t tiles_max = int64_t((N + TBN - 1) / TBN) * ((R + BM - 1) / BM + E);
    const unsigned grid = unsigned(std::min<int64_t>(tiles_max, int64_t(sms) * per_sm));
    kernel<<<grid, THREADS, smem, stream>>>(ma, mb, static_cast<TC*>(C), offsets, E, N, K, R, sc, epi);
    MOELAB_CUDA_LAUNCH_CHECK("fp8_grouped_fwd_kernel");
  }
  static void run(const CUtensorMap& ma, const CUtensorMap& mb, void* C, const int32_t* offsets, int E, int N, int K,
                  int64_t R, const Fp8GroupedScales& sc, int sms, cudaStream_t stream, const Fp8Epilogue& epi) {
    if constexpr (std::is_same_v<TC, bf16>) {
      // The up projection's amax epilogue reads e4m3 activations; the ReLU² backward, a gradient.
      if constexpr (AFMT == 0)
        if (epi.relu2_amax) return launch<kEpiRelu2Amax>(ma, mb, C, offsets, E, N, K, R, sc, sms, stream, epi);
      if (epi.relu2_input) return launch<kEpiRelu2Bwd>(ma, mb, C, offsets, E, N, K, R, sc, sms, stream, epi);
    }
    MOELAB_CHECK(!epi.relu2_amax && !epi.relu2_input, "forward_fp8: the ReLU² epilogues need a bf16 C (and the amax one e4m3 A)");
    launch<kEpiStore>(ma, mb, C, offsets, E, N, K, R, sc, sms, stream, epi);
  }
};

template <int MODE, int AFMT, class TC>
struct LaunchWgrad {
  static void run(const CUtensorMap& my, const CUtensorMap& mx, void* dW, const int32_t* padded, int E, int N, int K,
                  const Fp8GroupedScales& sc, cudaStream_t stream) {
    auto kernel = fp8_grouped_wgrad_kernel<MODE, AFMT, TC>;
    constexpr int smem = smem_bytes<MODE>();
    raise_smem_once(kernel, smem);
    const dim3 grid(unsigned((K + TBN - 1) / TBN), unsigned((N + BM - 1) / BM), unsigned(E));
    kernel<<<grid, THREADS, smem, stream>>>(my, mx, static_cast<TC*>(dW), padded, N, K, sc);
    MOELAB_CUDA_LAUNCH_CHECK("fp8_grouped_wgrad_kernel");
  }
};

}  // namespace

void forward_fp8(const uint8_t* A, DType a_format, const uint8_t* W, const Fp8GroupedScales& scales, void* C,
                 DType c_dtype, const int32_t* offsets, int E, int64_t R, int N, int K, int sms, cudaStream_t stream,
                 const Fp8Epilogue& epilogue) {
  const CUtensorMap ma = make_map_fp8(A, R, K, BM), mb = make_map_fp8(W, int64_t(E) * N, K, TBN);
  dispatch<LaunchForward>(scales.mode, a_format, c_dtype, ma, mb, C, offsets, E, N, K, R, scales, sms, stream, epilogue);
}

void padded_offsets(const int32_t* offsets, int E, int32_t* padded, cudaStream_t stream) {
  padded_offsets_kernel<<<1, 32, 0, stream>>>(offsets, E, padded);
  MOELAB_CUDA_LAUNCH_CHECK("padded_offsets_kernel");
}

void wgrad_fp8(const uint8_t* dYt, DType dy_format, const uint8_t* Xt, const Fp8GroupedScales& scales, void* dW,
               DType dw_dtype, const int32_t* padded, int E, int64_t Rp, int N, int K, cudaStream_t stream) {
  const CUtensorMap my = make_map_fp8(dYt, N, Rp, BM), mx = make_map_fp8(Xt, K, Rp, TBN);
  dispatch<LaunchWgrad>(scales.mode, dy_format, dw_dtype, my, mx, dW, padded, E, N, K, scales, stream);
}

// Tensor and row scaling know every multiplier before the block reads x (the pre-pass amax), so
// their codes come straight from registers, without the f32 tile above (which ran at about
// 1.2 TB/s): a thread reads four tokens x 8 columns, writes its straight codes to global memory
// with the row multipliers, and its transposed codes to shared memory as one 32-bit word of four
// tokens per column (word_slot's swizzle); then each warp stores whole columns of 128 tokens.
constexpr int SCALED_COLS = 128;

template <class T, int kFormat, bool kStraight, bool kRelu2>
__global__ void __launch_bounds__(256)
    segments_codes_scaled_kernel(const T* __restrict__ x, int C, const int32_t* __restrict__ offsets,
                                 const int32_t* __restrict__ padded, int E, int64_t Rp, int mode,
                                 uint8_t* __restrict__ out, float* __restrict__ scale, const unsigned* __restrict__ amax,
                                 StraightCopy straight, float fmax) {
  __shared__ uint32_t words[SCALED_COLS][KB / 4];  // [column][four-token word, swizzled]
  const int64_t prow = int64_t(blockIdx.y) * KB;
  if (prow >= padded[E]) return;
  const SegmentBlock b = segment_block(prow, offsets, padded, E);
  const bool row_mode = Fp8ScaleMode(mode) == Fp8ScaleMode::row;
  const int c0 = blockIdx.x * SCALED_COLS;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int cg = tid % (SCALED_COLS / 8), c = c0 + 8 * cg;  // this thread's 8 columns
  const bool col_ok = c < C;
  const float expert_mult = row_mode ? 0.0f : multiplier_of(__uint_as_float(amax[b.e]), fmax);
  float col_mult[8];  // the transposed copy's multipliers of the 8 columns
#pragma unroll
  for (int j = 0; j < 8; ++j)
    col_mult[j] = !row_mode ? expert_mult
                  : col_ok  ? multiplier_of(__uint_as_float(amax[int64_t(b.e) * C + c + j]), fmax)
                            : 0.0f;
#pragma unroll
  for (int pass = 0; pass < 2; ++pass) {
    const int q = pass * (KB / 8) + tid / (SCALED_COLS / 8);  // four-token word: tokens 4q .. 4q + 3
    float v[4][8];
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int r = 4 * q + i;
      if (r < b.valid && col_ok) load8(x + (b.t0 + r) * C + c, v[i]);
      else
#pragma unroll
        for (int j = 0; j < 8; ++j) v[i][j] = 0.0f;  // the segment's padding
    }
#pragma unroll
    for (int i = 0; i < 4; ++i) operand_values<kRelu2>(v[i]);  // relu²(0) = 0 keeps the padding
    if constexpr (kStraight) {
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int r = 4 * q + i;
        if (r >= b.valid || !col_ok) continue;
        const float m = row_mode ? multiplier_of(__uint_as_float(straight.row_amax[b.t0 + r]), fmax) : expert_mult;
        *reinterpret_cast<uint2*>(straight.out + (b.t0 + r) * C + c) = encode8<kFormat>(v[i], m);
      }
    }
#pragma unroll
    for (int j = 0; j < 8; ++j) words[8 * cg + j][word_slot(q, cg)] = encode_column4<kFormat>(v, j, col_mult[j]);
  }
  __syncthreads();
  for (int col = warp; col < SCALED_COLS && c0 + col < C; col += 8)
    *reinterpret_cast<uint32_t*>(out + int64_t(c0 + col) * Rp + prow + 4 * lane) = words[col][word_slot(lane, col / 8)];
  const bool first_block = prow == padded[b.e];
  if (!row_mode) {
    if (first_block && blockIdx.x == 0 && tid == 0) scale[b.e] = __fdiv_rn(1.0f, expert_mult);
    return;
  }
  if (first_block && tid < SCALED_COLS / 8 && col_ok)
#pragma unroll
    for (int j = 0; j < 8; ++j) scale[int64_t(b.e) * C + c + j] = __fdiv_rn(1.0f, col_mult[j]);
  if (kStraight && blockIdx.x == 0)
    for (int r = tid; r < b.valid; r += 256)
      straight.scale[b.t0 + r] = __fdiv_rn(1.0f, multiplier_of(__uint_as_float(straight.row_amax[b.t0 + r]), fmax));
}

void quantize_segments_transposed(const void* x, int C, const int32_t* offsets, const int32_t* padded,
                                  int E, int64_t Rp, Fp8ScaleMode mode, DType format, uint8_t* out, float* scale,
                                  unsigned* amax, cudaStream_t stream, StraightCopy straight, bool amax_known,
                                  bool relu2_of_x) {
  const bool with_straight = straight.out != nullptr;
  const bf16* px = static_cast<const bf16*>(x);
  const float fmax = fp8_max(format);
  const bool e5m2 = format == DType::e5m2;
  MOELAB_CHECK(!amax_known || mode == Fp8ScaleMode::tensor, "a producer's expert amax serves tensor scaling only");
  MOELAB_CHECK(!relu2_of_x || (with_straight && !e5m2),
               "relu2_of_x quantizes the down projection's operand: e4m3 with the straight copy");
  if (mode != Fp8ScaleMode::block && !amax_known) {
    const size_t n = mode == Fp8ScaleMode::row ? size_t(E) * C : size_t(E);
    const bool rows = with_straight && mode == Fp8ScaleMode::row;
    unsigned* row_amax = rows ? amax + n : nullptr;
    MOELAB_CUDA_CHECK(cudaMemsetAsync(amax, 0, (n + (rows ? size_t(straight.R) : 0)) * sizeof(unsigned), stream));
    const dim3 grid(unsigned((C + SEG_COLS - 1) / SEG_COLS), unsigned(Rp / KB));
    auto amax_pass = relu2_of_x ? segments_amax_kernel<bf16, true> : segments_amax_kernel<bf16, false>;
    amax_pass<<<grid, 256, 0, stream>>>(px, C, offsets, padded, E, int(mode), amax, row_amax);
    MOELAB_CUDA_LAUNCH_CHECK("segments_amax_kernel");
    straight.row_amax = row_amax;
  }
  auto launch = [&](auto kernel, int cols) {
    const int smem = KB * (cols + 1) * int(sizeof(float));
    raise_smem_once(kernel, smem);
    const dim3 grid(unsigned((C + cols - 1) / cols), unsigned(Rp / KB));
    kernel<<<grid, 256, smem, stream>>>(px, C, offsets, padded, E, Rp, out, scale, straight, fmax);
    MOELAB_CUDA_LAUNCH_CHECK("segments_codes_kernel");
  };
  if (mode != Fp8ScaleMode::block) {
    const dim3 grid(unsigned((C + SCALED_COLS - 1) / SCALED_COLS), unsigned(Rp / KB));
    auto run = [&](auto kernel) {
      kernel<<<grid, 256, 0, stream>>>(px, C, offsets, padded, E, Rp, int(mode), out, scale, amax, straight, fmax);
      MOELAB_CUDA_LAUNCH_CHECK("segments_codes_scaled_kernel");
    };
    if (relu2_of_x) run(segments_codes_scaled_kernel<bf16, 0, true, true>);
    else if (with_straight)
      e5m2 ? run(segments_codes_scaled_kernel<bf16, 1, true, false>) : run(segments_codes_scaled_kernel<bf16, 0, true, false>);
    else e5m2 ? run(segments_codes_scaled_kernel<bf16, 1, false, false>) : run(segments_codes_scaled_kernel<bf16, 0, false, false>);
  } else if (relu2_of_x) {
    launch(segments_codes_kernel<bf16, 0, 128, true, true>, 128);
  } else if (!with_straight) {
    if (e5m2) launch(segments_codes_kernel<bf16, 1, SEG_COLS, false, false>, SEG_COLS);
    else launch(segments_codes_kernel<bf16, 0, SEG_COLS, false, false>, SEG_COLS);
  } else {
    if (e5m2) launch(segments_codes_kernel<bf16, 1, 128, true, false>, 128);
    else launch(segments_codes_kernel<bf16, 0, 128, true, false>, 128);
  }
}

}  // namespace grouped_gemm

// --- the backend ops ------------------------------------------------------------------------------

namespace {

// The kernels' scale mode for a granularity pair: the recipe's scaling it belongs to (Fp8Recipe).
grouped_gemm::Fp8ScaleMode scale_mode_of(Fp8Granularity token_side, Fp8Granularity weights, const char* op) {
  using M = grouped_gemm::Fp8ScaleMode;
  if (const std::optional<Fp8Scaling> s = fp8_scaling_of(token_side, weights)) {
    switch (*s) {
      case Fp8Scaling::tensorwise: return M::tensor;
      case Fp8Scaling::rowwise: return M::row;
      case Fp8Scaling::blockwise: return M::block;
    }
  }
  throw Error(std::string("cuda ") + op + ": granularity pair (" + fp8_granularity_name(token_side) + ", " +
              fp8_granularity_name(weights) + ") is not an FP8 recipe of the grouped GEMM; the recipes are "
              "tensorwise (tensor, tensor), rowwise (row, row) and blockwise (1x128, 128x128)");
}

// Scales of one operand in wgrad_fp8's padded segment layout (cols columns, Rp padded rows).
int64_t segment_scale_count(grouped_gemm::Fp8ScaleMode mode, int64_t cols, int E, int64_t Rp) {
  using M = grouped_gemm::Fp8ScaleMode;
  return mode == M::tensor ? int64_t(E) : mode == M::row ? E * cols : (Rp / 128) * cols;
}

// A tensor over backend scratch (no ownership).
Tensor device_view(void* p, Shape shape, DType dtype) {
  Tensor t;
  t.data = p;
  t.dtype = dtype;
  t.device = Device::cuda;
  t.shape = std::move(shape);
  return t;
}

int64_t scale_count(Fp8Granularity g, int64_t rows, int64_t k) {
  int64_t n = 1;
  for (int64_t d : fp8_scale_shape(g, rows, k)) n *= d;
  return n;
}

// Checks out as the form of W [E, N, K] that quantize_experts_fp8 writes (W_e, or W_e^T per
// expert with transpose): e4m3 [E, rows, k] with each expert's scales, rows of 16-byte multiples.
void check_experts_form(const Tensor& W, bool transpose, const QuantizedExperts& out, const char* op) {
  require_float(W, op, "W");
  require(W.ndim() == 3, op, "W must be [E, N, K], got " + W.describe());
  const int64_t E = W.dim(0), N = transpose ? W.dim(2) : W.dim(1), K = transpose ? W.dim(1) : W.dim(2);
  require_dtype(out.data, DType::e4m3, op, "out.data");
  require_dtype(out.scale, DType::f32, op, "out.scale");
  require(out.data.shape == Shape{E, N, K}, op,
          "out.data must be [" + std::to_string(E) + ", " + std::to_string(N) + ", " + std::to_string(K) + "] for W " +
              W.describe() + (transpose ? " transposed" : "") + ", got " + out.data.describe());
  require(out.scale.shape == Shape{E, scale_count(out.granularity, N, K)}, op,
          "out.scale must hold each expert's " + std::string(fp8_granularity_name(out.granularity)) + " scales, got " +
              out.scale.describe());
  require(N % 16 == 0 && K % 16 == 0, op, "N and K must be multiples of 16 (16-byte FP8 rows), got W " + W.describe());
}

}  // namespace

// Expert weights W [E, rows, cols] quantized expert by expert into out: K-major B operands of
// forward_fp8 (W_e as it is, or W_e^T per expert with transpose), e4m3, with their scales.
void CudaBackend::quantize_experts_fp8(const Tensor& W, bool transpose, QuantizedExperts& out) {
  check_experts_form(W, transpose, out, "quantize_experts_fp8");
  if (W.dim(0) == 0) return;
  quantize_fp8_batch(W.data, W.dtype, W.dim(0), W.dim(1), W.dim(2), transpose, out.granularity,
                     out.data.as<uint8_t>(), DType::e4m3, out.scale.as<float>(), nullptr, 0);
}

void CudaBackend::quantize_experts_fp8_pair(const Tensor& W, QuantizedExperts& straight, QuantizedExperts& transposed,
                                            const Tensor* amax) {
  const char* op = "quantize_experts_fp8_pair";
  check_experts_form(W, false, straight, op);
  check_experts_form(W, true, transposed, op);
  require(straight.granularity == transposed.granularity, op, "both forms take one granularity");
  const Fp8Granularity g = straight.granularity;
  // 128x128 blocks (and tiles) keep the two passes: their groups come from the tile itself.
  if (g != Fp8Granularity::tensor && g != Fp8Granularity::row)
    return Backend::quantize_experts_fp8_pair(W, straight, transposed);
  require(aligned16(W.data), op, "FP8 expert weights on the GPU need 16-byte aligned data, got " + W.describe());
  const int64_t E = W.dim(0), N = W.dim(1), K = W.dim(2);
  if (E == 0 || N == 0 || K == 0) return;
  const bool known = amax && g == Fp8Granularity::tensor;
  if (known)
    require(amax->dtype == DType::f32 && amax->numel() == E, op,
            "amax must be each expert's: f32 [" + std::to_string(E) + "], got " + amax->describe());
  quantize_fp8_pair_batch(W.data, W.dtype, E, N, K, g, straight.data.as<uint8_t>(), straight.scale.as<float>(),
                          transposed.data.as<uint8_t>(), transposed.scale.as<float>(), DType::e4m3,
                          known ? amax->as<unsigned>() : nullptr);
}

// forward_fp8's view of quantized expert weights.
CudaBackend::ExpertWeightsFp8 CudaBackend::expert_weights_of(const QuantizedExperts& W) {
  ExpertWeightsFp8 q;
  q.codes = W.data.as<uint8_t>();
  q.scales = W.scale.as<float>();
  q.kb_stride = int(((W.data.dim(2) + 127) / 128 + 3) / 4 * 4);
  return q;
}

namespace {

// The shapes of a grouped FP8 product C = A W_e^T (trans_w: W [E, N, K]) or A W_e (W [E, K, N]).
struct GroupedShape {
  int E = 0, N = 0, K = 0;
};

GroupedShape check_grouped_fp8(const Tensor& A, DType a_format, const QuantizedExperts& W, const Tensor& C,
                               const Tensor& offsets, const char* op) {
  require_dtype(A, DType::bf16, op, "A");
  require_dtype(W.data, DType::e4m3, op, "W.data (quantize_experts_fp8 makes it)");
  require_dtype(W.scale, DType::f32, op, "W.scale");
  require_float(C, op, "C");
  require_dtype(offsets, DType::i32, op, "offsets");
  require(a_format == DType::e4m3 || a_format == DType::e5m2, op,
          std::string("the token-side format must be e4m3 or e5m2, got ") + dtype_name(a_format));
  require(W.data.ndim() == 3, op, "W.data must be [E, N, K], got " + W.data.describe());
  GroupedShape g;
  g.E = int(W.data.dim(0));
  g.N = int(W.data.dim(1));
  g.K = int(W.data.dim(2));
  require(W.scale.shape == Shape{g.E, scale_count(W.granularity, g.N, g.K)}, op,
          "W.scale " + W.scale.describe() + " is not one set of scales per expert");
  require(offsets.numel() == g.E + 1, op, "offsets must be [E+1]");
  require(A.cols() == g.K && C.cols() == g.N && C.rows() == A.rows(), op,
          "A " + A.describe() + ", W " + W.data.describe() + ", C " + C.describe() + " do not agree");
  require(g.K % 16 == 0 && g.N % 16 == 0, op, "K and N must be multiples of 16 (16-byte FP8 rows)");
  return g;
}

void check_grouped_wgrad_fp8(const Tensor& dY, DType dy_format, const Tensor& X, const Tensor& dW, const Tensor& offsets,
                             const char* op) {
  require_dtype(dY, DType::bf16, op, "dY");
  require_dtype(X, DType::bf16, op, "X");
  require_float(dW, op, "dW");
  require_dtype(offsets, DType::i32, op, "offsets");
  require(dy_format == DType::e4m3 || dy_format == DType::e5m2, op,
          std::string("dy_format must be e4m3 or e5m2, got ") + dtype_name(dy_format));
  require(dW.ndim() == 3, op, "dW must be [E, N, K], got " + dW.describe());
  const int E = int(dW.dim(0)), N = int(dW.dim(1)), K = int(dW.dim(2));
  require(offsets.numel() == E + 1 && dY.cols() == N && X.cols() == K && dY.rows() == X.rows(), op,
          "dY " + dY.describe() + ", X " + X.describe() + ", dW " + dW.describe() + " do not agree");
  require(K % 16 == 0 && N % 16 == 0, op, "K and N must be multiples of 16 (16-byte FP8 rows)");
}

// Block scaling reads one 128x128 weight block per output tile, so N must be whole blocks.
void require_whole_weight_blocks(grouped_gemm::Fp8ScaleMode mode, int N, const char* op) {
  if (mode == grouped_gemm::Fp8ScaleMode::block)
    require(N % 128 == 0, op, "blockwise scaling needs N a multiple of 128 (whole weight blocks per output tile), got " +
                                  std::to_string(N));
}

grouped_gemm::Fp8ScaleMode wgrad_mode_of(Fp8Granularity gran, const char* op) {
  using M = grouped_gemm::Fp8ScaleMode;
  if (gran == Fp8Granularity::tensor) return M::tensor;
  if (gran == Fp8Granularity::row) return M::row;
  require(gran == Fp8Granularity::block_1x128, op,
          std::string("the weight gradient's operands take tensor, row or 1x128 scaling, got ") + fp8_granularity_name(gran));
  return M::block;
}

}  // namespace

void CudaBackend::grouped_matmul_fp8(const Tensor& A, DType a_format, Fp8Granularity a_gran, const Tensor& W,
                                     bool trans_w, Fp8Granularity w_gran, Tensor& C, const Tensor& offsets) {
  const char* op = "grouped_matmul_fp8";
  require_dtype(W, DType::bf16, op, "W (use the bf16 compute copy)");
  require(W.ndim() == 3, op, "W must be [E, N, K] or [E, K, N], got " + W.describe());
  const int64_t E = W.dim(0), N = trans_w ? W.dim(1) : W.dim(2), K = trans_w ? W.dim(2) : W.dim(1);
  QuantizedExperts qw;
  qw.granularity = w_gran;
  qw.data = device_view(scratch(ScratchSlot::fp8_grouped_b, size_t(E * N * K)), {E, N, K}, DType::e4m3);
  const int64_t nw = scale_count(w_gran, N, K);
  qw.scale = device_view(scratch(ScratchSlot::fp8_grouped_scale_b, size_t(E * nw) * sizeof(float)), {E, nw}, DType::f32);
  quantize_experts_fp8(W, !trans_w, qw);
  grouped_matmul_fp8(A, a_format, a_gran, qw, C, offsets);
}

void CudaBackend::grouped_matmul_fp8(const Tensor& A, DType a_format, Fp8Granularity a_gran, const QuantizedExperts& W,
                                     Tensor& C, const Tensor& offsets) {
  const char* op = "grouped_matmul_fp8";
  const GroupedShape g = check_grouped_fp8(A, a_format, W, C, offsets, op);
  const grouped_gemm::Fp8ScaleMode mode = scale_mode_of(a_gran, W.granularity, op);
  require_whole_weight_blocks(mode, g.N, op);
  const int64_t R = A.rows();
  if (R == 0) return;
  // Token-side operand: straight copy; tensor scaling takes one scale per expert segment.
  auto* qa = static_cast<uint8_t*>(scratch(ScratchSlot::fp8_grouped_a, size_t(R) * g.K));
  const int64_t na = a_gran == Fp8Granularity::tensor ? g.E : scale_count(a_gran, R, g.K);
  auto* sa = static_cast<float*>(scratch(ScratchSlot::fp8_grouped_scale_a, size_t(na) * sizeof(float)));
  const bool segments = a_gran == Fp8Granularity::tensor;
  quantize_fp8_batch(A.data, A.dtype, 1, R, g.K, false, a_gran, qa, a_format, sa, segments ? offsets.as<int32_t>() : nullptr,
                     segments ? g.E : 0);
  const ExpertWeightsFp8 qw = expert_weights_of(W);
  grouped_gemm::Fp8GroupedScales sc;
  sc.mode = mode;
  sc.a = sa;
  sc.w = qw.scales;
  sc.w_kb_stride = qw.kb_stride;
  grouped_gemm::forward_fp8(qa, a_format, qw.codes, sc, C.data, C.dtype, offsets.as<int32_t>(), g.E, R, g.N, g.K,
                            sm_count_, stream_);
}

void CudaBackend::grouped_matmul_wgrad_fp8(const Tensor& dY, DType dy_format, const Tensor& X, Fp8Granularity gran,
                                           Tensor& dW, const Tensor& offsets) {
  const char* op = "grouped_matmul_wgrad_fp8";
  check_grouped_wgrad_fp8(dY, dy_format, X, dW, offsets, op);
  const grouped_gemm::Fp8ScaleMode mode = wgrad_mode_of(gran, op);
  const int64_t R = dY.rows();
  if (R == 0) return;
  const int E = int(dW.dim(0)), N = int(dW.dim(1)), K = int(dW.dim(2));
  const int64_t Rp = grouped_gemm::padded_rows_bound(R, E);
  const int32_t* padded = padded_segments(offsets, E);
  const SegmentsFp8 qdy = segments_scratch(ScratchSlot::fp8_grouped_a, ScratchSlot::fp8_grouped_scale_a, N, E, Rp, mode);
  quantize_segments(dY, qdy, offsets, padded, E, Rp, mode, dy_format, nullptr);
  const SegmentsFp8 qx = segments_scratch(ScratchSlot::fp8_grouped_b, ScratchSlot::fp8_grouped_scale_b, K, E, Rp, mode);
  quantize_segments(X, qx, offsets, padded, E, Rp, mode, DType::e4m3, nullptr);
  grouped_gemm::Fp8GroupedScales sc;
  sc.mode = mode;
  sc.a = qdy.scales;
  sc.w = qx.scales;
  grouped_gemm::wgrad_fp8(qdy.codes, dy_format, qx.codes, sc, dW.data, dW.dtype, padded, E, Rp, N, K, stream_);
}

SavedExpertOperand CudaBackend::alloc_saved_expert_operand(int64_t rows, int64_t cols, int experts, Fp8Granularity g) {
  const grouped_gemm::Fp8ScaleMode mode = wgrad_mode_of(g, "alloc_saved_expert_operand");
  const int64_t Rp = grouped_gemm::padded_rows_bound(rows, experts);
  SavedExpertOperand s;
  s.granularity = g;
  s.data = alloc({cols, Rp}, DType::e4m3);
  s.scale = alloc({segment_scale_count(mode, cols, experts, Rp)}, DType::f32);
  return s;
}

namespace {

// The saved operand's codes and scales, checked against the operand the forward is about to save
// or the backward about to read (x_rows rows of x_cols), and its granularity against the recipe.
void check_saved(const SavedExpertOperand& s, int64_t x_rows, int64_t x_cols, int E, Fp8Granularity g, const char* op) {
  const int64_t Rp = grouped_gemm::padded_rows_bound(x_rows, E);
  require(s.granularity == g, op, std::string("the saved operand has ") + fp8_granularity_name(s.granularity) +
                                      " scales, the recipe " + fp8_granularity_name(g));
  require(s.data.dtype == DType::e4m3 && s.data.ndim() == 2 && s.data.dim(0) == x_cols && s.data.dim(1) >= Rp, op,
          "saved operand " + s.data.describe() + " cannot hold " + std::to_string(x_rows) + " rows of " +
              std::to_string(x_cols) + " (use alloc_saved_expert_operand)");
  require(s.scale.dtype == DType::f32 && s.scale.numel() >= segment_scale_count(wgrad_mode_of(g, op), x_cols, E, Rp), op,
          "saved operand's scales " + s.scale.describe() + " are too few (use alloc_saved_expert_operand)");
}

}  // namespace

void CudaBackend::grouped_matmul_fp8_saving(const Tensor& A, Fp8Granularity a_gran, const QuantizedExperts& W, Tensor& C,
                                            const Tensor& offsets, SavedExpertOperand& save, const Tensor* a_amax,
                                            const ExpertRelu2Fold& fold) {
  const char* op = "grouped_matmul_fp8_saving";
  using M = grouped_gemm::Fp8ScaleMode;
  const GroupedShape g = check_grouped_fp8(A, DType::e4m3, W, C, offsets, op);
  require(!fold.relu2_input && !fold.dx_amax, op, "fold.relu2_input and fold.dx_amax belong to the backward");
  if (fold.relu2_operand) require_dtype(A, DType::bf16, op, "A (ReLU²'s input)");
  grouped_gemm::Fp8Epilogue epi;
  if (fold.relu2_amax) {
    require_dtype(C, DType::bf16, op, "C (with fold.relu2_amax)");
    require(fold.relu2_amax->dtype == DType::f32 && fold.relu2_amax->numel() == g.E, op,
            "fold.relu2_amax must be f32 [" + std::to_string(g.E) + "], got " + fold.relu2_amax->describe());
    epi.relu2_amax = fold.relu2_amax->as<unsigned>();
  }
  const M mode = scale_mode_of(a_gran, W.granularity, op);
  require_whole_weight_blocks(mode, g.N, op);
  const int64_t R = A.rows();
  check_saved(save, R, g.K, g.E, a_gran, op);
  if (R == 0) return;
  const int64_t Rp = save.data.dim(1);
  const int32_t* padded = padded_segments(offsets, g.E);
  // One read of A: the transposed segments into `save` (the weight gradient's operand, kept) and
  // the straight rows into scratch (this product's operand).
  grouped_gemm::StraightCopy rows = straight_rows_scratch(R, g.K, mode);
  const SegmentsFp8 kept{save.data.as<uint8_t>(), save.scale.as<float>()};
  quantize_segments(A, kept, offsets, padded, g.E, Rp, mode, DType::e4m3, &rows, a_amax, fold.relu2_operand);
  const ExpertWeightsFp8 qw = expert_weights_of(W);
  grouped_gemm::Fp8GroupedScales sc;
  sc.mode = mode;
  sc.a = mode == M::tensor ? kept.scales : rows.scale;
  sc.w = qw.scales;
  sc.w_kb_stride = qw.kb_stride;
  grouped_gemm::forward_fp8(rows.out, DType::e4m3, qw.codes, sc, C.data, C.dtype, offsets.as<int32_t>(), g.E, R, g.N, g.K,
                            sm_count_, stream_, epi);
}

void CudaBackend::grouped_matmul_backward_fp8(const Tensor& dY, DType dy_format, Fp8Granularity a_gran,
                                              const QuantizedExperts& Wt, const SavedExpertOperand& X, Tensor& dX,
                                              Tensor& dW, const Tensor& offsets, const Tensor* dy_amax,
                                              const ExpertRelu2Fold& fold) {
  const char* op = "grouped_matmul_backward_fp8";
  using M = grouped_gemm::Fp8ScaleMode;
  // dX = dY W_e: Wt holds W_e^T [N, K] per expert (K = dY's columns, N = dX's).
  const GroupedShape g = check_grouped_fp8(dY, dy_format, Wt, dX, offsets, op);
  require_float(dW, op, "dW");
  require(dW.ndim() == 3 && dW.dim(0) == g.E && dW.dim(1) == g.K && dW.dim(2) == g.N, op,
          "dW " + dW.describe() + " must be W's [E, N, K] of the forward: [" + std::to_string(g.E) + ", " +
              std::to_string(g.K) + ", " + std::to_string(g.N) + "]");
  const M mode = scale_mode_of(a_gran, Wt.granularity, op);
  require_whole_weight_blocks(mode, g.N, op);
  const int64_t R = dY.rows();
  check_saved(X, R, g.N, g.E, a_gran, op);
  require(!fold.relu2_amax && !fold.relu2_operand, op, "fold.relu2_amax and fold.relu2_operand belong to the forward");
  require(fold.relu2_input || !fold.dx_amax, op, "fold.dx_amax is dh's amax: it needs fold.relu2_input");
  grouped_gemm::Fp8Epilogue epi;
  if (fold.relu2_input) {
    require_dtype(dX, DType::bf16, op, "dX (with fold.relu2_input)");
    require_dtype(*fold.relu2_input, DType::bf16, op, "fold.relu2_input");
    require(fold.relu2_input->shape == dX.shape, op,
            "fold.relu2_input " + fold.relu2_input->describe() + " must be shaped as dX " + dX.describe());
    epi.relu2_input = fold.relu2_input->data;
    if (fold.dx_amax) {
      require(fold.dx_amax->dtype == DType::f32 && fold.dx_amax->numel() == g.E, op,
              "fold.dx_amax must be f32 [" + std::to_string(g.E) + "], got " + fold.dx_amax->describe());
      epi.out_amax = fold.dx_amax->as<unsigned>();
    }
  }
  if (R == 0) return;
  const int E = g.E;
  const int64_t Rp = X.data.dim(1);
  const int32_t* padded = padded_segments(offsets, E);
  // dY once: its transposed segments (the weight gradient's A) and its straight rows (the data
  // gradient's A) from one read.
  grouped_gemm::StraightCopy rows = straight_rows_scratch(R, g.K, mode);
  const SegmentsFp8 qdy = segments_scratch(ScratchSlot::fp8_grouped_at, ScratchSlot::fp8_grouped_scale_at, g.K, E, Rp, mode);
  quantize_segments(dY, qdy, offsets, padded, E, Rp, mode, dy_format, &rows, dy_amax);
  const ExpertWeightsFp8 qw = expert_weights_of(Wt);
  grouped_gemm::Fp8GroupedScales sd;
  sd.mode = mode;
  sd.a = mode == M::tensor ? qdy.scales : rows.scale;
  sd.w = qw.scales;
  sd.w_kb_stride = qw.kb_stride;
  grouped_gemm::forward_fp8(rows.out, dy_format, qw.codes, sd, dX.data, dX.dtype, offsets.as<int32_t>(), E, R, g.N, g.K,
                            sm_count_, stream_, epi);
  grouped_gemm::Fp8GroupedScales sw;
  sw.mode = mode;
  sw.a = qdy.scales;
  sw.w = X.scale.as<float>();
  grouped_gemm::wgrad_fp8(qdy.codes, dy_format, X.data.as<uint8_t>(), sw, dW.data, dW.dtype, padded, E, Rp, g.K, g.N,
                          stream_);
}

// Scratch for the straight rows [R, K] that a segment pass writes beside the segments (the
// operand of forward_fp8), with their scales (tensor scaling shares the segments' scales).
grouped_gemm::StraightCopy CudaBackend::straight_rows_scratch(int64_t R, int K, grouped_gemm::Fp8ScaleMode mode) {
  using M = grouped_gemm::Fp8ScaleMode;
  grouped_gemm::StraightCopy rows;
  rows.R = R;
  rows.out = static_cast<uint8_t*>(scratch(ScratchSlot::fp8_grouped_a, size_t(R) * K));
  if (mode != M::tensor) {
    const size_t n = mode == M::row ? size_t(R) : size_t(R) * ((K + 127) / 128);
    rows.scale = static_cast<float*>(scratch(ScratchSlot::fp8_grouped_scale_a, n * sizeof(float)));
  }
  return rows;
}

const int32_t* CudaBackend::padded_segments(const Tensor& offsets, int E) {
  auto* padded = static_cast<int32_t*>(scratch(ScratchSlot::fp8_grouped_offsets, size_t(E + 1) * sizeof(int32_t)));
  grouped_gemm::padded_offsets(offsets.as<int32_t>(), E, padded, stream_);
  return padded;
}

void CudaBackend::quantize_segments(const Tensor& x, const SegmentsFp8& out, const Tensor& offsets, const int32_t* padded,
                                    int E, int64_t Rp, grouped_gemm::Fp8ScaleMode mode, DType format,
                                    grouped_gemm::StraightCopy* straight, const Tensor* known_amax, bool relu2_of_x) {
  using M = grouped_gemm::Fp8ScaleMode;
  const int64_t C = x.cols();
  const grouped_gemm::StraightCopy copy = straight ? *straight : grouped_gemm::StraightCopy{};
  if (known_amax && mode == M::tensor) {  // the producer's amax: no pre-pass
    require(known_amax->dtype == DType::f32 && known_amax->numel() == E, "FP8 expert GEMM",
            "the operand's expert amax must be f32 [" + std::to_string(E) + "], got " + known_amax->describe());
    grouped_gemm::quantize_segments_transposed(x.data, int(C), offsets.as<int32_t>(), padded, E, Rp, mode, format,
                                               out.codes, out.scales, known_amax->as<unsigned>(), stream_, copy, true,
                                               relu2_of_x);
    return;
  }
  const size_t amax_n = size_t(E) * C + (straight && mode == M::row ? size_t(straight->R) : 0);
  auto* amax = static_cast<unsigned*>(scratch(ScratchSlot::fp8_amax, amax_n * sizeof(unsigned)));
  grouped_gemm::quantize_segments_transposed(x.data, int(C), offsets.as<int32_t>(), padded, E, Rp, mode, format, out.codes,
                                             out.scales, amax, stream_, copy, false, relu2_of_x);
}

CudaBackend::SegmentsFp8 CudaBackend::segments_scratch(ScratchSlot codes_slot, ScratchSlot scale_slot, int64_t cols, int E,
                                                       int64_t Rp, grouped_gemm::Fp8ScaleMode mode) {
  SegmentsFp8 q;
  q.codes = static_cast<uint8_t*>(scratch(codes_slot, size_t(cols) * Rp));
  q.scales = static_cast<float*>(scratch(scale_slot, size_t(segment_scale_count(mode, cols, E, Rp)) * sizeof(float)));
  return q;
}

}  // namespace moelab
