// Kernel lab, grouped GEMM: the forward variants the engine's persistent TMA kernel
// (src/backend/cuda/grouped_gemm_sm90.cu) was chosen over. Both compute
// C[rows of e] = A[rows of e] @ W[e]^T with W [E, N, K] K-major, reading the expert offsets on the
// device (grid.y walks (expert, row tile) pairs), one 128 x TBN output tile per block:
//   v2 forward_sm90:     two warpgroups issue wgmma m64n256k16 from shared memory; tiles come by
//                        cp.async, 3 stages deep, into the 128-byte-swizzled K-major layout;
//   v3 forward_sm90_tma: the same with tiles brought by the tensor-memory accelerator and one
//                        mbarrier per stage (128 or 256 wide).
// bench_grouped_gemm_variants.cpp times them beside the engine's kernels and cuBLASLt and checks
// every one against per-expert cuBLASLt GEMMs.
#include <cuda.h>

#include <set>
#include <type_traits>

#include "backend/cuda/cuda_common.cuh"
#include "backend/cuda/grouped_gemm_sm90.cuh"
#include "backend/cuda/mma_utils.cuh"
#include "backend/cuda/wgmma.cuh"
#include "grouped_gemm_variants.cuh"

namespace moelab {
using namespace cuda_detail;

namespace grouped_gemm_lab {

namespace {
using namespace grouped_gemm::sm90;

constexpr int BN = 256, STAGES = 3;
constexpr int B_BYTES = BN * BK * 2, STAGE_BYTES = A_BYTES + B_BYTES;
constexpr int SMEM_BYTES = STAGES * STAGE_BYTES + 1024;  // + room to align the base to 1024

template <int ROWS>
__device__ __forceinline__ void load_kmajor(uint32_t s, const bf16* base, int64_t ld, int o0, int o_end, int k0,
                                            int k_end) {
#pragma unroll
  for (int it = 0; it < ROWS * 8 / THREADS; ++it) {
    int q = threadIdx.x + it * THREADS, r = q >> 3, c = q & 7;
    int o = o0 + r, k = k0 + c * 8;
    bool ok = o < o_end && k < k_end;
    const bf16* src = ok ? base + int64_t(o) * ld + k : base;
    cp_async16(s + swz(r, c, 8), src, ok);
  }
}

template <class TC>
__global__ void __launch_bounds__(THREADS, 1) grouped_fwd_wgmma_kernel(const bf16* A, const bf16* W, TC* C,
                                                                      const int32_t* offsets, int E, int N, int K) {
  extern __shared__ char smem_raw[];
  int tile = blockIdx.y, seen = 0, e = 0, row0 = 0, rows = 0;
  for (; e < E; ++e) {
    int lo = offsets[e], hi = offsets[e + 1];
    int t = (hi - lo + BM - 1) / BM;
    if (tile < seen + t) {
      row0 = lo + (tile - seen) * BM;
      rows = min(BM, hi - row0);
      break;
    }
    seen += t;
  }
  if (e == E) return;
  const uint32_t s0 = (smem_u32(smem_raw) + 1023) & ~1023u;
  const bf16* a_base = A + int64_t(row0) * K;
  const bf16* b_base = W + int64_t(e) * N * K;
  const int n0 = blockIdx.x * BN;
  const int ktiles = (K + BK - 1) / BK;
  auto load_stage = [&](int st, int kt) {
    uint32_t sa = s0 + st * STAGE_BYTES;
    load_kmajor<BM>(sa, a_base, K, 0, rows, kt * BK, K);
    load_kmajor<BN>(sa + A_BYTES, b_base, K, n0, N, kt * BK, K);
  };
#pragma unroll
  for (int st = 0; st < STAGES - 1; ++st) {
    if (st < ktiles) load_stage(st, st);
    cp_async_commit();
  }
  float acc[128];
#pragma unroll
  for (int i = 0; i < 128; ++i) acc[i] = 0.f;
  const int wg = threadIdx.x >> 7;
  for (int kt = 0; kt < ktiles; ++kt) {
    cp_async_wait<STAGES - 2>();
    fence_proxy_async();
    __syncthreads();
    int nk = kt + STAGES - 1;
    if (nk < ktiles) load_stage(nk % STAGES, nk);
    cp_async_commit();
    const uint32_t sa = s0 + (kt % STAGES) * STAGE_BYTES + wg * 64 * 128, sb = s0 + (kt % STAGES) * STAGE_BYTES + A_BYTES;
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < BK / 16; ++kk)
      wgmma_m64n256k16(acc, wgmma_desc_kmajor_sw128(sa + kk * 32), wgmma_desc_kmajor_sw128(sb + kk * 32));
    wgmma_commit();
    wgmma_wait<0>();
  }
  cp_async_wait<0>();
  const int w = (threadIdx.x >> 5) & 3, lane = threadIdx.x & 31, g = lane >> 2, t4 = lane & 3;
  TC* c_base = C + int64_t(row0) * N;
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    int m = wg * 64 + w * 16 + g + h * 8;
    if (m >= rows) continue;
    TC* crow = c_base + int64_t(m) * N;
#pragma unroll
    for (int j = 0; j < BN / 8; ++j) {
      int n = n0 + j * 8 + 2 * t4;
      if (n >= N) continue;
      float v0 = acc[4 * j + 2 * h], v1 = acc[4 * j + 2 * h + 1];
      if constexpr (std::is_same_v<TC, float>)
        *reinterpret_cast<float2*>(crow + n) = make_float2(v0, v1);
      else
        *reinterpret_cast<__nv_bfloat162*>(crow + n) = __floats2bfloat162_rn(v0, v1);
    }
  }
}

template <int TBN, int TST, class TC>
__global__ void __launch_bounds__(THREADS, TBN == 256 ? 1 : 2) grouped_fwd_tma_kernel(const __grid_constant__ CUtensorMap map_a,
                                                                    const __grid_constant__ CUtensorMap map_b, TC* C,
                                                                    const int32_t* offsets, int E, int N, int K) {
  extern __shared__ char smem_raw[];
  int tile = blockIdx.y, seen = 0, e = 0, row0 = 0, rows = 0;
  for (; e < E; ++e) {
    int lo = offsets[e], hi = offsets[e + 1];
    int t = (hi - lo + BM - 1) / BM;
    if (tile < seen + t) {
      row0 = lo + (tile - seen) * BM;
      rows = min(BM, hi - row0);
      break;
    }
    seen += t;
  }
  if (e == E) return;
  const uint32_t s0 = (smem_u32(smem_raw) + 1023) & ~1023u;
  const uint32_t bars = s0 + TST * (A_BYTES + TBN * BK * 2);
  const int n0 = blockIdx.x * TBN;
  const int ktiles = (K + BK - 1) / BK;
  const bool leader = threadIdx.x == 0;
  init_stage_barriers(bars, TST, leader);
  auto issue = [&](int st, int kt) {
    uint32_t sa = s0 + st * (A_BYTES + TBN * BK * 2), bar = bars + st * 8;
    mbar_expect_tx(bar, A_BYTES + TBN * BK * 2);
    tma_load_2d(sa, &map_a, kt * BK, row0, bar);
    tma_load_2d(sa + A_BYTES, &map_b, kt * BK, e * N + n0, bar);
  };
  if (leader)
    for (int st = 0; st < TST && st < ktiles; ++st) issue(st, st);
  float acc[TBN / 2];
#pragma unroll
  for (int i = 0; i < TBN / 2; ++i) acc[i] = 0.f;
  const int wg = threadIdx.x >> 7;
  for (int kt = 0; kt < ktiles; ++kt) {
    const int st = kt % TST;
    mbar_wait(bars + st * 8, uint32_t((kt / TST) & 1));
    const uint32_t sa = s0 + st * (A_BYTES + TBN * BK * 2) + wg * 64 * 128, sb = s0 + st * (A_BYTES + TBN * BK * 2) + A_BYTES;
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < BK / 16; ++kk)
      if constexpr (TBN == 256)
        wgmma_m64n256k16(acc, wgmma_desc_kmajor_sw128(sa + kk * 32), wgmma_desc_kmajor_sw128(sb + kk * 32));
      else
        wgmma_m64n128k16(acc, wgmma_desc_kmajor_sw128(sa + kk * 32), wgmma_desc_kmajor_sw128(sb + kk * 32));
    wgmma_commit();
    wgmma_wait<1>();  // the previous group is done: its stage may be refilled
    __syncthreads();
    if (leader && kt >= 1 && kt - 1 + TST < ktiles) issue((kt - 1) % TST, kt - 1 + TST);
  }
  wgmma_wait<0>();
  const int w = (threadIdx.x >> 5) & 3, lane = threadIdx.x & 31, g = lane >> 2, t4 = lane & 3;
  TC* c_base = C + int64_t(row0) * N;
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    int m = wg * 64 + w * 16 + g + h * 8;
    if (m >= rows) continue;
    TC* crow = c_base + int64_t(m) * N;
#pragma unroll
    for (int j = 0; j < TBN / 8; ++j) {
      int n = n0 + j * 8 + 2 * t4;
      if (n >= N) continue;
      float v0 = acc[4 * j + 2 * h], v1 = acc[4 * j + 2 * h + 1];
      if constexpr (std::is_same_v<TC, float>)
        *reinterpret_cast<float2*>(crow + n) = make_float2(v0, v1);
      else
        *reinterpret_cast<__nv_bfloat162*>(crow + n) = __floats2bfloat162_rn(v0, v1);
    }
  }
}

template <class Kernel>
void set_smem_sm90(Kernel k) {
  static std::set<const void*> done;
  if (done.insert(reinterpret_cast<const void*>(k)).second)
    MOELAB_CUDA_CHECK(cudaFuncSetAttribute(k, cudaFuncAttributeMaxDynamicSharedMemorySize, SMEM_BYTES));
}

}  // namespace

void forward_sm90(const bf16* A, const bf16* W, void* C, DType c_dtype, const int32_t* offsets, int E, int64_t R,
                  int N, int K, cudaStream_t stream) {
  dim3 grid(unsigned((N + BN - 1) / BN), unsigned((R + BM - 1) / BM + E));
  if (c_dtype == DType::bf16) {
    set_smem_sm90(grouped_fwd_wgmma_kernel<bf16>);
    grouped_fwd_wgmma_kernel<bf16><<<grid, THREADS, SMEM_BYTES, stream>>>(A, W, static_cast<bf16*>(C), offsets, E, N, K);
  } else {
    set_smem_sm90(grouped_fwd_wgmma_kernel<float>);
    grouped_fwd_wgmma_kernel<float><<<grid, THREADS, SMEM_BYTES, stream>>>(A, W, static_cast<float*>(C), offsets, E, N,
                                                                           K);
  }
  MOELAB_CUDA_LAUNCH_CHECK("grouped_fwd_wgmma_kernel");
}

template <int TBN, int TST>
void forward_tma_cfg(const bf16* A, const bf16* W, void* C, DType c_dtype, const int32_t* offsets, int E, int64_t R,
                     int N, int K, cudaStream_t stream) {
  CUtensorMap ma = make_map(A, R, K, BM), mb = make_map(W, int64_t(E) * N, K, TBN);
  dim3 grid(unsigned((N + TBN - 1) / TBN), unsigned((R + BM - 1) / BM + E));
  constexpr int smem = tma_smem_bytes<TBN, TST>();
  auto launch = [&](auto kernel, auto* c) {
    static std::set<const void*> done;
    if (done.insert(reinterpret_cast<const void*>(kernel)).second)
      MOELAB_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
    kernel<<<grid, THREADS, smem, stream>>>(ma, mb, c, offsets, E, N, K);
  };
  if (c_dtype == DType::bf16) launch(grouped_fwd_tma_kernel<TBN, TST, bf16>, static_cast<bf16*>(C));
  else launch(grouped_fwd_tma_kernel<TBN, TST, float>, static_cast<float*>(C));
  MOELAB_CUDA_LAUNCH_CHECK("grouped_fwd_tma_kernel");
}

void forward_sm90_tma(const bf16* A, const bf16* W, void* C, DType c_dtype, const int32_t* offsets, int E,
                      int64_t R, int N, int K, cudaStream_t stream, int tile_n) {
  if (tile_n == 128) forward_tma_cfg<128, 3>(A, W, C, c_dtype, offsets, E, R, N, K, stream);
  else forward_tma_cfg<256, 4>(A, W, C, c_dtype, offsets, E, R, N, K, stream);
}

}  // namespace grouped_gemm_lab
}  // namespace moelab
