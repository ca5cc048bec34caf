// Tensor-core flash attention for bf16 inputs with head_dim 64 (the seed's shape), forward and
// backward, in the FlashAttention-2 arrangement: a block of 4 warps owns 64 rows (16 per warp),
// scores live only in mma accumulators, and the accumulator layout of S is re-packed in registers
// as the A operand of the next product (P V, dS K, ...), so nothing but 64x64 bf16 tiles of
// q/k/v/dO passes through shared memory (XOR-swizzled for ldmatrix).
//   forward: per query block, loop over key blocks with an online softmax; writes out and lse.
//   dq:      per query block, loop over key blocks: dS = P (dO V^T - D), dQ += dS K.
//   dk, dv:  per key block, loop over the group's query heads and query blocks, computing the
//            transposed scores K Q^T directly: dV += P^T dO, dK += dS^T Q. No atomics.
#include "backend/cuda/cuda_common.cuh"
#include "backend/cuda/flash_attention.cuh"
#include "backend/cuda/mma_utils.cuh"

namespace moelab {
using namespace cuda_detail;

namespace flash {

namespace {

constexpr int HD = 64, BR = 64, THREADS = 128, TILE = BR * HD * 2;  // 8 KiB per tile
constexpr float kLog2e = 1.4426950408889634f;
constexpr int DKV_SMEM = 6 * TILE + 4 * BR * int(sizeof(float));

// Rows [t0, t0 + 64) of head h of a [B, T, H, 64] bf16 tensor into a swizzled tile (zeros past T).
__device__ __forceinline__ void load_tile(uint32_t s, const bf16* base, int b, int t0, int h, int T, int H) {
#pragma unroll
  for (int it = 0; it < BR * 8 / THREADS; ++it) {
    int q = threadIdx.x + it * THREADS, r = q >> 3, c = q & 7, t = t0 + r;
    bool ok = t < T;
    const bf16* src = ok ? base + ((int64_t(b) * T + t) * H + h) * HD + c * 8 : base;
    cp_async16(s + swz(r, c, 8), src, ok);
  }
}

// A fragments (16 rows of this warp x 64) of a row-major tile, for the 4 k-steps of 16.
__device__ __forceinline__ void load_a_frags(uint32_t s, int row0, uint32_t (&f)[4][4]) {
  const int lane = threadIdx.x & 31, li = lane >> 3, lr = lane & 7;
#pragma unroll
  for (int kk = 0; kk < 4; ++kk) ldmatrix_x4<false>(s + swz(row0 + lr + (li & 1) * 8, kk * 2 + (li >> 1), 8), f[kk]);
}

// acc[8][4] (16 x 64) += A (16 x 64, fragments) @ tile^T, tile rows = the 64 output columns.
__device__ __forceinline__ void mma_a_bt(const uint32_t (&a)[4][4], uint32_t s, float (&acc)[8][4]) {
  const int lane = threadIdx.x & 31, li = lane >> 3, lr = lane & 7;
#pragma unroll
  for (int kk = 0; kk < 4; ++kk)
#pragma unroll
    for (int np = 0; np < 4; ++np) {
      uint32_t b[4];
      ldmatrix_x4<false>(s + swz(np * 16 + lr + (li >> 1) * 8, kk * 2 + (li & 1), 8), b);
      mma_bf16(acc[2 * np], a[kk], b[0], b[1]);
      mma_bf16(acc[2 * np + 1], a[kk], b[2], b[3]);
    }
}

// acc[8][4] (16 x 64) += P (16 x 64 keys, from accumulator registers) @ tile (64 keys x 64).
__device__ __forceinline__ void mma_p_v(const float (&p)[8][4], uint32_t s, float (&acc)[8][4]) {
  const int lane = threadIdx.x & 31, li = lane >> 3, lr = lane & 7;
#pragma unroll
  for (int kk = 0; kk < 4; ++kk) {
    uint32_t a[4] = {pack_bf16x2(p[2 * kk][0], p[2 * kk][1]), pack_bf16x2(p[2 * kk][2], p[2 * kk][3]),
                     pack_bf16x2(p[2 * kk + 1][0], p[2 * kk + 1][1]), pack_bf16x2(p[2 * kk + 1][2], p[2 * kk + 1][3])};
#pragma unroll
    for (int np = 0; np < 4; ++np) {
      uint32_t b[4];
      ldmatrix_x4<true>(s + swz(kk * 16 + lr + (li & 1) * 8, np * 2 + (li >> 1), 8), b);
      mma_bf16(acc[2 * np], a, b[0], b[1]);
      mma_bf16(acc[2 * np + 1], a, b[2], b[3]);
    }
  }
}

template <class TO>
__device__ __forceinline__ void store_rows(const float (&acc)[8][4], TO* base, int b, int row0, int h, int T, int H,
                                           float scale) {
  const int lane = threadIdx.x & 31, g = lane >> 2, t4 = lane & 3;
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    int t = row0 + g + half * 8;
    if (t >= T) continue;
    TO* dst = base + ((int64_t(b) * T + t) * H + h) * HD;
#pragma unroll
    for (int ni = 0; ni < 8; ++ni) {
      float x = acc[ni][2 * half] * scale, y = acc[ni][2 * half + 1] * scale;
      if constexpr (std::is_same_v<TO, float>) {
        *reinterpret_cast<float2*>(dst + ni * 8 + 2 * t4) = make_float2(x, y);
      } else {
        *reinterpret_cast<__nv_bfloat162*>(dst + ni * 8 + 2 * t4) = __floats2bfloat162_rn(x, y);
      }
    }
  }
}

__global__ void __launch_bounds__(THREADS) fwd_kernel(const bf16* q, const bf16* k, const bf16* v, bf16* out,
                                                      float* lse, int T, int Hq, int Hkv, float scale) {
  __shared__ __align__(128) char smem[5 * TILE];  // Q, then (K, V) twice: the next pair loads during compute
  const int bh = blockIdx.y, b = bh / Hq, h = bh % Hq, g = h / (Hq / Hkv);
  const int i0 = (gridDim.x - 1 - blockIdx.x) * BR;  // heaviest (latest) blocks first
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, gq = lane >> 2, t4 = lane & 3;
  const uint32_t sq = smem_u32(smem);
  const float sl2 = scale * kLog2e;
  const int row_a = i0 + warp * 16 + gq;
  load_tile(sq, q, b, i0, h, T, Hq);
  load_tile(sq + TILE, k, b, 0, g, T, Hkv);
  load_tile(sq + 2 * TILE, v, b, 0, g, T, Hkv);
  cp_async_commit();
  uint32_t qf[4][4];
  float o[8][4] = {}, m[2] = {-INFINITY, -INFINITY}, l[2] = {0.f, 0.f};
  const int ntiles = (min(T, i0 + BR) + BR - 1) / BR;
  for (int jt = 0; jt < ntiles; ++jt) {
    const int j0 = jt * BR;
    if (jt + 1 < ntiles) {
      const uint32_t nk = sq + TILE + ((jt + 1) & 1) * 2 * TILE;
      load_tile(nk, k, b, j0 + BR, g, T, Hkv);
      load_tile(nk + TILE, v, b, j0 + BR, g, T, Hkv);
    }
    cp_async_commit();
    cp_async_wait<1>();
    __syncthreads();
    const uint32_t sk = sq + TILE + (jt & 1) * 2 * TILE, sv = sk + TILE;
    if (jt == 0) load_a_frags(sq, warp * 16, qf);
    float s[8][4] = {};
    mma_a_bt(qf, sk, s);
    float mx[2] = {-INFINITY, -INFINITY};
#pragma unroll
    for (int ni = 0; ni < 8; ++ni)
#pragma unroll
      for (int r = 0; r < 4; ++r) {
        int col = j0 + ni * 8 + 2 * t4 + (r & 1), row = row_a + (r >> 1) * 8;
        float x = col > row ? -INFINITY : s[ni][r] * sl2;
        s[ni][r] = x;
        mx[r >> 1] = fmaxf(mx[r >> 1], x);
      }
#pragma unroll
    for (int hf = 0; hf < 2; ++hf) {
      mx[hf] = fmaxf(mx[hf], __shfl_xor_sync(0xffffffffu, mx[hf], 1));
      mx[hf] = fmaxf(mx[hf], __shfl_xor_sync(0xffffffffu, mx[hf], 2));
      float mn = fmaxf(m[hf], mx[hf]);
      float corr = exp2f(m[hf] - mn);
      m[hf] = mn;
      l[hf] *= corr;
#pragma unroll
      for (int ni = 0; ni < 8; ++ni) {
        o[ni][2 * hf] *= corr;
        o[ni][2 * hf + 1] *= corr;
      }
    }
#pragma unroll
    for (int ni = 0; ni < 8; ++ni)
#pragma unroll
      for (int r = 0; r < 4; ++r) {
        float p = exp2f(s[ni][r] - m[r >> 1]);
        s[ni][r] = p;
        l[r >> 1] += p;
      }
    mma_p_v(s, sv, o);
    __syncthreads();  // this K/V buffer is refilled two iterations on
  }
#pragma unroll
  for (int hf = 0; hf < 2; ++hf) {
    l[hf] += __shfl_xor_sync(0xffffffffu, l[hf], 1);
    l[hf] += __shfl_xor_sync(0xffffffffu, l[hf], 2);
  }
  const int lane_g = lane >> 2;
#pragma unroll
  for (int hf = 0; hf < 2; ++hf) {
    int t = row_a + hf * 8;
    if (t >= T) continue;
    float inv = 1.f / l[hf];
    bf16* dst = out + ((int64_t(b) * T + t) * Hq + h) * HD;
#pragma unroll
    for (int ni = 0; ni < 8; ++ni)
      *reinterpret_cast<__nv_bfloat162*>(dst + ni * 8 + 2 * t4) =
          __floats2bfloat162_rn(o[ni][2 * hf] * inv, o[ni][2 * hf + 1] * inv);
    if (t4 == 0) lse[(int64_t(b) * Hq + h) * T + t] = (m[hf] + log2f(l[hf])) / kLog2e;
  }
  (void)lane_g;
}

template <class TG>
__global__ void __launch_bounds__(THREADS) dq_kernel(const bf16* q, const bf16* k, const bf16* v, const bf16* dout,
                                                     const float* lse, const float* D, TG* dq, int T, int Hq, int Hkv,
                                                     float scale) {
  __shared__ __align__(128) char smem[6 * TILE];  // Q, dO, then (K, V) twice
  const int bh = blockIdx.y, b = bh / Hq, h = bh % Hq, g = h / (Hq / Hkv);
  const int i0 = (gridDim.x - 1 - blockIdx.x) * BR;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, gq = lane >> 2, t4 = lane & 3;
  const uint32_t sq = smem_u32(smem), sdo = sq + TILE;
  const float sl2 = scale * kLog2e;
  const int row_a = i0 + warp * 16 + gq;
  float lse2[2], Dr[2];
#pragma unroll
  for (int hf = 0; hf < 2; ++hf) {
    int t = row_a + hf * 8;
    lse2[hf] = t < T ? lse[(int64_t(b) * Hq + h) * T + t] * kLog2e : 0.f;
    Dr[hf] = t < T ? D[(int64_t(b) * Hq + h) * T + t] : 0.f;
  }
  load_tile(sq, q, b, i0, h, T, Hq);
  load_tile(sdo, dout, b, i0, h, T, Hq);
  load_tile(sq + 2 * TILE, k, b, 0, g, T, Hkv);
  load_tile(sq + 3 * TILE, v, b, 0, g, T, Hkv);
  cp_async_commit();
  uint32_t qf[4][4], df[4][4];
  float acc[8][4] = {};
  const int ntiles = (min(T, i0 + BR) + BR - 1) / BR;
  for (int jt = 0; jt < ntiles; ++jt) {
    const int j0 = jt * BR;
    if (jt + 1 < ntiles) {
      const uint32_t nk = sq + 2 * TILE + ((jt + 1) & 1) * 2 * TILE;
      load_tile(nk, k, b, j0 + BR, g, T, Hkv);
      load_tile(nk + TILE, v, b, j0 + BR, g, T, Hkv);
    }
    cp_async_commit();
    cp_async_wait<1>();
    __syncthreads();
    const uint32_t sk = sq + 2 * TILE + (jt & 1) * 2 * TILE, sv = sk + TILE;
    if (jt == 0) {
      load_a_frags(sq, warp * 16, qf);
      load_a_frags(sdo, warp * 16, df);
    }
    float s[8][4] = {}, dp[8][4] = {};
    mma_a_bt(qf, sk, s);
    mma_a_bt(df, sv, dp);
#pragma unroll
    for (int ni = 0; ni < 8; ++ni)
#pragma unroll
      for (int r = 0; r < 4; ++r) {
        int col = j0 + ni * 8 + 2 * t4 + (r & 1), row = row_a + (r >> 1) * 8;
        float p = col > row ? 0.f : exp2f(s[ni][r] * sl2 - lse2[r >> 1]);
        s[ni][r] = p * (dp[ni][r] - Dr[r >> 1]);
      }
    mma_p_v(s, sk, acc);
    __syncthreads();
  }
  store_rows(acc, dq, b, i0 + warp * 16, h, T, Hq, scale);
}

template <class TG>
__global__ void __launch_bounds__(THREADS) dkv_kernel(const bf16* q, const bf16* k, const bf16* v, const bf16* dout,
                                                      const float* lse, const float* D, TG* dk, TG* dv, int T, int Hq,
                                                      int Hkv, float scale) {
  extern __shared__ __align__(128) char dyn_smem[];  // K, V, then (Q, dO) twice; DKV_SMEM bytes
  char* smem = dyn_smem;
  float* lse_all = reinterpret_cast<float*>(dyn_smem + 6 * TILE);  // [2][BR]
  float* d_all = lse_all + 2 * BR;                                  // [2][BR]
  const int bg = blockIdx.y, b = bg / Hkv, g = bg % Hkv, group = Hq / Hkv;
  const int j0 = blockIdx.x * BR;  // lightest-first is fine: work grows toward j0 = 0
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, gq = lane >> 2, t4 = lane & 3;
  const uint32_t sk = smem_u32(smem), sv = sk + TILE;
  const float sl2 = scale * kLog2e;
  const int key_a = j0 + warp * 16 + gq;
  load_tile(sk, k, b, j0, g, T, Hkv);
  load_tile(sv, v, b, j0, g, T, Hkv);
  cp_async_commit();
  cp_async_wait<0>();
  __syncthreads();
  uint32_t kf[4][4], vf[4][4];
  load_a_frags(sk, warp * 16, kf);
  load_a_frags(sv, warp * 16, vf);
  float dka[8][4] = {}, dva[8][4] = {};
  // Iterations run over (query head of the group, query block >= j0), flattened so that the next
  // Q/dO pair (and its lse, D) loads while the current one is used.
  const int nq = (T - j0 + BR - 1) / BR, iters = group * nq;
  auto prefetch = [&](int it) {
    const int h = g * group + it / nq, i0 = j0 + (it % nq) * BR, buf = it & 1;
    const uint32_t dst = sk + 2 * TILE + buf * 2 * TILE;
    load_tile(dst, q, b, i0, h, T, Hq);
    load_tile(dst + TILE, dout, b, i0, h, T, Hq);
    if (threadIdx.x < BR) {
      int t = i0 + threadIdx.x;
      lse_all[buf * BR + threadIdx.x] = t < T ? lse[(int64_t(b) * Hq + h) * T + t] * kLog2e : 0.f;
      d_all[buf * BR + threadIdx.x] = t < T ? D[(int64_t(b) * Hq + h) * T + t] : 0.f;
    }
  };
  if (iters > 0) prefetch(0);
  cp_async_commit();
  for (int it = 0; it < iters; ++it) {
    {
      const int i0 = j0 + (it % nq) * BR, buf = it & 1;
      if (it + 1 < iters) prefetch(it + 1);
      cp_async_commit();
      cp_async_wait<1>();
      __syncthreads();
      const uint32_t sq = sk + 2 * TILE + buf * 2 * TILE, sdo = sq + TILE;
      const float* lse_s = lse_all + buf * BR;
      const float* d_s = d_all + buf * BR;
      float s[8][4] = {}, dp[8][4] = {};
      mma_a_bt(kf, sq, s);   // S^T: keys x queries
      mma_a_bt(vf, sdo, dp);  // dP^T = V dO^T
#pragma unroll
      for (int ni = 0; ni < 8; ++ni)
#pragma unroll
        for (int r = 0; r < 4; ++r) {
          int qc = ni * 8 + 2 * t4 + (r & 1), qt = i0 + qc, key = key_a + (r >> 1) * 8;
          float p = (qt < T && qt >= key) ? exp2f(s[ni][r] * sl2 - lse_s[qc]) : 0.f;
          s[ni][r] = p;
          dp[ni][r] = p * (dp[ni][r] - d_s[qc]);
        }
      mma_p_v(s, sdo, dva);  // dV += P^T dO
      mma_p_v(dp, sq, dka);  // dK += dS^T Q
      __syncthreads();       // this buffer is refilled two iterations on
    }
  }
  store_rows(dka, dk, b, j0 + warp * 16, g, T, Hkv, scale);
  store_rows(dva, dv, b, j0 + warp * 16, g, T, Hkv, 1.f);
}

}  // namespace

void forward(const bf16* q, const bf16* k, const bf16* v, bf16* out, float* lse, int B, int T, int Hq, int Hkv,
             float scale, cudaStream_t stream) {
  dim3 grid(unsigned((T + BR - 1) / BR), unsigned(B * Hq));
  fwd_kernel<<<grid, THREADS, 0, stream>>>(q, k, v, out, lse, T, Hq, Hkv, scale);
  MOELAB_CUDA_LAUNCH_CHECK("flash fwd_kernel");
}

void backward(const bf16* q, const bf16* k, const bf16* v, const bf16* dout, const float* lse, const float* D,
              void* dq, void* dk, void* dv, DType grad_dtype, int B, int T, int Hq, int Hkv, float scale,
              cudaStream_t stream) {
  dim3 gq(unsigned((T + BR - 1) / BR), unsigned(B * Hq)), gk(unsigned((T + BR - 1) / BR), unsigned(B * Hkv));
  static bool attr_done = false;
  if (!attr_done) {
    MOELAB_CUDA_CHECK(cudaFuncSetAttribute(dkv_kernel<bf16>, cudaFuncAttributeMaxDynamicSharedMemorySize, DKV_SMEM));
    MOELAB_CUDA_CHECK(cudaFuncSetAttribute(dkv_kernel<float>, cudaFuncAttributeMaxDynamicSharedMemorySize, DKV_SMEM));
    attr_done = true;
  }
  if (grad_dtype == DType::bf16) {
    dq_kernel<bf16><<<gq, THREADS, 0, stream>>>(q, k, v, dout, lse, D, static_cast<bf16*>(dq), T, Hq, Hkv, scale);
    dkv_kernel<bf16><<<gk, THREADS, DKV_SMEM, stream>>>(q, k, v, dout, lse, D, static_cast<bf16*>(dk),
                                                 static_cast<bf16*>(dv), T, Hq, Hkv, scale);
  } else {
    dq_kernel<float><<<gq, THREADS, 0, stream>>>(q, k, v, dout, lse, D, static_cast<float*>(dq), T, Hq, Hkv, scale);
    dkv_kernel<float><<<gk, THREADS, DKV_SMEM, stream>>>(q, k, v, dout, lse, D, static_cast<float*>(dk),
                                                  static_cast<float*>(dv), T, Hq, Hkv, scale);
  }
  MOELAB_CUDA_LAUNCH_CHECK("flash backward kernels");
}

}  // namespace flash
}  // namespace moelab
