// Kernel lab, attention: the head-dim-64 flash-attention variants the engine's kernels
// (src/backend/cuda/flash_attention.cu, which generalizes the chosen ones to head dim 128 and
// sliding windows) were picked from. Forward and backward, in the FlashAttention-2 arrangement: a block of 4 warps owns 64 rows (16 per warp),
// scores live only in mma accumulators, and the accumulator layout of S is re-packed in registers
// as the A operand of the next product (P V, dS K, ...), so nothing but 64x64 bf16 tiles of
// q/k/v/dO passes through shared memory (XOR-swizzled for ldmatrix).
//   forward: per query block, loop over key blocks with an online softmax; writes out and lse.
//   dq:      per query block, loop over key blocks: dS = P (dO V^T - D), dQ += dS K.
//   dk, dv:  per key block, loop over the group's query heads and query blocks, computing the
//            transposed scores K Q^T directly: dV += P^T dO, dK += dS^T Q. No atomics.
// The first kernels below are the base ones; the variants after them (see the block comment
// there and attention_variants_hd64.cuh) share their tile helpers; kProduction names the ones the
// engine's kernels were derived from.
#include "backend/cuda/cuda_common.cuh"
#include "attention_variants_hd64.cuh"
#include "backend/cuda/mma_utils.cuh"

namespace moelab {
using namespace cuda_detail;

namespace flash_lab {

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

// ---------------------------------------------------------------------------------------------
// Variants. What they change, against the kernels above:
//  * Only tiles that cross the diagonal pay for the causal mask (a template flag), and a warp
//    whose rows (keys) the whole tile lies past skips the tile's math (it still joins the
//    barriers). The scale folds into the exponent: p = ex2(s * scale*log2e - m'), one FFMA and
//    one MUFU per score, with ex2.approx.ftz (ample for bf16 probabilities).
//  * The grid is (heads, blocks) with the block index reversed where work grows with it, so the
//    heaviest blocks of every head go out in the first wave and the tail wave holds light ones.
//  * MG row groups per warp (m128: MG = 2): every K/V fragment read by ldmatrix feeds MG mma,
//    halving shared-memory traffic per flop, at the price of registers and occupancy.
//  * dq walks each 64-key tile in two 32-key halves so S and dP of the half stay small in
//    registers (that is what makes MG = 2 fit).
//  * dkv with NW warps x 16 keys (n128: NW = 8): each Q/dO tile staged in shared memory serves
//    twice as many keys, halving the L2 -> shared traffic and the barriers per flop. The lse and
//    D of each query tile come by cp.async with the tile (the base kernel's plain loads stall
//    two warps, and with them the barrier, every iteration).
// ---------------------------------------------------------------------------------------------

__device__ __forceinline__ float ex2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}

// 4-byte async copy (zero when !valid): per-row lse and D arrive with the tile they belong to
// instead of stalling the loading warps on a plain global load.
__device__ __forceinline__ void cp_async4(uint32_t dst, const void* src, bool valid) {
  int n = valid ? 4 : 0;
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(dst), "l"(src), "r"(n));
}

// Rows [t0, t0 + ROWS) of head h into a swizzled tile of ROWS rows (zeros past T), NTH threads.
template <int ROWS, int NTH>
__device__ __forceinline__ void load_rows_tile(uint32_t s, const bf16* base, int b, int t0, int h, int T, int H) {
  static_assert(ROWS * 8 % NTH == 0);
#pragma unroll
  for (int it = 0; it < ROWS * 8 / NTH; ++it) {
    int q = threadIdx.x + it * NTH, r = q >> 3, c = q & 7, t = t0 + r;
    bool ok = t < T;
    const bf16* src = ok ? base + ((int64_t(b) * T + t) * H + h) * HD + c * 8 : base;
    cp_async16(s + swz(r, c, 8), src, ok);
  }
}

// acc[mg] (16 x 16*NP) += A[mg] (16 x 64) @ (tile rows [r0, r0 + 16*NP))^T; each B fragment
// loaded once feeds all MG row groups.
template <int MG, int NP>
__device__ __forceinline__ void mma_a_bt_mg(const uint32_t (&a)[MG][4][4], uint32_t s, int r0,
                                            float (&acc)[MG][2 * NP][4]) {
  const int lane = threadIdx.x & 31, li = lane >> 3, lr = lane & 7;
#pragma unroll
  for (int kk = 0; kk < 4; ++kk)
#pragma unroll
    for (int np = 0; np < NP; ++np) {
      uint32_t bf[4];
      ldmatrix_x4<false>(s + swz(r0 + np * 16 + lr + (li >> 1) * 8, kk * 2 + (li & 1), 8), bf);
#pragma unroll
      for (int mg = 0; mg < MG; ++mg) {
        mma_bf16(acc[mg][2 * np], a[mg][kk], bf[0], bf[1]);
        mma_bf16(acc[mg][2 * np + 1], a[mg][kk], bf[2], bf[3]);
      }
    }
}

// acc[mg] (16 x 64) += P[mg] (16 x 16*KK, accumulator registers) @ tile rows [r0, r0 + 16*KK).
template <int MG, int KK>
__device__ __forceinline__ void mma_p_v_mg(const float (&p)[MG][2 * KK][4], uint32_t s, int r0,
                                           float (&acc)[MG][8][4]) {
  const int lane = threadIdx.x & 31, li = lane >> 3, lr = lane & 7;
#pragma unroll
  for (int kk = 0; kk < KK; ++kk) {
    uint32_t a[MG][4];
#pragma unroll
    for (int mg = 0; mg < MG; ++mg) {
      a[mg][0] = pack_bf16x2(p[mg][2 * kk][0], p[mg][2 * kk][1]);
      a[mg][1] = pack_bf16x2(p[mg][2 * kk][2], p[mg][2 * kk][3]);
      a[mg][2] = pack_bf16x2(p[mg][2 * kk + 1][0], p[mg][2 * kk + 1][1]);
      a[mg][3] = pack_bf16x2(p[mg][2 * kk + 1][2], p[mg][2 * kk + 1][3]);
    }
#pragma unroll
    for (int np = 0; np < 4; ++np) {
      uint32_t bf[4];
      ldmatrix_x4<true>(s + swz(r0 + kk * 16 + lr + (li & 1) * 8, np * 2 + (li >> 1), 8), bf);
#pragma unroll
      for (int mg = 0; mg < MG; ++mg) {
        mma_bf16(acc[mg][2 * np], a[mg], bf[0], bf[1]);
        mma_bf16(acc[mg][2 * np + 1], a[mg], bf[2], bf[3]);
      }
    }
  }
}

// One 64-key tile of the forward for a warp's MG row groups (rows w0 + mg*16 + [0, 16)).
template <int MG, bool MASK>
__device__ __forceinline__ void fwd_tile(const uint32_t (&qf)[MG][4][4], uint32_t sk, uint32_t sv, int j0, int w0,
                                         float sl2, float (&o)[MG][8][4], float (&m)[MG][2], float (&l)[MG][2]) {
  const int lane = threadIdx.x & 31, gq = lane >> 2, t4 = lane & 3;
  float s[MG][8][4] = {};
  mma_a_bt_mg<MG, 4>(qf, sk, 0, s);
#pragma unroll
  for (int mg = 0; mg < MG; ++mg) {
    float mx[2] = {-INFINITY, -INFINITY};
#pragma unroll
    for (int ni = 0; ni < 8; ++ni)
#pragma unroll
      for (int r = 0; r < 4; ++r) {
        if constexpr (MASK) {
          int col = j0 + ni * 8 + 2 * t4 + (r & 1), row = w0 + mg * 16 + gq + (r >> 1) * 8;
          if (col > row) s[mg][ni][r] = -INFINITY;
        }
        mx[r >> 1] = fmaxf(mx[r >> 1], s[mg][ni][r]);
      }
    float nm[2];
#pragma unroll
    for (int hf = 0; hf < 2; ++hf) {
      mx[hf] = fmaxf(mx[hf], __shfl_xor_sync(0xffffffffu, mx[hf], 1));
      mx[hf] = fmaxf(mx[hf], __shfl_xor_sync(0xffffffffu, mx[hf], 2));
      // Key 0 is visible to every row and tile 0 comes first, so mn is finite from then on.
      float mn = fmaxf(m[mg][hf], mx[hf]);
      float corr = ex2((m[mg][hf] - mn) * sl2);
      m[mg][hf] = mn;
      nm[hf] = -mn * sl2;
      l[mg][hf] *= corr;
#pragma unroll
      for (int ni = 0; ni < 8; ++ni) {
        o[mg][ni][2 * hf] *= corr;
        o[mg][ni][2 * hf + 1] *= corr;
      }
    }
#pragma unroll
    for (int ni = 0; ni < 8; ++ni)
#pragma unroll
      for (int r = 0; r < 4; ++r) {
        float p = ex2(fmaf(s[mg][ni][r], sl2, nm[r >> 1]));
        s[mg][ni][r] = p;
        l[mg][r >> 1] += p;
      }
  }
  mma_p_v_mg<MG, 4>(s, sv, 0, o);
}

// Forward, 4 warps x (16*MG) rows. Grid (B*Hq, blocks), the last (heaviest) query block first.
// MG = 1 is held to 168 registers (3 blocks an SM, as the base kernel gets) without spilling;
// MG = 2 needs nearly all 255 and runs 2 blocks an SM.
template <int MG>
__global__ void __launch_bounds__(THREADS, MG == 1 ? 3 : 1)
    fwd_v2_kernel(const bf16* q, const bf16* k, const bf16* v, bf16* out, float* lse, int T, int Hq, int Hkv,
                  float scale) {
  constexpr int BM = 64 * MG, WR = 16 * MG;
  __shared__ __align__(128) char smem[(MG + 4) * TILE];  // Q (BM rows), then (K, V) twice
  const int bh = blockIdx.x, b = bh / Hq, h = bh % Hq, g = h / (Hq / Hkv);
  const int i0 = (gridDim.y - 1 - blockIdx.y) * BM;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, gq = lane >> 2, t4 = lane & 3;
  const uint32_t sq = smem_u32(smem), skv = sq + MG * TILE;
  const float sl2 = scale * kLog2e;
  const int w0 = i0 + warp * WR;
  load_rows_tile<BM, THREADS>(sq, q, b, i0, h, T, Hq);
  load_tile(skv, k, b, 0, g, T, Hkv);
  load_tile(skv + TILE, v, b, 0, g, T, Hkv);
  cp_async_commit();
  uint32_t qf[MG][4][4];
  float o[MG][8][4] = {}, m[MG][2], l[MG][2];
#pragma unroll
  for (int mg = 0; mg < MG; ++mg) m[mg][0] = m[mg][1] = -INFINITY, l[mg][0] = l[mg][1] = 0.f;
  const int ntiles = (min(T, i0 + BM) + BR - 1) / BR;
  for (int jt = 0; jt < ntiles; ++jt) {
    const int j0 = jt * BR;
    if (jt + 1 < ntiles) {
      const uint32_t nk = skv + ((jt + 1) & 1) * 2 * TILE;
      load_tile(nk, k, b, j0 + BR, g, T, Hkv);
      load_tile(nk + TILE, v, b, j0 + BR, g, T, Hkv);
    }
    cp_async_commit();
    cp_async_wait<1>();
    __syncthreads();
    if (jt == 0) {
#pragma unroll
      for (int mg = 0; mg < MG; ++mg) load_a_frags(sq, warp * WR + mg * 16, qf[mg]);
    }
    const uint32_t sk = skv + (jt & 1) * 2 * TILE, sv = sk + TILE;
    if (j0 < w0 + WR) {  // otherwise every key of the tile lies after every row of this warp
      if (j0 + BR - 1 > w0)
        fwd_tile<MG, true>(qf, sk, sv, j0, w0, sl2, o, m, l);
      else
        fwd_tile<MG, false>(qf, sk, sv, j0, w0, sl2, o, m, l);
    }
    __syncthreads();  // this K/V buffer is refilled two iterations on
  }
#pragma unroll
  for (int mg = 0; mg < MG; ++mg)
#pragma unroll
    for (int hf = 0; hf < 2; ++hf) {
      float lt = l[mg][hf];
      lt += __shfl_xor_sync(0xffffffffu, lt, 1);
      lt += __shfl_xor_sync(0xffffffffu, lt, 2);
      const int t = w0 + mg * 16 + gq + hf * 8;
      if (t >= T) continue;
      const float inv = 1.f / lt;
      bf16* dst = out + ((int64_t(b) * T + t) * Hq + h) * HD;
#pragma unroll
      for (int ni = 0; ni < 8; ++ni)
        *reinterpret_cast<__nv_bfloat162*>(dst + ni * 8 + 2 * t4) =
            __floats2bfloat162_rn(o[mg][ni][2 * hf] * inv, o[mg][ni][2 * hf + 1] * inv);
      if (t4 == 0) lse[(int64_t(b) * Hq + h) * T + t] = (m[mg][hf] * sl2 + log2f(lt)) / kLog2e;
    }
}

// One 32-key half (keys c0 + [0, 32), tile rows r0 + [0, 32)) of the dq pass for a warp's rows.
template <int MG, bool MASK>
__device__ __forceinline__ void dq_half(const uint32_t (&qf)[MG][4][4], const uint32_t (&df)[MG][4][4], uint32_t sk,
                                        uint32_t sv, int r0, int c0, int w0, float sl2, const float (&nl2)[MG][2],
                                        const float (&Dr)[MG][2], float (&acc)[MG][8][4]) {
  const int lane = threadIdx.x & 31, gq = lane >> 2, t4 = lane & 3;
  float s[MG][4][4] = {}, dp[MG][4][4] = {};
  mma_a_bt_mg<MG, 2>(qf, sk, r0, s);
  mma_a_bt_mg<MG, 2>(df, sv, r0, dp);
#pragma unroll
  for (int mg = 0; mg < MG; ++mg)
#pragma unroll
    for (int ni = 0; ni < 4; ++ni)
#pragma unroll
      for (int r = 0; r < 4; ++r) {
        float p = ex2(fmaf(s[mg][ni][r], sl2, nl2[mg][r >> 1]));
        if constexpr (MASK) {
          int col = c0 + ni * 8 + 2 * t4 + (r & 1), row = w0 + mg * 16 + gq + (r >> 1) * 8;
          if (col > row) p = 0.f;
        }
        s[mg][ni][r] = p * (dp[mg][ni][r] - Dr[mg][r >> 1]);
      }
  mma_p_v_mg<MG, 2>(s, sk, r0, acc);
}

// dq, 4 warps x (16*MG) rows; dynamic shared memory (2*MG + 4) tiles.
template <class TG, int MG>
__global__ void __launch_bounds__(THREADS) dq_v2_kernel(const bf16* q, const bf16* k, const bf16* v, const bf16* dout,
                                                        const float* lse, const float* D, TG* dq, int T, int Hq,
                                                        int Hkv, float scale) {
  constexpr int BM = 64 * MG, WR = 16 * MG;
  extern __shared__ __align__(128) char dyn_smem[];  // Q, dO (BM rows each), then (K, V) twice
  const int bh = blockIdx.x, b = bh / Hq, h = bh % Hq, g = h / (Hq / Hkv);
  const int i0 = (gridDim.y - 1 - blockIdx.y) * BM;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, gq = lane >> 2;
  const uint32_t sq = smem_u32(dyn_smem), sdo = sq + MG * TILE, skv = sq + 2 * MG * TILE;
  const float sl2 = scale * kLog2e;
  const int w0 = i0 + warp * WR;
  float nl2[MG][2], Dr[MG][2];
#pragma unroll
  for (int mg = 0; mg < MG; ++mg)
#pragma unroll
    for (int hf = 0; hf < 2; ++hf) {
      int t = w0 + mg * 16 + gq + hf * 8;
      nl2[mg][hf] = t < T ? -lse[(int64_t(b) * Hq + h) * T + t] * kLog2e : 0.f;
      Dr[mg][hf] = t < T ? D[(int64_t(b) * Hq + h) * T + t] : 0.f;
    }
  load_rows_tile<BM, THREADS>(sq, q, b, i0, h, T, Hq);
  load_rows_tile<BM, THREADS>(sdo, dout, b, i0, h, T, Hq);
  load_tile(skv, k, b, 0, g, T, Hkv);
  load_tile(skv + TILE, v, b, 0, g, T, Hkv);
  cp_async_commit();
  uint32_t qf[MG][4][4], df[MG][4][4];
  float acc[MG][8][4] = {};
  const int ntiles = (min(T, i0 + BM) + BR - 1) / BR;
  for (int jt = 0; jt < ntiles; ++jt) {
    const int j0 = jt * BR;
    if (jt + 1 < ntiles) {
      const uint32_t nk = skv + ((jt + 1) & 1) * 2 * TILE;
      load_tile(nk, k, b, j0 + BR, g, T, Hkv);
      load_tile(nk + TILE, v, b, j0 + BR, g, T, Hkv);
    }
    cp_async_commit();
    cp_async_wait<1>();
    __syncthreads();
    if (jt == 0) {
#pragma unroll
      for (int mg = 0; mg < MG; ++mg) {
        load_a_frags(sq, warp * WR + mg * 16, qf[mg]);
        load_a_frags(sdo, warp * WR + mg * 16, df[mg]);
      }
    }
    const uint32_t sk = skv + (jt & 1) * 2 * TILE, sv = sk + TILE;
#pragma unroll
    for (int kh = 0; kh < 2; ++kh) {
      const int c0 = j0 + kh * 32;
      if (c0 < w0 + WR) {  // otherwise the half lies after every row of this warp
        if (c0 + 31 > w0)
          dq_half<MG, true>(qf, df, sk, sv, kh * 32, c0, w0, sl2, nl2, Dr, acc);
        else
          dq_half<MG, false>(qf, df, sk, sv, kh * 32, c0, w0, sl2, nl2, Dr, acc);
      }
    }
    __syncthreads();
  }
#pragma unroll
  for (int mg = 0; mg < MG; ++mg) store_rows(acc[mg], dq, b, w0 + mg * 16, h, T, Hq, scale);
}

// One 64-query tile of the dk/dv pass for a warp's 16 keys (kw0 + [0, 16)).
template <bool MASK>
__device__ __forceinline__ void dkv_tile(const uint32_t (&kf)[4][4], const uint32_t (&vf)[4][4], uint32_t sq,
                                         uint32_t sdo, const float* lse_s, const float* d_s, int i0, int kw0, int T,
                                         float sl2, float (&dka)[8][4], float (&dva)[8][4]) {
  const int lane = threadIdx.x & 31, gq = lane >> 2, t4 = lane & 3;
  float s[8][4] = {}, dp[8][4] = {};
  mma_a_bt(kf, sq, s);    // S^T: keys x queries
  mma_a_bt(vf, sdo, dp);  // dP^T = V dO^T
#pragma unroll
  for (int ni = 0; ni < 8; ++ni) {
    const float2 ls = *reinterpret_cast<const float2*>(lse_s + ni * 8 + 2 * t4);
    const float2 dd = *reinterpret_cast<const float2*>(d_s + ni * 8 + 2 * t4);
    const float nl[2] = {-ls.x * kLog2e, -ls.y * kLog2e};
#pragma unroll
    for (int r = 0; r < 4; ++r) {
      float p = ex2(fmaf(s[ni][r], sl2, nl[r & 1]));
      if constexpr (MASK) {
        int qt = i0 + ni * 8 + 2 * t4 + (r & 1), key = kw0 + gq + (r >> 1) * 8;
        if (qt < key || qt >= T) p = 0.f;
      }
      s[ni][r] = p;
      dp[ni][r] = p * (dp[ni][r] - ((r & 1) ? dd.y : dd.x));
    }
  }
  mma_p_v(s, sdo, dva);  // dV += P^T dO
  mma_p_v(dp, sq, dka);  // dK += dS^T Q
}

template <int NW>
constexpr int dkv_v2_smem() {
  return 2 * (16 * NW) * HD * 2 + 4 * TILE + 4 * BR * int(sizeof(float));
}

// dk, dv, NW warps x 16 keys; grid (B*Hkv, key blocks), key block 0 (the heaviest) first.
template <class TG, int NW>
__global__ void __launch_bounds__(32 * NW) dkv_v2_kernel(const bf16* q, const bf16* k, const bf16* v,
                                                         const bf16* dout, const float* lse, const float* D, TG* dk,
                                                         TG* dv, int T, int Hq, int Hkv, float scale) {
  constexpr int BN = 16 * NW, NTH = 32 * NW, KV_BYTES = BN * HD * 2;
  // K, V (BN rows each), then (Q, dO) twice, then lse and D of those queries, twice.
  extern __shared__ __align__(128) char dyn_smem[];
  float* lse_all = reinterpret_cast<float*>(dyn_smem + 2 * KV_BYTES + 4 * TILE);  // [2][BR]
  float* d_all = lse_all + 2 * BR;                                                 // [2][BR]
  const int bg = blockIdx.x, b = bg / Hkv, g = bg % Hkv, group = Hq / Hkv;
  const int j0 = blockIdx.y * BN;
  const int warp = threadIdx.x >> 5;
  const uint32_t sk = smem_u32(dyn_smem), sv = sk + KV_BYTES, sqd = sk + 2 * KV_BYTES;
  const float sl2 = scale * kLog2e;
  const int kw0 = j0 + warp * 16;
  load_rows_tile<BN, NTH>(sk, k, b, j0, g, T, Hkv);
  load_rows_tile<BN, NTH>(sv, v, b, j0, g, T, Hkv);
  cp_async_commit();
  cp_async_wait<0>();
  __syncthreads();
  uint32_t kf[4][4], vf[4][4];
  load_a_frags(sk, warp * 16, kf);
  load_a_frags(sv, warp * 16, vf);
  float dka[8][4] = {}, dva[8][4] = {};
  // Iterations run over (query head of the group, query tile >= j0), flattened so that the next
  // Q/dO pair (and its lse, D) loads while the current one is used.
  const int nq = (T - j0 + BR - 1) / BR, iters = group * nq;
  auto prefetch = [&](int it) {
    const int h = g * group + it / nq, i0 = j0 + (it % nq) * BR, buf = it & 1;
    const uint32_t dst = sqd + buf * 2 * TILE;
    load_rows_tile<BR, NTH>(dst, q, b, i0, h, T, Hq);
    load_rows_tile<BR, NTH>(dst + TILE, dout, b, i0, h, T, Hq);
    if (threadIdx.x < BR) {
      const int t = i0 + threadIdx.x;
      const int64_t src = t < T ? (int64_t(b) * Hq + h) * T + t : 0;
      cp_async4(smem_u32(lse_all + buf * BR + threadIdx.x), lse + src, t < T);
      cp_async4(smem_u32(d_all + buf * BR + threadIdx.x), D + src, t < T);
    }
  };
  if (iters > 0) prefetch(0);
  cp_async_commit();
  for (int it = 0; it < iters; ++it) {
    const int i0 = j0 + (it % nq) * BR, buf = it & 1;
    if (it + 1 < iters) prefetch(it + 1);
    cp_async_commit();
    cp_async_wait<1>();
    __syncthreads();
    const uint32_t sq = sqd + buf * 2 * TILE, sdo = sq + TILE;
    if (i0 + BR > kw0) {  // otherwise every query of the tile precedes every key of this warp
      if (i0 < kw0 + 15 || i0 + BR > T)
        dkv_tile<true>(kf, vf, sq, sdo, lse_all + buf * BR, d_all + buf * BR, i0, kw0, T, sl2, dka, dva);
      else
        dkv_tile<false>(kf, vf, sq, sdo, lse_all + buf * BR, d_all + buf * BR, i0, kw0, T, sl2, dka, dva);
    }
    __syncthreads();  // this buffer is refilled two iterations on
  }
  store_rows(dka, dk, b, kw0, g, T, Hkv, scale);
  store_rows(dva, dv, b, kw0, g, T, Hkv, 1.f);
}

// D[b, h, t] = <dout, out> of one [64] row, a warp per row (2 elements a lane).
__global__ void row_dot_kernel(const bf16* out, const bf16* dout, float* D, int64_t rows, int T, int Hq) {
  const int64_t r = blockIdx.x * 8ll + (threadIdx.x >> 5);  // r = (b * T + t) * Hq + h
  if (r >= rows) return;
  const int lane = threadIdx.x & 31;
  const float2 o = __bfloat1622float2(reinterpret_cast<const __nv_bfloat162*>(out + r * HD)[lane]);
  const float2 d = __bfloat1622float2(reinterpret_cast<const __nv_bfloat162*>(dout + r * HD)[lane]);
  float s = o.x * d.x + o.y * d.y;
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) s += __shfl_xor_sync(0xffffffffu, s, off);
  if (lane == 0) {
    const int64_t h = r % Hq, bt = r / Hq, t = bt % T, b = bt / T;
    D[(b * Hq + h) * T + t] = s;
  }
}

// Raises a kernel's dynamic shared-memory limit once per process (thread-safe static init).
template <class Kernel>
void allow_smem(Kernel kernel, int bytes) {
  MOELAB_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes));
}

template <class TG, int MG>
void launch_dq_v2(const bf16* q, const bf16* k, const bf16* v, const bf16* dout, const float* lse, const float* D,
                  TG* dq, int B, int T, int Hq, int Hkv, float scale, cudaStream_t stream) {
  constexpr int smem = (2 * MG + 4) * TILE;
  static const bool once = (allow_smem(dq_v2_kernel<TG, MG>, smem), true);
  (void)once;
  dim3 grid(unsigned(B * Hq), unsigned((T + 64 * MG - 1) / (64 * MG)));
  dq_v2_kernel<TG, MG><<<grid, THREADS, smem, stream>>>(q, k, v, dout, lse, D, dq, T, Hq, Hkv, scale);
}

template <class TG, int NW>
void launch_dkv_v2(const bf16* q, const bf16* k, const bf16* v, const bf16* dout, const float* lse, const float* D,
                   TG* dk, TG* dv, int B, int T, int Hq, int Hkv, float scale, cudaStream_t stream) {
  constexpr int smem = dkv_v2_smem<NW>();
  static const bool once = (allow_smem(dkv_v2_kernel<TG, NW>, smem), true);
  (void)once;
  dim3 grid(unsigned(B * Hkv), unsigned((T + 16 * NW - 1) / (16 * NW)));
  dkv_v2_kernel<TG, NW><<<grid, 32 * NW, smem, stream>>>(q, k, v, dout, lse, D, dk, dv, T, Hq, Hkv, scale);
}

template <class TG>
void launch_dkv_base(const bf16* q, const bf16* k, const bf16* v, const bf16* dout, const float* lse, const float* D,
                     TG* dk, TG* dv, int B, int T, int Hq, int Hkv, float scale, cudaStream_t stream) {
  static const bool once = (allow_smem(dkv_kernel<TG>, DKV_SMEM), true);
  (void)once;
  dim3 grid(unsigned((T + BR - 1) / BR), unsigned(B * Hkv));
  dkv_kernel<TG><<<grid, THREADS, DKV_SMEM, stream>>>(q, k, v, dout, lse, D, dk, dv, T, Hq, Hkv, scale);
}

template <class TG>
void dq_typed(DqKernel kernel, const bf16* q, const bf16* k, const bf16* v, const bf16* dout, const float* lse,
              const float* D, TG* dq, int B, int T, int Hq, int Hkv, float scale, cudaStream_t stream) {
  switch (kernel) {
    case DqKernel::base: {
      dim3 grid(unsigned((T + BR - 1) / BR), unsigned(B * Hq));
      dq_kernel<TG><<<grid, THREADS, 0, stream>>>(q, k, v, dout, lse, D, dq, T, Hq, Hkv, scale);
      break;
    }
    case DqKernel::lean64: launch_dq_v2<TG, 1>(q, k, v, dout, lse, D, dq, B, T, Hq, Hkv, scale, stream); break;
    case DqKernel::m128: launch_dq_v2<TG, 2>(q, k, v, dout, lse, D, dq, B, T, Hq, Hkv, scale, stream); break;
  }
}

template <class TG>
void dkv_typed(DkvKernel kernel, const bf16* q, const bf16* k, const bf16* v, const bf16* dout, const float* lse,
               const float* D, TG* dk, TG* dv, int B, int T, int Hq, int Hkv, float scale, cudaStream_t stream) {
  switch (kernel) {
    case DkvKernel::base: launch_dkv_base<TG>(q, k, v, dout, lse, D, dk, dv, B, T, Hq, Hkv, scale, stream); break;
    case DkvKernel::lean64:
      launch_dkv_v2<TG, 4>(q, k, v, dout, lse, D, dk, dv, B, T, Hq, Hkv, scale, stream);
      break;
    case DkvKernel::n128:
      launch_dkv_v2<TG, 8>(q, k, v, dout, lse, D, dk, dv, B, T, Hq, Hkv, scale, stream);
      break;
  }
}

}  // namespace

// The kernels forward() and backward() use, chosen by bench_attention_variants.cu on an H200 at
// the seed shape (B 16, T 1024, 12 heads): forward 176 -> 124 us, dq 228 -> 147 us, dk/dv
// 297 -> 239 us, against the base kernels.
const Kernels kProduction{FwdKernel::m128, DqKernel::m128, DkvKernel::lean64};

const char* name(FwdKernel k) {
  switch (k) {
    case FwdKernel::base: return "fwd base";
    case FwdKernel::lean64: return "fwd lean64";
    case FwdKernel::m128: return "fwd m128";
  }
  return "fwd ?";
}
const char* name(DqKernel k) {
  switch (k) {
    case DqKernel::base: return "dq base";
    case DqKernel::lean64: return "dq lean64";
    case DqKernel::m128: return "dq m128";
  }
  return "dq ?";
}
const char* name(DkvKernel k) {
  switch (k) {
    case DkvKernel::base: return "dkv base";
    case DkvKernel::lean64: return "dkv lean64";
    case DkvKernel::n128: return "dkv n128";
  }
  return "dkv ?";
}

void forward_with(FwdKernel kernel, const bf16* q, const bf16* k, const bf16* v, bf16* out, float* lse, int B, int T,
                  int Hq, int Hkv, float scale, cudaStream_t stream) {
  switch (kernel) {
    case FwdKernel::base: {
      dim3 grid(unsigned((T + BR - 1) / BR), unsigned(B * Hq));
      fwd_kernel<<<grid, THREADS, 0, stream>>>(q, k, v, out, lse, T, Hq, Hkv, scale);
      break;
    }
    case FwdKernel::lean64: {
      dim3 grid(unsigned(B * Hq), unsigned((T + 63) / 64));
      fwd_v2_kernel<1><<<grid, THREADS, 0, stream>>>(q, k, v, out, lse, T, Hq, Hkv, scale);
      break;
    }
    case FwdKernel::m128: {
      dim3 grid(unsigned(B * Hq), unsigned((T + 127) / 128));
      fwd_v2_kernel<2><<<grid, THREADS, 0, stream>>>(q, k, v, out, lse, T, Hq, Hkv, scale);
      break;
    }
  }
  MOELAB_CUDA_LAUNCH_CHECK("flash forward kernel");
}

void dq_with(DqKernel kernel, const bf16* q, const bf16* k, const bf16* v, const bf16* dout, const float* lse,
             const float* D, void* dq, DType grad_dtype, int B, int T, int Hq, int Hkv, float scale,
             cudaStream_t stream) {
  if (grad_dtype == DType::bf16)
    dq_typed(kernel, q, k, v, dout, lse, D, static_cast<bf16*>(dq), B, T, Hq, Hkv, scale, stream);
  else
    dq_typed(kernel, q, k, v, dout, lse, D, static_cast<float*>(dq), B, T, Hq, Hkv, scale, stream);
  MOELAB_CUDA_LAUNCH_CHECK("flash dq kernel");
}

void dkv_with(DkvKernel kernel, const bf16* q, const bf16* k, const bf16* v, const bf16* dout, const float* lse,
              const float* D, void* dk, void* dv, DType grad_dtype, int B, int T, int Hq, int Hkv, float scale,
              cudaStream_t stream) {
  if (grad_dtype == DType::bf16)
    dkv_typed(kernel, q, k, v, dout, lse, D, static_cast<bf16*>(dk), static_cast<bf16*>(dv), B, T, Hq, Hkv, scale,
              stream);
  else
    dkv_typed(kernel, q, k, v, dout, lse, D, static_cast<float*>(dk), static_cast<float*>(dv), B, T, Hq, Hkv, scale,
              stream);
  MOELAB_CUDA_LAUNCH_CHECK("flash dk/dv kernel");
}

void row_dot(const bf16* out, const bf16* dout, float* D, int B, int T, int Hq, cudaStream_t stream) {
  const int64_t rows = int64_t(B) * T * Hq;
  if (rows == 0) return;
  row_dot_kernel<<<unsigned((rows + 7) / 8), 256, 0, stream>>>(out, dout, D, rows, T, Hq);
  MOELAB_CUDA_LAUNCH_CHECK("flash row_dot_kernel");
}

void forward(const bf16* q, const bf16* k, const bf16* v, bf16* out, float* lse, int B, int T, int Hq, int Hkv,
             float scale, cudaStream_t stream) {
  forward_with(kProduction.fwd, q, k, v, out, lse, B, T, Hq, Hkv, scale, stream);
}

void backward(const bf16* q, const bf16* k, const bf16* v, const bf16* dout, const float* lse, const float* D,
              void* dq, void* dk, void* dv, DType grad_dtype, int B, int T, int Hq, int Hkv, float scale,
              cudaStream_t stream) {
  dq_with(kProduction.dq, q, k, v, dout, lse, D, dq, grad_dtype, B, T, Hq, Hkv, scale, stream);
  dkv_with(kProduction.dkv, q, k, v, dout, lse, D, dk, dv, grad_dtype, B, T, Hq, Hkv, scale, stream);
}

}  // namespace flash_lab
}  // namespace moelab
