// Kernel lab: the warp-specialized FP8 grouped GEMM (see grouped_gemm_fp8_ws.cuh).
#include "grouped_gemm_fp8_ws.cuh"

#include <cuda.h>

#include <algorithm>
#include <set>
#include <type_traits>

#include "backend/cuda/cuda_common.cuh"
#include "backend/cuda/grouped_gemm_sm90.cuh"
#include "backend/cuda/mma_utils.cuh"
#include "backend/cuda/wgmma.cuh"
#include "backend/cuda/wgmma_epilogue.cuh"
#include "wgmma_fp8_n256.cuh"

namespace moelab::grouped_gemm_lab {

using namespace cuda_detail;
using namespace grouped_gemm::sm90;
using grouped_gemm::Fp8GroupedScales;
using grouped_gemm::Fp8ScaleMode;

namespace {

constexpr int WS_BN = 256;                      // output tile columns (BM = 128 rows)
constexpr int WS_KB = 128;                      // FP8 values per stage row (128 bytes)
constexpr int WS_STAGES = 4;
constexpr int WS_A = BM * WS_KB;                // 16 KB
constexpr int WS_STAGE = WS_A + WS_BN * WS_KB;  // 48 KB
constexpr int WS_THREADS = 384;                 // producer warpgroup + two consumer warpgroups
constexpr int WS_SMEM = WS_STAGES * WS_STAGE + 1024 + 2 * WS_STAGES * 8;

__device__ __forceinline__ void mbar_arrive(uint32_t bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(bar) : "memory");
}

template <int AFMT>
__device__ __forceinline__ void mma_k32(float (&d)[128], uint64_t a, uint64_t b, int accumulate) {
  if constexpr (AFMT == 0) wgmma_m64n256k32_e4m3_e4m3(d, a, b, accumulate);
  else wgmma_m64n256k32_e5m2_e4m3(d, a, b, accumulate);
}

template <class TC>
__device__ __forceinline__ void store2(TC* p, float v0, float v1) {
  if constexpr (std::is_same_v<TC, float>) *reinterpret_cast<float2*>(p) = make_float2(v0, v1);
  else *reinterpret_cast<__nv_bfloat162*>(p) = __floats2bfloat162_rn(v0, v1);
}

// Step g (all of a block's k-steps over all its tiles, in order) uses stage g % WS_STAGES; its
// n-th use (n = g / WS_STAGES) is the full barrier's n-th phase and, for the producer's refill,
// waits for the empty barrier's (n - 1)-th phase.
template <int MODE, int AFMT, class TC>
__global__ void __launch_bounds__(WS_THREADS, 1)
    fp8_grouped_fwd_ws_kernel(const __grid_constant__ CUtensorMap map_a, const __grid_constant__ CUtensorMap map_b, TC* C,
                              const int32_t* offsets, int E, int N, int K, Fp8GroupedScales sc) {
  extern __shared__ char smem_raw[];
  const int n_tiles_n = (N + WS_BN - 1) / WS_BN;
  const uint32_t s0 = (smem_u32(smem_raw) + 1023) & ~1023u;
  const uint32_t full = s0 + WS_STAGES * WS_STAGE, empty = full + WS_STAGES * 8;
  if (threadIdx.x == 0) {
    for (int st = 0; st < WS_STAGES; ++st) {
      mbar_init(full + st * 8, 1);   // the producer's arrive.expect_tx
      mbar_init(empty + st * 8, 2);  // one arrive per consumer warpgroup
    }
    asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
  }
  __syncthreads();
  const int ktiles = (K + WS_KB - 1) / WS_KB;
  const int wg = threadIdx.x >> 7;

  if (wg == 0) {  // producer: one thread issues every load
    asm volatile("setmaxnreg.dec.sync.aligned.u32 40;\n");
    if (threadIdx.x != 0) return;
    int g = 0;
    for (int t = blockIdx.x;; t += gridDim.x) {
      const FwdTile tile = fwd_tile<WS_BN>(t, offsets, E, n_tiles_n);
      if (!tile.valid) break;
      for (int kt = 0; kt < ktiles; ++kt, ++g) {
        const int st = g % WS_STAGES;
        if (g >= WS_STAGES) mbar_wait(empty + st * 8, uint32_t((g / WS_STAGES - 1) & 1));
        const uint32_t sa = s0 + st * WS_STAGE, bar = full + st * 8;
        mbar_expect_tx(bar, WS_STAGE);
        tma_load_2d(sa, &map_a, kt * WS_KB, tile.row0, bar);
        tma_load_2d(sa + WS_A, &map_b, kt * WS_KB, tile.e * N + tile.n0, bar);
      }
    }
    return;
  }

  asm volatile("setmaxnreg.inc.sync.aligned.u32 232;\n");
  const int cw = wg - 1;  // consumer warpgroup: tile rows 64 * cw .. 64 * cw + 63
  const int w = (threadIdx.x >> 5) & 3, lane = threadIdx.x & 31, g4 = lane >> 2, t4 = lane & 3;
  const bool signals = (threadIdx.x & 127) == 0;  // the warpgroup's thread that releases stages
  int g = 0;
  for (int t = blockIdx.x;; t += gridDim.x) {
    const FwdTile cur = fwd_tile<WS_BN>(t, offsets, E, n_tiles_n);
    if (!cur.valid) break;
    float acc[128];
#pragma unroll
    for (int i = 0; i < 128; ++i) acc[i] = 0.f;
    for (int kt = 0; kt < ktiles; ++kt, ++g) {
      const int st = g % WS_STAGES;
      mbar_wait(full + st * 8, uint32_t((g / WS_STAGES) & 1));
      const uint32_t sa = s0 + st * WS_STAGE + cw * 64 * WS_KB, sb = s0 + st * WS_STAGE + WS_A;
      wgmma_fence();
#pragma unroll
      for (int kk = 0; kk < WS_KB / 32; ++kk)
        mma_k32<AFMT>(acc, wgmma_desc_kmajor_sw128(sa + kk * 32), wgmma_desc_kmajor_sw128(sb + kk * 32), 1);
      wgmma_commit();
      wgmma_wait<1>();  // step g - 1 of this tile is done: release its stage
      if (kt > 0 && signals) mbar_arrive(empty + ((g - 1) % WS_STAGES) * 8);
    }
    wgmma_wait<0>();
    if (signals) mbar_arrive(empty + ((g - 1) % WS_STAGES) * 8);  // the tile's last stage
    float tensor_f = 1.0f;
    if constexpr (MODE == int(Fp8ScaleMode::tensor)) tensor_f = sc.a[cur.e] * sc.w[cur.e];
    TC* c_base = C + int64_t(cur.row0) * N;
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int m = cw * 64 + w * 16 + g4 + h * 8;
      if (m >= cur.rows) continue;
      float fr = tensor_f;
      if constexpr (MODE == int(Fp8ScaleMode::row)) fr = sc.a[cur.row0 + m];
      float v[WS_BN / 8][2];
#pragma unroll
      for (int j = 0; j < WS_BN / 8; ++j) {
        const int n = cur.n0 + j * 8 + 2 * t4;
        float f0 = fr, f1 = fr;
        if constexpr (MODE == int(Fp8ScaleMode::row)) {
          f0 *= n < N ? sc.w[int64_t(cur.e) * N + n] : 0.0f;
          f1 *= n < N ? sc.w[int64_t(cur.e) * N + n + 1] : 0.0f;
        }
        v[j][0] = acc[4 * j + 2 * h] * f0;
        v[j][1] = acc[4 * j + 2 * h + 1] * f1;
      }
      if constexpr (std::is_same_v<TC, __nv_bfloat16>) {
        store_row_bf16(c_base + int64_t(m) * N, cur.n0, N, v, lane);
      } else {
#pragma unroll
        for (int j = 0; j < WS_BN / 8; ++j) {
          const int n = cur.n0 + j * 8 + 2 * t4;
          if (n < N) store2(c_base + int64_t(m) * N + n, v[j][0], v[j][1]);
        }
      }
    }
  }
}

template <int MODE, int AFMT, class TC>
void launch(const CUtensorMap& ma, const CUtensorMap& mb, void* C, const int32_t* offsets, int E, int64_t R, int N,
            int K, const Fp8GroupedScales& sc, int sms, cudaStream_t stream) {
  auto kernel = fp8_grouped_fwd_ws_kernel<MODE, AFMT, TC>;
  static std::set<const void*> raised;
  if (raised.insert(reinterpret_cast<const void*>(kernel)).second)
    MOELAB_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, WS_SMEM));
  const int64_t tiles_max = int64_t((N + WS_BN - 1) / WS_BN) * ((R + BM - 1) / BM + E);
  const unsigned grid = unsigned(std::min<int64_t>(tiles_max, sms));
  kernel<<<grid, WS_THREADS, WS_SMEM, stream>>>(ma, mb, static_cast<TC*>(C), offsets, E, N, K, sc);
  MOELAB_CUDA_LAUNCH_CHECK("fp8_grouped_fwd_ws_kernel");
}

template <int MODE>
void launch_mode(const CUtensorMap& ma, const CUtensorMap& mb, DType a_format, void* C, DType c_dtype,
                 const int32_t* offsets, int E, int64_t R, int N, int K, const Fp8GroupedScales& sc, int sms,
                 cudaStream_t stream) {
  const bool e5m2 = a_format == DType::e5m2, f32 = c_dtype == DType::f32;
  if (e5m2 && f32) launch<MODE, 1, float>(ma, mb, C, offsets, E, R, N, K, sc, sms, stream);
  else if (e5m2) launch<MODE, 1, __nv_bfloat16>(ma, mb, C, offsets, E, R, N, K, sc, sms, stream);
  else if (f32) launch<MODE, 0, float>(ma, mb, C, offsets, E, R, N, K, sc, sms, stream);
  else launch<MODE, 0, __nv_bfloat16>(ma, mb, C, offsets, E, R, N, K, sc, sms, stream);
}

}  // namespace

void forward_fp8_ws(const uint8_t* A, DType a_format, const uint8_t* W, const Fp8GroupedScales& scales, void* C,
                    DType c_dtype, const int32_t* offsets, int E, int64_t R, int N, int K, int sms, cudaStream_t stream) {
  if (scales.mode == Fp8ScaleMode::block)
    throw Error("forward_fp8_ws: block scaling is not a mode of the warp-specialized variant (use tensor or row)");
  const CUtensorMap ma = make_map_fp8(A, R, K, BM), mb = make_map_fp8(W, int64_t(E) * N, K, WS_BN);
  if (scales.mode == Fp8ScaleMode::tensor)
    launch_mode<int(Fp8ScaleMode::tensor)>(ma, mb, a_format, C, c_dtype, offsets, E, R, N, K, scales, sms, stream);
  else
    launch_mode<int(Fp8ScaleMode::row)>(ma, mb, a_format, C, c_dtype, offsets, E, R, N, K, scales, sms, stream);
}

}  // namespace moelab::grouped_gemm_lab
