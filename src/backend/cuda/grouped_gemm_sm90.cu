// Hopper (sm_90a) grouped GEMMs for the expert products, reading the expert offsets on the
// device (no host synchronization): the forward C[rows of e] = A[rows of e] @ W[e]^T with both
// operands K-major (W [E, N, K]; the data gradient uses it after an expert-wise transpose of W),
// and the weight gradient dW[e] = beta dW[e] + dY_e^T X_e. Two warpgroups issue wgmma from
// 128-byte-swizzled shared memory that the tensor-memory accelerator fills, one mbarrier per
// stage. The forward is persistent (blocks loop over tiles, loading the next while storing the
// current); the weight gradient picks the tile width (256, 192 or 128) that leaves the least of
// the last wave idle. The one-tile-per-block variants these were chosen over are in the kernel
// lab (dev/cuda/grouped_gemm_variants.cu).
#include <cuda.h>

#include <algorithm>
#include <set>
#include <type_traits>

#include "backend/cuda/cuda_common.cuh"
#include "backend/cuda/grouped_gemm.cuh"
#include "backend/cuda/grouped_gemm_sm90.cuh"
#include "backend/cuda/mma_utils.cuh"
#include "backend/cuda/wgmma.cuh"
#include "backend/cuda/wgmma_epilogue.cuh"

namespace moelab {
using namespace cuda_detail;

namespace grouped_gemm {

namespace {

using namespace sm90;

// The forward product as a persistent kernel: one block per SM walks the output tiles
// blockIdx.x, blockIdx.x + gridDim.x, ... (row tile major, so neighbouring blocks share an A
// tile through L2). With K of 768 or 1536 a tile has only 12 or 24 k-steps, so the one-tile
// kernel above spends much of its time filling the pipeline and storing the tile; here the
// leader keeps loading the next tile's first stages while the block stores the current one.
// The k-steps of all of a block's tiles form one sequence g = 0, 1, ...: step g uses stage
// g % TST with barrier parity (g / TST) & 1, whichever tile it belongs to.
template <int TBN, int TST, class TC>
__global__ void __launch_bounds__(THREADS, TBN == 256 ? 1 : 2)
    grouped_fwd_tma_persistent_kernel(const __grid_constant__ CUtensorMap map_a, const __grid_constant__ CUtensorMap map_b,
                                      TC* C, const int32_t* offsets, int E, int N, int K, float alpha, float beta,
                                      const TC* addend) {
  extern __shared__ char smem_raw[];
  const int n_tiles_n = (N + TBN - 1) / TBN;
  FwdTile cur = fwd_tile<TBN>(blockIdx.x, offsets, E, n_tiles_n);
  if (!cur.valid) return;
  constexpr int STAGE = A_BYTES + TBN * BK * 2;
  const uint32_t s0 = (smem_u32(smem_raw) + 1023) & ~1023u;
  const uint32_t bars = s0 + TST * STAGE;
  const int ktiles = (K + BK - 1) / BK;
  const bool leader = threadIdx.x == 0;
  init_stage_barriers(bars, TST, leader);
  // Producer cursor (used by the leader only): the tile and k-step of the next load.
  int p_t = blockIdx.x, p_k = 0, p_g = 0;
  FwdTile p_tile = cur;
  auto produce = [&] {
    if (!p_tile.valid) return;
    const int st = p_g % TST;
    const uint32_t sa = s0 + st * STAGE, bar = bars + st * 8;
    mbar_expect_tx(bar, STAGE);
    tma_load_2d(sa, &map_a, p_k * BK, p_tile.row0, bar);
    tma_load_2d(sa + A_BYTES, &map_b, p_k * BK, p_tile.e * N + p_tile.n0, bar);
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
  int g = 0;
  for (int t = blockIdx.x; cur.valid; t += gridDim.x, cur = fwd_tile<TBN>(t, offsets, E, n_tiles_n)) {
    float acc[TBN / 2];
#pragma unroll
    for (int i = 0; i < TBN / 2; ++i) acc[i] = 0.f;
    for (int kt = 0; kt < ktiles; ++kt, ++g) {
      const int st = g % TST;
      mbar_wait(bars + st * 8, uint32_t((g / TST) & 1));
      const uint32_t sa = s0 + st * STAGE + wg * 64 * 128, sb = s0 + st * STAGE + A_BYTES;
      wgmma_fence();
#pragma unroll
      for (int kk = 0; kk < BK / 16; ++kk)
        if constexpr (TBN == 256)
          wgmma_m64n256k16(acc, wgmma_desc_kmajor_sw128(sa + kk * 32), wgmma_desc_kmajor_sw128(sb + kk * 32));
        else
          wgmma_m64n128k16(acc, wgmma_desc_kmajor_sw128(sa + kk * 32), wgmma_desc_kmajor_sw128(sb + kk * 32));
      wgmma_commit();
      wgmma_wait<1>();  // step g - 1 is done: its stage may be refilled
      __syncthreads();
      if (leader && g >= 1) produce();
    }
    wgmma_wait<0>();
    TC* c_base = C + int64_t(cur.row0) * N;
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int m = wg * 64 + w * 16 + g4 + h * 8;
      if (m >= cur.rows) continue;
      const int64_t row_off = int64_t(m) * N;
      auto pair = [&](int j) {  // C = alpha A W^T + beta addend at step j's two columns, rounded once
        float2 v = make_float2(alpha * acc[4 * j + 2 * h], alpha * acc[4 * j + 2 * h + 1]);
        const int n = cur.n0 + j * 8 + 2 * t4;
        if (addend && n < N) {
          const TC* a = addend + int64_t(cur.row0) * N + row_off + n;
          float2 o;
          if constexpr (std::is_same_v<TC, float>) o = *reinterpret_cast<const float2*>(a);
          else o = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(a));
          v.x += beta * o.x;
          v.y += beta * o.y;
        }
        return v;
      };
      if constexpr (std::is_same_v<TC, bf16>) {
        float v[TBN / 8][2];
#pragma unroll
        for (int j = 0; j < TBN / 8; ++j) {
          const float2 p = pair(j);
          v[j][0] = p.x, v[j][1] = p.y;
        }
        store_row_bf16(c_base + row_off, cur.n0, N, v, lane);  // whole sectors (wgmma_epilogue.cuh)
      } else {
#pragma unroll
        for (int j = 0; j < TBN / 8; ++j) {  // f32 pairs of a quad already fill a sector
          const int n = cur.n0 + j * 8 + 2 * t4;
          if (n < N) *reinterpret_cast<float2*>(c_base + row_off + n) = pair(j);
        }
      }
    }
  }
}

// Weight gradient dW[e] (N x K) = beta dW[e] + dY_e^T X_e on wgmma: both operands are MN-major
// (the reduction runs over the expert's rows), loaded by TMA as 64-row x 64-column boxes. Rows of
// the last tile past the expert's end are zeroed in shared memory before the product (they belong
// to the next expert or hold uninitialized memory).
template <int TBN, int TST, class TC>
__global__ void __launch_bounds__(THREADS, TBN == 128 ? 2 : 1) grouped_wgrad_tma_kernel(const __grid_constant__ CUtensorMap map_dy,
                                                                      const __grid_constant__ CUtensorMap map_x,
                                                                      TC* dW, const int32_t* offsets, int N, int K,
                                                                      float beta, const TC* addend) {
  extern __shared__ char smem_raw[];
  const int e = blockIdx.z, m0 = blockIdx.y * BM, n0 = blockIdx.x * TBN;
  const int k_begin = offsets[e], k_end = offsets[e + 1];
  const int ktiles = (k_end - k_begin + BK - 1) / BK;
  const uint32_t s0 = (smem_u32(smem_raw) + 1023) & ~1023u;
  const uint32_t bars = s0 + TST * (A_BYTES + TBN * BK * 2);
  const bool leader = threadIdx.x == 0;
  init_stage_barriers(bars, TST, leader);
  auto issue = [&](int st, int kt) {
    uint32_t sa = s0 + st * (A_BYTES + TBN * BK * 2), bar = bars + st * 8;
    int r = k_begin + kt * BK;
    mbar_expect_tx(bar, A_BYTES + TBN * BK * 2);
    for (int j = 0; j < BM / 64; ++j) tma_load_2d(sa + j * 8192, &map_dy, m0 + 64 * j, r, bar);
    for (int j = 0; j < TBN / 64; ++j) tma_load_2d(sa + A_BYTES + j * 8192, &map_x, n0 + 64 * j, r, bar);
  };
  if (leader)
    for (int st = 0; st < TST && st < ktiles; ++st) issue(st, st);
  float acc[TBN / 2];
#pragma unroll
  for (int i = 0; i < TBN / 2; ++i) acc[i] = 0.f;
  const int wg = threadIdx.x >> 7;
  for (int kt = 0; kt < ktiles; ++kt) {
    const int st = kt % TST;
    const uint32_t stage = s0 + st * (A_BYTES + TBN * BK * 2);
    mbar_wait(bars + st * 8, uint32_t((kt / TST) & 1));
    const int valid = k_end - (k_begin + kt * BK);
    if (valid < BK) {
      // (BM + TBN) / 64 atoms of 64 rows x 128 bytes; zero rows [valid, 64) of each.
      const int per_atom = (BK - valid) * 8;
      for (int q = threadIdx.x; q < (BM + TBN) / 64 * per_atom; q += THREADS) {
        int atom = q / per_atom, rem = q % per_atom, r = valid + rem / 8, c = rem % 8;
        uint32_t addr = stage + atom * 8192 + r * 128 + c * 16;
        asm volatile("st.shared.v4.u32 [%0], {%1, %1, %1, %1};\n" ::"r"(addr), "r"(0) : "memory");
      }
      fence_proxy_async();
      __syncthreads();
    }
    const uint32_t sa = stage + wg * 8192, sb = stage + A_BYTES;
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < BK / 16; ++kk)
      if constexpr (TBN == 256)
        wgmma_m64n256k16_mn_major(acc, wgmma_desc_mnmajor_sw128(sa + kk * 2048, 8192),
                                  wgmma_desc_mnmajor_sw128(sb + kk * 2048, 8192));
      else if constexpr (TBN == 192)
        wgmma_m64n192k16_mn_major(acc, wgmma_desc_mnmajor_sw128(sa + kk * 2048, 8192),
                                  wgmma_desc_mnmajor_sw128(sb + kk * 2048, 8192));
      else
        wgmma_m64n128k16_mn_major(acc, wgmma_desc_mnmajor_sw128(sa + kk * 2048, 8192),
                                  wgmma_desc_mnmajor_sw128(sb + kk * 2048, 8192));
    wgmma_commit();
    wgmma_wait<1>();
    __syncthreads();
    if (leader && kt >= 1 && kt - 1 + TST < ktiles) issue((kt - 1) % TST, kt - 1 + TST);
  }
  wgmma_wait<0>();
  const int w = (threadIdx.x >> 5) & 3, lane = threadIdx.x & 31, g = lane >> 2, t4 = lane & 3;
  TC* base = dW + int64_t(e) * N * K;
  const TC* add_base = addend + int64_t(e) * N * K;  // addend is dW itself when accumulating
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    int m = m0 + wg * 64 + w * 16 + g + h * 8;
    if (m >= N) continue;
    TC* row = base + int64_t(m) * K;
    const TC* add_row = add_base + int64_t(m) * K;
#pragma unroll
    for (int j = 0; j < TBN / 8; ++j) {
      int n = n0 + j * 8 + 2 * t4;
      if (n >= K) continue;
      float v0 = acc[4 * j + 2 * h], v1 = acc[4 * j + 2 * h + 1];
      if constexpr (std::is_same_v<TC, float>) {
        float2 o = make_float2(v0, v1);
        if (beta != 0.f) {
          float2 old = *reinterpret_cast<const float2*>(add_row + n);
          o.x += beta * old.x;
          o.y += beta * old.y;
        }
        *reinterpret_cast<float2*>(row + n) = o;
      } else {
        if (beta != 0.f) {
          __nv_bfloat162 old = *reinterpret_cast<const __nv_bfloat162*>(add_row + n);
          v0 += beta * __bfloat162float(old.x);
          v1 += beta * __bfloat162float(old.y);
        }
        *reinterpret_cast<__nv_bfloat162*>(row + n) = __floats2bfloat162_rn(v0, v1);
      }
    }
  }
}

using EncodeTiled = CUresult (*)(CUtensorMap*, CUtensorMapDataType, cuuint32_t, void*, const cuuint64_t*,
                                 const cuuint64_t*, const cuuint32_t*, const cuuint32_t*, CUtensorMapInterleave,
                                 CUtensorMapSwizzle, CUtensorMapL2promotion, CUtensorMapFloatOOBfill);

EncodeTiled encode_tiled() {
  static EncodeTiled fn = [] {
    void* p = nullptr;
    cudaDriverEntryPointQueryResult q{};
    MOELAB_CUDA_CHECK(cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &p, 12000, cudaEnableDefault, &q));
    if (!p || q != cudaDriverEntryPointSuccess) throw Error("cuda backend: cuTensorMapEncodeTiled is unavailable");
    return reinterpret_cast<EncodeTiled>(p);
  }();
  return fn;
}

}  // namespace

// 2D map of a row-major [rows, cols] bf16 matrix, boxes of box_rows x 64 columns, 128B swizzle.
CUtensorMap sm90::make_map(const bf16* base, int64_t rows, int64_t cols, int box_rows) {
  CUtensorMap m;
  cuuint64_t dims[2] = {cuuint64_t(cols), cuuint64_t(rows)};
  cuuint64_t strides[1] = {cuuint64_t(cols) * 2};
  cuuint32_t box[2] = {uint32_t(BK), uint32_t(box_rows)};
  cuuint32_t estr[2] = {1, 1};
  CUresult r = encode_tiled()(&m, CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, 2, const_cast<bf16*>(base), dims, strides, box,
                              estr, CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B,
                              CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  if (r != CUDA_SUCCESS)
    throw Error("cuda backend: cuTensorMapEncodeTiled failed (" + std::to_string(int(r)) + ") for a [" +
                std::to_string(rows) + ", " + std::to_string(cols) + "] bf16 matrix");
  return m;
}

CUtensorMap sm90::make_map_fp8(const uint8_t* base, int64_t rows, int64_t cols, int box_rows) {
  CUtensorMap m;
  cuuint64_t dims[2] = {cuuint64_t(cols), cuuint64_t(rows)};
  cuuint64_t strides[1] = {cuuint64_t(cols)};
  cuuint32_t box[2] = {128u, uint32_t(box_rows)};
  cuuint32_t estr[2] = {1, 1};
  CUresult r = encode_tiled()(&m, CU_TENSOR_MAP_DATA_TYPE_UINT8, 2, const_cast<uint8_t*>(base), dims, strides, box,
                              estr, CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B,
                              CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  if (r != CUDA_SUCCESS)
    throw Error("cuda backend: cuTensorMapEncodeTiled failed (" + std::to_string(int(r)) + ") for a [" +
                std::to_string(rows) + ", " + std::to_string(cols) + "] FP8 matrix");
  return m;
}

namespace {

// Wt[e] = W[e]^T for W [E, R, S] -> Wt [E, S, R], 32 x 32 tiles through shared memory.
__global__ void transpose_experts_kernel(const bf16* W, bf16* Wt, int R, int S) {
  __shared__ bf16 tile[32][33];
  const int e = blockIdx.z, r0 = blockIdx.y * 32, s0 = blockIdx.x * 32;
  const bf16* src = W + int64_t(e) * R * S;
  bf16* dst = Wt + int64_t(e) * R * S;
  for (int i = threadIdx.y; i < 32; i += blockDim.y) {
    int r = r0 + i, s = s0 + threadIdx.x;
    if (r < R && s < S) tile[i][threadIdx.x] = src[int64_t(r) * S + s];
  }
  __syncthreads();
  for (int i = threadIdx.y; i < 32; i += blockDim.y) {
    int s = s0 + i, r = r0 + threadIdx.x;
    if (r < R && s < S) dst[int64_t(s) * R + r] = tile[threadIdx.x][i];
  }
}


}  // namespace

template <int TBN, int TST>
void forward_tma_persistent_cfg(const bf16* A, const bf16* W, void* C, DType c_dtype, const int32_t* offsets, int E,
                                int64_t R, int N, int K, int sms, cudaStream_t stream, float alpha, float beta,
                                const void* addend) {
  CUtensorMap ma = make_map(A, R, K, BM), mb = make_map(W, int64_t(E) * N, K, TBN);
  const int64_t tiles_max = int64_t((N + TBN - 1) / TBN) * ((R + BM - 1) / BM + E);
  const int per_sm = TBN == 256 ? 1 : 2;
  const unsigned grid = unsigned(std::min<int64_t>(tiles_max, int64_t(sms) * per_sm));
  constexpr int smem = tma_smem_bytes<TBN, TST>();
  auto launch = [&](auto kernel, auto* c) {
    static std::set<const void*> done;
    if (done.insert(reinterpret_cast<const void*>(kernel)).second)
      MOELAB_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
    using TC = std::remove_pointer_t<decltype(c)>;
    kernel<<<grid, THREADS, smem, stream>>>(ma, mb, c, offsets, E, N, K, alpha, beta,
                                            beta != 0.f ? static_cast<const TC*>(addend) : nullptr);
  };
  if (c_dtype == DType::bf16) launch(grouped_fwd_tma_persistent_kernel<TBN, TST, bf16>, static_cast<bf16*>(C));
  else launch(grouped_fwd_tma_persistent_kernel<TBN, TST, float>, static_cast<float*>(C));
  MOELAB_CUDA_LAUNCH_CHECK("grouped_fwd_tma_persistent_kernel");
}

void forward_sm90_tma_persistent(const bf16* A, const bf16* W, void* C, DType c_dtype, const int32_t* offsets, int E,
                                 int64_t R, int N, int K, int sms, cudaStream_t stream, int tile_n, float alpha,
                                 float beta, const void* addend) {
  if (tile_n == 128)
    forward_tma_persistent_cfg<128, 3>(A, W, C, c_dtype, offsets, E, R, N, K, sms, stream, alpha, beta, addend);
  else
    forward_tma_persistent_cfg<256, 4>(A, W, C, c_dtype, offsets, E, R, N, K, sms, stream, alpha, beta, addend);
}


template <int TBN, int TST>
void wgrad_tma_cfg(const bf16* dY, const bf16* X, void* dW, DType dw_dtype, const int32_t* offsets, int E, int64_t R,
                   int N, int K, float beta, const void* addend, cudaStream_t stream) {
  CUtensorMap my = make_map(dY, R, N, 64), mx = make_map(X, R, K, 64);
  dim3 grid(unsigned((K + TBN - 1) / TBN), unsigned((N + BM - 1) / BM), unsigned(E));
  constexpr int smem = tma_smem_bytes<TBN, TST>();
  auto launch = [&](auto kernel, auto* c) {
    static std::set<const void*> done;
    if (done.insert(reinterpret_cast<const void*>(kernel)).second)
      MOELAB_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
    using TC = std::remove_pointer_t<decltype(c)>;
    kernel<<<grid, THREADS, smem, stream>>>(my, mx, c, offsets, N, K, beta,
                                            static_cast<const TC*>(addend ? addend : static_cast<const void*>(c)));
  };
  if (dw_dtype == DType::f32) launch(grouped_wgrad_tma_kernel<TBN, TST, float>, static_cast<float*>(dW));
  else launch(grouped_wgrad_tma_kernel<TBN, TST, bf16>, static_cast<bf16*>(dW));
  MOELAB_CUDA_LAUNCH_CHECK("grouped_wgrad_tma_kernel");
}

void wgrad_sm90_tma(const bf16* dY, const bf16* X, void* dW, DType dw_dtype, const int32_t* offsets, int E,
                    int64_t R, int N, int K, float beta, cudaStream_t stream, int tile_n, const void* addend) {
  if (tile_n == 128) wgrad_tma_cfg<128, 3>(dY, X, dW, dw_dtype, offsets, E, R, N, K, beta, addend, stream);
  else if (tile_n == 192) wgrad_tma_cfg<192, 4>(dY, X, dW, dw_dtype, offsets, E, R, N, K, beta, addend, stream);
  else wgrad_tma_cfg<256, 4>(dY, X, dW, dw_dtype, offsets, E, R, N, K, beta, addend, stream);
}

int wgrad_tile_n(int E, int N, int K, int sms) {
  // Every block of a weight-gradient product does the same work (all of its expert's rows), so
  // the time is the number of waves times the work an SM does per wave (tile width x blocks
  // resident per SM). Ties keep the widest tile.
  int best = 256;
  int64_t best_cost = INT64_MAX;
  for (int tn : {256, 192, 128}) {
    const int per_sm = tn == 128 ? 2 : 1;
    const int64_t blocks = int64_t((K + tn - 1) / tn) * ((N + BM - 1) / BM) * E;
    const int64_t waves = (blocks + int64_t(sms) * per_sm - 1) / (int64_t(sms) * per_sm);
    const int64_t cost = waves * tn * per_sm;
    if (cost < best_cost) best = tn, best_cost = cost;
  }
  return best;
}

void transpose_experts(const bf16* W, bf16* Wt, int E, int R, int S, cudaStream_t stream) {
  dim3 grid(unsigned((S + 31) / 32), unsigned((R + 31) / 32), unsigned(E));
  transpose_experts_kernel<<<grid, dim3(32, 8), 0, stream>>>(W, Wt, R, S);
  MOELAB_CUDA_LAUNCH_CHECK("transpose_experts_kernel");
}

}  // namespace grouped_gemm
}  // namespace moelab
