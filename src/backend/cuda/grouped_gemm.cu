// Grouped BF16 GEMM for the experts, reading the per-expert row offsets on the device: the
// backend entry points, and the first (sm_80-style) kernel, kept as the reference version that
// the benchmark compares against and as the path for an empty batch.
//
// The backend runs the Hopper kernels of grouped_gemm_sm90.cu (wgmma fed by TMA):
//   forward:        C[rows of e] = A[rows of e] @ W[e]^T            (W [E, N, K], K-major)
//   data gradient:  C[rows of e] = A[rows of e] @ W[e]              (W [E, K, N] read MN-major)
//   weight grad.:   dW[e] = beta dW[e] + dY_e^T X_e                 (both operands MN-major)
//
// The kernel here (v1: mma.sync m16n8k16, f32 accumulation) covers the same three products with
// 128x128x64 tiles in a 3-stage cp.async pipeline, shared memory XOR-swizzled in 16-byte chunks so
// ldmatrix (with .trans for operands whose reduction dim is the outer one) is free of bank
// conflicts. For the row-grouped GEMMs, grid.y enumerates (expert, row tile) pairs: a block finds
// its expert by walking the device offsets, and blocks past the last tile exit, so the grid is
// sized from the buffer's capacity (ceil(R/128) + E tiles) and no host synchronization is needed.
#include <set>
#include <type_traits>

#include "backend/cuda/cuda_common.cuh"
#include "backend/cuda/grouped_gemm.cuh"
#include "backend/cuda/mma_utils.cuh"

namespace moelab {
using namespace cuda_detail;

namespace grouped_gemm {

namespace {

constexpr int BM = 128, BN = 128, BK = 64, STAGES = 3, THREADS = 256;
constexpr int TILE_BYTES = BM * BK * 2;  // 16 KiB per operand tile (BM == BN)
constexpr int SMEM_BYTES = STAGES * 2 * TILE_BYTES;


// One operand tile of 128 (outer: m or n) x 64 (k) elements into shared memory.
// KMajor: element (o, k) at base[o * ld + k], stored rows o (8 chunks each).
// otherwise: element (o, k) at base[k * ld + o], stored rows k (16 chunks each).
template <bool KMajor>
__device__ __forceinline__ void load_tile(uint32_t s, const bf16* base, int64_t ld, int o0, int o_end, int k0,
                                          int k_end) {
#pragma unroll
  for (int it = 0; it < (BM * BK / 8) / THREADS; ++it) {
    int q = threadIdx.x + it * THREADS;
    if constexpr (KMajor) {
      int r = q >> 3, c = q & 7;
      int o = o0 + r, k = k0 + c * 8;
      bool ok = o < o_end && k < k_end;
      const bf16* src = ok ? base + int64_t(o) * ld + k : base;
      cp_async16(s + swz(r, c, 8), src, ok);
    } else {
      int r = q >> 4, c = q & 15;
      int k = k0 + r, o = o0 + c * 8;
      bool ok = k < k_end && o < o_end;
      const bf16* src = ok ? base + int64_t(k) * ld + o : base;
      cp_async16(s + swz(r, c, 16), src, ok);
    }
  }
}

struct Problem {
  const bf16* a;  // operand A: element (m, k)
  const bf16* b;  // operand B: element (k, n)
  int64_t lda, ldb;
  int m_end, n_end, k_begin, k_end;  // A rows/B cols valid below *_end; reduction range
};

// Accumulates the block's 128x128 tile of A B over [k_begin, k_end) into acc.
template <bool AKMajor, bool BKMajor>
__device__ __forceinline__ void mainloop(const Problem& p, int m0, int n0, char* smem, float (&acc)[4][4][4]) {
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int wm = (warp >> 2) * 64, wn = (warp & 3) * 32;
  const uint32_t s0 = smem_u32(smem);
  auto a_stage = [&](int st) { return s0 + st * 2 * TILE_BYTES; };
  auto b_stage = [&](int st) { return s0 + st * 2 * TILE_BYTES + TILE_BYTES; };
  const int ktiles = (p.k_end - p.k_begin + BK - 1) / BK;

  auto load_stage = [&](int st, int kt) {
    int k0 = p.k_begin + kt * BK;
    load_tile<AKMajor>(a_stage(st), p.a, p.lda, m0, p.m_end, k0, p.k_end);
    load_tile<BKMajor>(b_stage(st), p.b, p.ldb, n0, p.n_end, k0, p.k_end);
  };

#pragma unroll
  for (int st = 0; st < STAGES - 1; ++st) {
    if (st < ktiles) load_stage(st, st);
    cp_async_commit();
  }
  for (int kt = 0; kt < ktiles; ++kt) {
    cp_async_wait<STAGES - 2>();
    __syncthreads();
    int nk = kt + STAGES - 1;
    if (nk < ktiles) load_stage(nk % STAGES, nk);
    cp_async_commit();
    const uint32_t sa = a_stage(kt % STAGES), sb = b_stage(kt % STAGES);
    const int li = lane >> 3, lr = lane & 7;
#pragma unroll
    for (int kk = 0; kk < BK / 16; ++kk) {
      uint32_t af[4][4], bfr[2][4];
#pragma unroll
      for (int mi = 0; mi < 4; ++mi) {
        if constexpr (AKMajor) {
          int m = wm + mi * 16 + lr + (li & 1) * 8;
          ldmatrix_x4<false>(sa + swz(m, kk * 2 + (li >> 1), 8), af[mi]);
        } else {
          int k = kk * 16 + lr + (li >> 1) * 8;
          ldmatrix_x4<true>(sa + swz(k, (wm + mi * 16) / 8 + (li & 1), 16), af[mi]);
        }
      }
#pragma unroll
      for (int np = 0; np < 2; ++np) {
        if constexpr (BKMajor) {
          int n = wn + np * 16 + lr + (li >> 1) * 8;
          ldmatrix_x4<false>(sb + swz(n, kk * 2 + (li & 1), 8), bfr[np]);
        } else {
          int k = kk * 16 + lr + (li & 1) * 8;
          ldmatrix_x4<true>(sb + swz(k, (wn + np * 16) / 8 + (li >> 1), 16), bfr[np]);
        }
      }
#pragma unroll
      for (int mi = 0; mi < 4; ++mi)
#pragma unroll
        for (int ni = 0; ni < 4; ++ni)
          mma_bf16(acc[mi][ni], af[mi], bfr[ni >> 1][(ni & 1) * 2], bfr[ni >> 1][(ni & 1) * 2 + 1]);
    }
  }
  cp_async_wait<0>();
}

template <class TC>
__device__ __forceinline__ void store_pair(TC* c, float v0, float v1, float beta) {
  if constexpr (std::is_same_v<TC, float>) {
    float2 o = make_float2(v0, v1);
    if (beta != 0.f) {
      float2 old = *reinterpret_cast<float2*>(c);
      o.x += beta * old.x;
      o.y += beta * old.y;
    }
    *reinterpret_cast<float2*>(c) = o;
  } else {
    if (beta != 0.f) {
      __nv_bfloat162 old = *reinterpret_cast<__nv_bfloat162*>(c);
      v0 += beta * __bfloat162float(old.x);
      v1 += beta * __bfloat162float(old.y);
    }
    *reinterpret_cast<__nv_bfloat162*>(c) = __floats2bfloat162_rn(v0, v1);
  }
}

template <class TC>
__device__ __forceinline__ void epilogue(float (&acc)[4][4][4], TC* c, int64_t ldc, int m0, int n0, int m_end,
                                         int n_end, float beta) {
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int wm = (warp >> 2) * 64, wn = (warp & 3) * 32;
  const int g = lane >> 2, t4 = lane & 3;
#pragma unroll
  for (int mi = 0; mi < 4; ++mi)
#pragma unroll
    for (int ni = 0; ni < 4; ++ni) {
      int n = n0 + wn + ni * 8 + t4 * 2;
      if (n >= n_end) continue;
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        int m = m0 + wm + mi * 16 + g + h * 8;
        if (m < m_end) store_pair(c + int64_t(m) * ldc + n, acc[mi][ni][2 * h], acc[mi][ni][2 * h + 1], beta);
      }
    }
}

// C[rows of e] = A[rows of e] @ op(W[e]); grid (N/BN, ceil(R/BM) + E).
template <bool WKMajor, class TC>
__global__ void __launch_bounds__(THREADS) grouped_fwd_kernel(const bf16* A, const bf16* W, TC* C,
                                                             const int32_t* offsets, int E, int N, int K) {
  extern __shared__ __align__(128) char smem[];
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
  Problem p;
  p.a = A + int64_t(row0) * K;
  p.lda = K;
  p.b = W + int64_t(e) * N * K;
  p.ldb = WKMajor ? K : N;
  p.m_end = rows;
  p.n_end = N;
  p.k_begin = 0;
  p.k_end = K;
  float acc[4][4][4] = {};
  const int n0 = blockIdx.x * BN;
  mainloop<true, WKMajor>(p, 0, n0, smem, acc);
  epilogue(acc, C + int64_t(row0) * N, N, 0, n0, rows, N, 0.f);
}

// dW[e] (N x K) = beta dW[e] + dY_e^T X_e; grid (K/BN, N/BM, E).
template <class TC>
__global__ void __launch_bounds__(THREADS) grouped_wgrad_kernel(const bf16* dY, const bf16* X, TC* dW,
                                                               const int32_t* offsets, int N, int K, float beta) {
  extern __shared__ __align__(128) char smem[];
  int e = blockIdx.z;
  Problem p;
  p.a = dY;  // element (m = n-index, k = row) at dY[row * N + m]
  p.lda = N;
  p.b = X;  // element (k = row, n = k-index) at X[row * K + n]
  p.ldb = K;
  p.m_end = N;
  p.n_end = K;
  p.k_begin = offsets[e];
  p.k_end = offsets[e + 1];
  float acc[4][4][4] = {};
  const int m0 = blockIdx.y * BM, n0 = blockIdx.x * BN;
  mainloop<false, false>(p, m0, n0, smem, acc);
  epilogue(acc, dW + int64_t(e) * N * K, K, m0, n0, N, K, beta);
}

// Raises a kernel's dynamic shared-memory limit once (the attribute is per function).
template <class Kernel>
void set_smem(Kernel k) {
  static std::set<const void*> done;
  if (done.insert(reinterpret_cast<const void*>(k)).second)
    MOELAB_CUDA_CHECK(cudaFuncSetAttribute(k, cudaFuncAttributeMaxDynamicSharedMemorySize, SMEM_BYTES));
}

}  // namespace

void forward(const bf16* A, const bf16* W, bool w_kmajor, void* C, DType c_dtype, const int32_t* offsets, int E,
             int64_t R, int N, int K, cudaStream_t stream) {
  dim3 grid(unsigned((N + BN - 1) / BN), unsigned((R + BM - 1) / BM + E));
  auto launch = [&](auto kernel, auto* c) {
    set_smem(kernel);
    kernel<<<grid, THREADS, SMEM_BYTES, stream>>>(A, W, c, offsets, E, N, K);
  };
  if (c_dtype == DType::bf16) {
    if (w_kmajor) launch(grouped_fwd_kernel<true, bf16>, static_cast<bf16*>(C));
    else launch(grouped_fwd_kernel<false, bf16>, static_cast<bf16*>(C));
  } else {
    if (w_kmajor) launch(grouped_fwd_kernel<true, float>, static_cast<float*>(C));
    else launch(grouped_fwd_kernel<false, float>, static_cast<float*>(C));
  }
  MOELAB_CUDA_LAUNCH_CHECK("grouped_fwd_kernel");
}

void wgrad(const bf16* dY, const bf16* X, void* dW, DType dw_dtype, const int32_t* offsets, int E, int N, int K,
           float beta, cudaStream_t stream) {
  dim3 grid(unsigned((K + BN - 1) / BN), unsigned((N + BM - 1) / BM), unsigned(E));
  if (dw_dtype == DType::f32) {
    set_smem(grouped_wgrad_kernel<float>);
    grouped_wgrad_kernel<float><<<grid, THREADS, SMEM_BYTES, stream>>>(dY, X, static_cast<float*>(dW), offsets, N,
                                                                       K, beta);
  } else {
    set_smem(grouped_wgrad_kernel<bf16>);
    grouped_wgrad_kernel<bf16><<<grid, THREADS, SMEM_BYTES, stream>>>(dY, X, static_cast<bf16*>(dW), offsets, N, K,
                                                                      beta);
  }
  MOELAB_CUDA_LAUNCH_CHECK("grouped_wgrad_kernel");
}

}  // namespace grouped_gemm

void CudaBackend::grouped_matmul(const Tensor& A, const Tensor& W, bool trans_w, Tensor& C, const Tensor& offsets,
                                 float alpha, float beta, const Tensor* addend) {
  grouped_matmul_impl(A, W, trans_w, C, offsets, alpha, beta, addend, {});
}

void CudaBackend::grouped_matmul_relu2(const Tensor& A, const Tensor& W, bool trans_w, Tensor& C,
                                       const Tensor& offsets, const ExpertRelu2Fold& fold) {
  check_bf16_relu2_fold(fold, C);
  if (C.dtype != DType::bf16) return Backend::grouped_matmul_relu2(A, W, trans_w, C, offsets, fold);
  grouped_gemm::Relu2Epilogue epi;
  if (fold.relu2_output) epi.out = fold.relu2_output->as<bf16>();
  if (fold.relu2_input) epi.in = fold.relu2_input->as<bf16>();
  grouped_matmul_impl(A, W, trans_w, C, offsets, 1.0f, 0.0f, nullptr, epi);
}

void CudaBackend::grouped_matmul_impl(const Tensor& A, const Tensor& W, bool trans_w, Tensor& C, const Tensor& offsets,
                                      float alpha, float beta, const Tensor* addend,
                                      const grouped_gemm::Relu2Epilogue& relu2) {
  require_dtype(A, DType::bf16, "grouped_matmul", "A (convert to bf16 with copy())");
  require_dtype(W, DType::bf16, "grouped_matmul", "W (use the bf16 compute copy)");
  require_float(C, "grouped_matmul", "C");
  require_dtype(offsets, DType::i32, "grouped_matmul", "offsets");
  require(W.ndim() == 3, "grouped_matmul", "W must be [E, N, K] or [E, K, N], got " + W.describe());
  int E = int(W.dim(0));
  int N = int(trans_w ? W.dim(1) : W.dim(2)), K = int(trans_w ? W.dim(2) : W.dim(1));
  require(offsets.numel() == E + 1, "grouped_matmul", "offsets must be [E+1]");
  require(A.cols() == K && C.cols() == N && C.rows() == A.rows(), "grouped_matmul",
          "A " + A.describe() + ", W " + W.describe() + ", C " + C.describe() + " do not agree");
  require(K % 8 == 0 && N % 8 == 0, "grouped_matmul", "K and N must be multiples of 8 (16-byte rows)");
  const bool add = beta != 0.0f && addend;
  if (add)
    require(addend->dtype == C.dtype && addend->numel() == C.numel(), "grouped_matmul",
            "addend " + addend->describe() + " must have C's dtype and size, C is " + C.describe());
  if (A.rows() == 0) return;
  // Hopper path. An N-major W (the data gradient's [E, K, N]) is read in place, MN-major, when
  // its K-steps stay inside one expert (K a multiple of 64); otherwise it is transposed first.
  const bf16* wk = W.as<bf16>();
  const bool w_mn_major = !trans_w && K % 64 == 0;
  if (!trans_w && !w_mn_major) {
    auto* wt = static_cast<bf16*>(scratch(ScratchSlot::gemm_b, W.bytes()));
    grouped_gemm::transpose_experts(W.as<bf16>(), wt, E, K, N, stream_);
    wk = wt;
  }
  // Persistent 128-wide tiles, two blocks per SM: one block's stores overlap the other's products
  // (0.74 / 0.82 of one cuBLASLt GEMM at the seed's expert shapes, against 0.66 / 0.79 for
  // one 256-wide tile per block; bench/cuda/bench_grouped_gemm.cpp).
  grouped_gemm::forward_sm90_tma_persistent(A.as<bf16>(), wk, w_mn_major, C.data, C.dtype, offsets.as<int32_t>(), E, A.rows(), N,
                                            K, sm_count_, stream_, 128, alpha, add ? beta : 0.0f,
                                            add ? addend->data : nullptr, relu2);
}

void CudaBackend::grouped_matmul_wgrad(const Tensor& dY, const Tensor& X, Tensor& dW, const Tensor& offsets,
                                       float beta, const Tensor* addend) {
  require_dtype(dY, DType::bf16, "grouped_matmul_wgrad", "dY");
  require_dtype(X, DType::bf16, "grouped_matmul_wgrad", "X");
  require_float(dW, "grouped_matmul_wgrad", "dW");
  require_dtype(offsets, DType::i32, "grouped_matmul_wgrad", "offsets");
  require(dW.ndim() == 3, "grouped_matmul_wgrad", "dW must be [E, N, K], got " + dW.describe());
  int E = int(dW.dim(0)), N = int(dW.dim(1)), K = int(dW.dim(2));
  require(offsets.numel() == E + 1 && dY.cols() == N && X.cols() == K && dY.rows() == X.rows(),
          "grouped_matmul_wgrad", "dY " + dY.describe() + ", X " + X.describe() + ", dW " + dW.describe());
  require(K % 8 == 0 && N % 8 == 0, "grouped_matmul_wgrad", "K and N must be multiples of 8 (16-byte rows)");
  const bool add = beta != 0.0f && addend && addend->data != dW.data;
  if (add)
    require(addend->dtype == dW.dtype && addend->numel() == dW.numel(), "grouped_matmul_wgrad",
            "addend " + addend->describe() + " must have dW's dtype and size, dW is " + dW.describe());
  if (dY.rows() == 0) {  // no rows to map for TMA: the v1 kernel just scales dW by beta
    if (add) copy(*addend, dW);
    grouped_gemm::wgrad(dY.as<bf16>(), X.as<bf16>(), dW.data, dW.dtype, offsets.as<int32_t>(), E, N, K, beta, stream_);
    return;
  }
  grouped_gemm::wgrad_sm90_tma(dY.as<bf16>(), X.as<bf16>(), dW.data, dW.dtype, offsets.as<int32_t>(), E, dY.rows(), N,
                               K, beta, stream_, grouped_gemm::wgrad_tile_n(E, N, K, sm_count_),
                               add ? addend->data : nullptr);
}

}  // namespace moelab
