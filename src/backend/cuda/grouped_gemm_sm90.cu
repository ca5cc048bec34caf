// Hopper (sm_90a) grouped GEMMs for the expert products, reading the expert offsets on the
// device (no host synchronization): the forward C[rows of e] = A[rows of e] @ W[e]^T with both
// operands K-major (W [E, N, K]; for the data gradient W [E, K, N] is read MN-major in place),
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
// W_MN_MAJOR: W is [E, K, N] (the data gradient's C = A W[e]): its tiles come as 64 x 64 boxes
// of K-rows and wgmma reads them MN-major, so no transposed copy of W is made. K must then be a
// multiple of BK, so that no k-step reads into the next expert's rows.
// EPI (Relu2EpiMode; bf16 C, alpha 1, beta 0): kRelu2Output also stores relu²(C) at relu2.out
// (the up projection's forward); kRelu2Backward stores relu2_bwd(relu2.in, C) as C (the down
// projection's data gradient), reading h from L2 (prefetched at the tile's start).
template <int TBN, int TST, class TC, bool W_MN_MAJOR, int EPI>
__global__ void __launch_bounds__(THREADS, TBN == 256 ? 1 : 2)
    grouped_fwd_tma_persistent_kernel(const __grid_constant__ CUtensorMap map_a, const __grid_constant__ CUtensorMap map_b,
                                      TC* C, const int32_t* offsets, int E, int N, int K, float alpha, float beta,
                                      const TC* addend, Relu2Epilogue relu2) {
  static_assert(EPI == kRelu2None || std::is_same_v<TC, bf16>, "the ReLU² epilogues write bf16");
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
    if constexpr (W_MN_MAJOR)
      for (int j = 0; j < TBN / 64; ++j)
        tma_load_2d(sa + A_BYTES + j * 8192, &map_b, p_tile.n0 + 64 * j, p_tile.e * K + p_k * BK, bar);
    else
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
    if constexpr (EPI == kRelu2Backward) {
      // The tile's h into L2 while its products run (a thread per 128-byte line of a row's
      // TBN columns), so the epilogue's reads of it wait on L2, not DRAM.
      for (int i = threadIdx.x; i < BM * (TBN / 64); i += THREADS) {
        const int r = i / (TBN / 64), n = cur.n0 + 64 * (i % (TBN / 64));
        if (r < cur.rows && n < N)
          asm volatile("prefetch.global.L2 [%0];" ::"l"(relu2.in + (int64_t(cur.row0) + r) * N + n));
      }
    }
    float acc[TBN / 2];
#pragma unroll
    for (int i = 0; i < TBN / 2; ++i) acc[i] = 0.f;
    for (int kt = 0; kt < ktiles; ++kt, ++g) {
      const int st = g % TST;
      mbar_wait(bars + st * 8, uint32_t((g / TST) & 1));
      const uint32_t sa = s0 + st * STAGE + wg * 64 * 128, sb = s0 + st * STAGE + A_BYTES;
      wgmma_fence();
#pragma unroll
      for (int kk = 0; kk < BK / 16; ++kk) {
        const uint64_t da = wgmma_desc_kmajor_sw128(sa + kk * 32);
        const uint64_t db = W_MN_MAJOR ? wgmma_desc_mnmajor_sw128(sb + kk * 2048, 8192)
                                       : wgmma_desc_kmajor_sw128(sb + kk * 32);
        if constexpr (TBN == 256) wgmma_m64n256k16<W_MN_MAJOR>(acc, da, db);
        else wgmma_m64n128k16<W_MN_MAJOR>(acc, da, db);
      }
      wgmma_commit();
      wgmma_wait<1>();  // step g - 1 is done: its stage may be refilled
      __syncthreads();
      if (leader && g >= 1) produce();
    }
    // The ReLU² backward's h at this thread's places of its two rows (8 columns of each 32-column
    // group, as store_row_bf16 hands them out): row 0's loaded while the last products run,
    // row 1's while row 0 is stored.
    constexpr int kGroups = TBN / 32;
    uint4 h_pre[kGroups];
    auto load_h = [&](int h, uint4 (&dst)[kGroups]) {
      const int m = wg * 64 + w * 16 + g4 + h * 8;
      const bf16* h_row = relu2.in + (int64_t(cur.row0) + m) * N;
#pragma unroll
      for (int q = 0; q < kGroups; ++q) {
        const int n = cur.n0 + 32 * q + 8 * t4;
        dst[q] = m < cur.rows && n < N ? __ldg(reinterpret_cast<const uint4*>(h_row + n)) : make_uint4(0, 0, 0, 0);
      }
    };
    if constexpr (EPI == kRelu2Backward) load_h(0, h_pre);
    wgmma_wait<0>();
    TC* c_base = C + int64_t(cur.row0) * N;
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      uint4 h_next[kGroups];
      if constexpr (EPI == kRelu2Backward)
        if (h == 0) load_h(1, h_next);
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
        if constexpr (EPI == kRelu2Output) {
          bf16* a_row = relu2.out + int64_t(cur.row0) * N + row_off;
          store_row_bf16(c_base + row_off, cur.n0, N, v, lane, [&](int, int n, uint32_t (&hw)[4]) {
            uint32_t a[4];
            relu2_fwd8(hw, a);
            *reinterpret_cast<uint4*>(a_row + n) = make_uint4(a[0], a[1], a[2], a[3]);
          });
        } else if constexpr (EPI == kRelu2Backward) {
          float unused = 0.f;
          store_row_bf16(c_base + row_off, cur.n0, N, v, lane,
                         [&](int q, int, uint32_t (&w)[4]) { relu2_bwd8(w, h_pre[q], unused); });
          if (h == 0)
#pragma unroll
            for (int q = 0; q < kGroups; ++q) h_pre[q] = h_next[q];
        } else {
          store_row_bf16(c_base + row_off, cur.n0, N, v, lane);  // whole sectors (wgmma_epilogue.cuh)
        }
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
  __shared__ int by_size[kWgradOrderedExperts];
  const WgradTile wt = wgrad_tile_by_size<TBN>(offsets, by_size);
  const int e = wt.e, m0 = wt.m0, n0 = wt.n0;
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
void forward_tma_persistent_cfg(const bf16* A, const bf16* W, bool w_mn_major, void* C, DType c_dtype,
                                const int32_t* offsets, int E, int64_t R, int N, int K, int sms, cudaStream_t stream,
                                float alpha, float beta, const void* addend, const Relu2Epilogue& relu2) {
  CUtensorMap ma = make_map(A, R, K, BM);
  CUtensorMap mb = w_mn_major ? make_map(W, int64_t(E) * K, N, 64) : make_map(W, int64_t(E) * N, K, TBN);
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
                                            beta != 0.f ? static_cast<const TC*>(addend) : nullptr, relu2);
  };
  auto* cb = static_cast<bf16*>(C);
  auto* cf = static_cast<float*>(C);
  if (relu2.out || relu2.in) {
    if (c_dtype != DType::bf16 || alpha != 1.f || beta != 0.f)
      throw Error("grouped GEMM: the ReLU² epilogues store bf16 C = A op(W) (alpha 1, beta 0)");
    if (relu2.out && relu2.in) throw Error("grouped GEMM: one ReLU² epilogue at a time");
    if (relu2.out && w_mn_major) launch(grouped_fwd_tma_persistent_kernel<TBN, TST, bf16, true, kRelu2Output>, cb);
    else if (relu2.out) launch(grouped_fwd_tma_persistent_kernel<TBN, TST, bf16, false, kRelu2Output>, cb);
    else if (w_mn_major) launch(grouped_fwd_tma_persistent_kernel<TBN, TST, bf16, true, kRelu2Backward>, cb);
    else launch(grouped_fwd_tma_persistent_kernel<TBN, TST, bf16, false, kRelu2Backward>, cb);
  } else if (w_mn_major) {
    if (c_dtype == DType::bf16) launch(grouped_fwd_tma_persistent_kernel<TBN, TST, bf16, true, kRelu2None>, cb);
    else launch(grouped_fwd_tma_persistent_kernel<TBN, TST, float, true, kRelu2None>, cf);
  } else {
    if (c_dtype == DType::bf16) launch(grouped_fwd_tma_persistent_kernel<TBN, TST, bf16, false, kRelu2None>, cb);
    else launch(grouped_fwd_tma_persistent_kernel<TBN, TST, float, false, kRelu2None>, cf);
  }
  MOELAB_CUDA_LAUNCH_CHECK("grouped_fwd_tma_persistent_kernel");
}

void forward_sm90_tma_persistent(const bf16* A, const bf16* W, bool w_mn_major, void* C, DType c_dtype,
                                 const int32_t* offsets, int E, int64_t R, int N, int K, int sms, cudaStream_t stream,
                                 int tile_n, float alpha, float beta, const void* addend, const Relu2Epilogue& relu2) {
  if (w_mn_major && K % BK != 0)
    throw Error("grouped GEMM: an [E, K, N] W needs K a multiple of " + std::to_string(BK) + ", got K " +
                std::to_string(K) + " (transpose it per expert first)");
  if (tile_n == 128)
    forward_tma_persistent_cfg<128, 3>(A, W, w_mn_major, C, c_dtype, offsets, E, R, N, K, sms, stream, alpha, beta,
                                       addend, relu2);
  else
    forward_tma_persistent_cfg<256, 4>(A, W, w_mn_major, C, c_dtype, offsets, E, R, N, K, sms, stream, alpha, beta,
                                       addend, relu2);
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
