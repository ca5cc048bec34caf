// Tensor-core flash attention for bf16 q/k/v with head_dim 64 or 128: causal, grouped-query, with
// an optional sliding window. The FlashAttention-2 arrangement on mma.sync: a block of 4 warps
// owns 16 * MG query rows per warp, scores live only in mma accumulators, and the accumulator
// layout of S is re-packed in registers as the A operand of the next product (P V, dS K, ...), so
// only 64-row bf16 tiles of q/k/v/dO pass through shared memory (XOR-swizzled for ldmatrix).
//   forward: per query block, loop over the key tiles of its span with an online softmax.
//   dq:      per query block, loop over key tiles: dS = P (dO V^T - D), dQ += dS K.
//   dk, dv:  per key block, loop over the group's query heads and the query tiles that see it,
//            computing the transposed scores K Q^T directly: dV += P^T dO, dK += dS^T Q.
// Only tiles inside a block's span are visited (a window layer costs about window / T of a full
// one), only tiles that cross the diagonal or the window's edge pay for the mask, and a warp
// skips tiles that lie wholly outside its rows' spans. The variants these were chosen from, and
// their benchmark, are in dev/cuda/.
#include "backend/cuda/cuda_common.cuh"
#include "backend/cuda/flash_attention.cuh"
#include "backend/cuda/mma_utils.cuh"

namespace moelab {
using namespace cuda_detail;

namespace flash {

namespace {

constexpr int BR = 64, THREADS = 128;
constexpr float kLog2e = 1.4426950408889634f;
template <int HD> constexpr int kChunks = HD / 8;          // 16-byte chunks per row
template <int HD> constexpr int kTile = BR * HD * 2;       // bytes of a 64-row bf16 tile
template <int HD> constexpr int kSteps = HD / 16;          // mma k-steps over the head dim

// Key range of query t is [t - W, t]; W >= T stands for full causal attention.
__host__ __device__ inline int span_of(int window, int T) { return window > 0 && window < T ? window : T; }

__device__ __forceinline__ float ex2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}

// 4-byte async copy (zero when !valid): per-row lse and D arrive with the tile they belong to.
__device__ __forceinline__ void cp_async4(uint32_t dst, const void* src, bool valid) {
  int n = valid ? 4 : 0;
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(dst), "l"(src), "r"(n));
}

// Rows [t0, t0 + ROWS) of head h of a [B, T, H, HD] tensor into a swizzled tile (zeros past T).
template <int HD, int ROWS, int NTH>
__device__ __forceinline__ void load_rows(uint32_t s, const bf16* base, int b, int t0, int h, int T, int H) {
  constexpr int CH = kChunks<HD>;
  static_assert(ROWS * CH % NTH == 0);
#pragma unroll
  for (int it = 0; it < ROWS * CH / NTH; ++it) {
    const int q = threadIdx.x + it * NTH, r = q / CH, c = q % CH, t = t0 + r;
    const bool ok = t < T;
    const bf16* src = ok ? base + ((int64_t(b) * T + t) * H + h) * HD + c * 8 : base;
    cp_async16(s + swz(r, c, CH), src, ok);
  }
}

// A fragments (16 rows from row0 x HD) of a row-major tile, one per k-step.
template <int HD>
__device__ __forceinline__ void load_a_frags(uint32_t s, int row0, uint32_t (&f)[kSteps<HD>][4]) {
  const int lane = threadIdx.x & 31, li = lane >> 3, lr = lane & 7;
#pragma unroll
  for (int kk = 0; kk < kSteps<HD>; ++kk)
    ldmatrix_x4<false>(s + swz(row0 + lr + (li & 1) * 8, kk * 2 + (li >> 1), kChunks<HD>), f[kk]);
}

// acc[mg] (16 x 16*NP) += A[mg] (16 x HD) @ (tile rows [r0, r0 + 16*NP))^T; each B fragment
// loaded once feeds all MG row groups.
template <int HD, int MG, int NP>
__device__ __forceinline__ void mma_a_bt(const uint32_t (&a)[MG][kSteps<HD>][4], uint32_t s, int r0,
                                         float (&acc)[MG][2 * NP][4]) {
  const int lane = threadIdx.x & 31, li = lane >> 3, lr = lane & 7;
#pragma unroll
  for (int kk = 0; kk < kSteps<HD>; ++kk)
#pragma unroll
    for (int np = 0; np < NP; ++np) {
      uint32_t bf[4];
      ldmatrix_x4<false>(s + swz(r0 + np * 16 + lr + (li >> 1) * 8, kk * 2 + (li & 1), kChunks<HD>), bf);
#pragma unroll
      for (int mg = 0; mg < MG; ++mg) {
        mma_bf16(acc[mg][2 * np], a[mg][kk], bf[0], bf[1]);
        mma_bf16(acc[mg][2 * np + 1], a[mg][kk], bf[2], bf[3]);
      }
    }
}

// acc[mg] (16 x HD) += P[mg] (16 x 16*KK, accumulator registers) @ tile rows [r0, r0 + 16*KK).
template <int HD, int MG, int KK>
__device__ __forceinline__ void mma_p_v(const float (&p)[MG][2 * KK][4], uint32_t s, int r0,
                                        float (&acc)[MG][HD / 8][4]) {
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
    for (int np = 0; np < HD / 16; ++np) {
      uint32_t bf[4];
      ldmatrix_x4<true>(s + swz(r0 + kk * 16 + lr + (li & 1) * 8, np * 2 + (li >> 1), kChunks<HD>), bf);
#pragma unroll
      for (int mg = 0; mg < MG; ++mg) {
        mma_bf16(acc[mg][2 * np], a[mg], bf[0], bf[1]);
        mma_bf16(acc[mg][2 * np + 1], a[mg], bf[2], bf[3]);
      }
    }
  }
}

// 16 rows (row0 + [0, 16)) of accumulators, times scale, into head h of a [B, T, H, HD] tensor.
template <int HD, class TO>
__device__ __forceinline__ void store_rows(const float (&acc)[HD / 8][4], TO* base, int b, int row0, int h, int T,
                                           int H, float scale) {
  const int lane = threadIdx.x & 31, g = lane >> 2, t4 = lane & 3;
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const int t = row0 + g + half * 8;
    if (t >= T) continue;
    TO* dst = base + ((int64_t(b) * T + t) * H + h) * HD;
#pragma unroll
    for (int ni = 0; ni < HD / 8; ++ni) {
      const float x = acc[ni][2 * half] * scale, y = acc[ni][2 * half + 1] * scale;
      if constexpr (std::is_same_v<TO, float>)
        *reinterpret_cast<float2*>(dst + ni * 8 + 2 * t4) = make_float2(x, y);
      else
        *reinterpret_cast<__nv_bfloat162*>(dst + ni * 8 + 2 * t4) = __floats2bfloat162_rn(x, y);
    }
  }
}

// --- forward ----------------------------------------------------------------------------------

// One 64-key tile for a warp's MG row groups (rows w0 + mg*16 + [0, 16)). A row may see none of
// the tile's keys (window edge), so a still-empty row (m = -inf) keeps its state untouched.
template <int HD, int MG, bool MASK>
__device__ __forceinline__ void fwd_tile(const uint32_t (&qf)[MG][kSteps<HD>][4], uint32_t sk, uint32_t sv, int j0,
                                         int w0, int W, float sl2, float (&o)[MG][HD / 8][4], float (&m)[MG][2],
                                         float (&l)[MG][2]) {
  const int lane = threadIdx.x & 31, gq = lane >> 2, t4 = lane & 3;
  float s[MG][8][4] = {};
  mma_a_bt<HD, MG, 4>(qf, sk, 0, s);
#pragma unroll
  for (int mg = 0; mg < MG; ++mg) {
    float mx[2] = {-INFINITY, -INFINITY};
#pragma unroll
    for (int ni = 0; ni < 8; ++ni)
#pragma unroll
      for (int r = 0; r < 4; ++r) {
        if constexpr (MASK) {
          const int col = j0 + ni * 8 + 2 * t4 + (r & 1), row = w0 + mg * 16 + gq + (r >> 1) * 8;
          if (col > row || col < row - W) s[mg][ni][r] = -INFINITY;
        }
        mx[r >> 1] = fmaxf(mx[r >> 1], s[mg][ni][r]);
      }
    float nm[2];
#pragma unroll
    for (int hf = 0; hf < 2; ++hf) {
      mx[hf] = fmaxf(mx[hf], __shfl_xor_sync(0xffffffffu, mx[hf], 1));
      mx[hf] = fmaxf(mx[hf], __shfl_xor_sync(0xffffffffu, mx[hf], 2));
      const float mn = fmaxf(m[mg][hf], mx[hf]);
      const bool empty = mn == -INFINITY;  // nothing visible yet: p = 0 below, state unchanged
      const float corr = empty ? 1.f : ex2((m[mg][hf] - mn) * sl2);
      m[mg][hf] = mn;
      nm[hf] = empty ? 0.f : -mn * sl2;
      l[mg][hf] *= corr;
#pragma unroll
      for (int ni = 0; ni < HD / 8; ++ni) {
        o[mg][ni][2 * hf] *= corr;
        o[mg][ni][2 * hf + 1] *= corr;
      }
    }
#pragma unroll
    for (int ni = 0; ni < 8; ++ni)
#pragma unroll
      for (int r = 0; r < 4; ++r) {
        const float p = ex2(fmaf(s[mg][ni][r], sl2, nm[r >> 1]));
        s[mg][ni][r] = p;
        l[mg][r >> 1] += p;
      }
  }
  mma_p_v<HD, MG, 4>(s, sv, 0, o);
}

template <int HD, int MG>
constexpr int fwd_smem() {
  return (MG + 4) * kTile<HD>;  // Q (64*MG rows), then (K, V) twice
}

// Grid (B*Hq, query blocks), the last (heaviest under full causal) query block first.
template <int HD, int MG>
__global__ void __launch_bounds__(THREADS, MG == 1 ? 2 : 1)
    fwd_kernel(const bf16* q, const bf16* k, const bf16* v, bf16* out, float* lse, int T, int Hq, int Hkv, int W,
               float scale) {
  constexpr int BM = 64 * MG, WR = 16 * MG, TILE = kTile<HD>;
  extern __shared__ __align__(128) char smem[];
  const int bh = blockIdx.x, b = bh / Hq, h = bh % Hq, g = h / (Hq / Hkv);
  const int i0 = (gridDim.y - 1 - blockIdx.y) * BM;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, gq = lane >> 2, t4 = lane & 3;
  const uint32_t sq = smem_u32(smem), skv = sq + MG * TILE;
  const float sl2 = scale * kLog2e;
  const int w0 = i0 + warp * WR;
  const int jt0 = max(0, i0 - W) / BR, jt1 = (min(T, i0 + BM) + BR - 1) / BR;
  load_rows<HD, BM, THREADS>(sq, q, b, i0, h, T, Hq);
  load_rows<HD, BR, THREADS>(skv, k, b, jt0 * BR, g, T, Hkv);
  load_rows<HD, BR, THREADS>(skv + TILE, v, b, jt0 * BR, g, T, Hkv);
  cp_async_commit();
  uint32_t qf[MG][kSteps<HD>][4];
  float o[MG][HD / 8][4] = {}, m[MG][2], l[MG][2];
#pragma unroll
  for (int mg = 0; mg < MG; ++mg) m[mg][0] = m[mg][1] = -INFINITY, l[mg][0] = l[mg][1] = 0.f;
  for (int jt = jt0; jt < jt1; ++jt) {
    const int j0 = jt * BR, buf = (jt - jt0) & 1;
    if (jt + 1 < jt1) {
      const uint32_t nk = skv + (buf ^ 1) * 2 * TILE;
      load_rows<HD, BR, THREADS>(nk, k, b, j0 + BR, g, T, Hkv);
      load_rows<HD, BR, THREADS>(nk + TILE, v, b, j0 + BR, g, T, Hkv);
    }
    cp_async_commit();
    cp_async_wait<1>();
    __syncthreads();
    if (jt == jt0) {
#pragma unroll
      for (int mg = 0; mg < MG; ++mg) load_a_frags<HD>(sq, warp * WR + mg * 16, qf[mg]);
    }
    const uint32_t sk = skv + buf * 2 * TILE, sv = sk + TILE;
    // Skip a tile after every row of this warp or before every row's window.
    if (j0 <= w0 + WR - 1 && j0 + BR - 1 >= w0 - W) {
      if (j0 + BR - 1 > w0 || j0 < w0 + WR - 1 - W)
        fwd_tile<HD, MG, true>(qf, sk, sv, j0, w0, W, sl2, o, m, l);
      else
        fwd_tile<HD, MG, false>(qf, sk, sv, j0, w0, W, sl2, o, m, l);
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
      const float inv = 1.f / lt;  // key t itself is always visible, so lt >= 1 after the shift
      bf16* dst = out + ((int64_t(b) * T + t) * Hq + h) * HD;
#pragma unroll
      for (int ni = 0; ni < HD / 8; ++ni)
        *reinterpret_cast<__nv_bfloat162*>(dst + ni * 8 + 2 * t4) =
            __floats2bfloat162_rn(o[mg][ni][2 * hf] * inv, o[mg][ni][2 * hf + 1] * inv);
      if (t4 == 0) lse[(int64_t(b) * Hq + h) * T + t] = (m[mg][hf] * sl2 + log2f(lt)) / kLog2e;
    }
}

// --- dq -----------------------------------------------------------------------------------------

// One 32-key half (keys c0 + [0, 32), tile rows r0 + [0, 32)) of the dq pass for a warp's rows.
template <int HD, int MG, bool MASK>
__device__ __forceinline__ void dq_half(const uint32_t (&qf)[MG][kSteps<HD>][4],
                                        const uint32_t (&df)[MG][kSteps<HD>][4], uint32_t sk, uint32_t sv, int r0,
                                        int c0, int w0, int W, float sl2, const float (&nl2)[MG][2],
                                        const float (&Dr)[MG][2], float (&acc)[MG][HD / 8][4]) {
  const int lane = threadIdx.x & 31, gq = lane >> 2, t4 = lane & 3;
  float s[MG][4][4] = {}, dp[MG][4][4] = {};
  mma_a_bt<HD, MG, 2>(qf, sk, r0, s);
  mma_a_bt<HD, MG, 2>(df, sv, r0, dp);
#pragma unroll
  for (int mg = 0; mg < MG; ++mg)
#pragma unroll
    for (int ni = 0; ni < 4; ++ni)
#pragma unroll
      for (int r = 0; r < 4; ++r) {
        float p = ex2(fmaf(s[mg][ni][r], sl2, nl2[mg][r >> 1]));
        if constexpr (MASK) {
          const int col = c0 + ni * 8 + 2 * t4 + (r & 1), row = w0 + mg * 16 + gq + (r >> 1) * 8;
          if (col > row || col < row - W) p = 0.f;
        }
        s[mg][ni][r] = p * (dp[mg][ni][r] - Dr[mg][r >> 1]);
      }
  mma_p_v<HD, MG, 2>(s, sk, r0, acc);
}

template <int HD, int MG>
constexpr int dq_smem() {
  return (2 * MG + 4) * kTile<HD>;  // Q, dO (64*MG rows each), then (K, V) twice
}

template <int HD, int MG, class TG>
__global__ void __launch_bounds__(THREADS, MG == 1 ? 2 : 1)
    dq_kernel(const bf16* q, const bf16* k, const bf16* v, const bf16* dout, const float* lse, const float* D, TG* dq,
              int T, int Hq, int Hkv, int W, float scale) {
  constexpr int BM = 64 * MG, WR = 16 * MG, TILE = kTile<HD>;
  extern __shared__ __align__(128) char smem[];
  const int bh = blockIdx.x, b = bh / Hq, h = bh % Hq, g = h / (Hq / Hkv);
  const int i0 = (gridDim.y - 1 - blockIdx.y) * BM;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, gq = lane >> 2;
  const uint32_t sq = smem_u32(smem), sdo = sq + MG * TILE, skv = sq + 2 * MG * TILE;
  const float sl2 = scale * kLog2e;
  const int w0 = i0 + warp * WR;
  const int jt0 = max(0, i0 - W) / BR, jt1 = (min(T, i0 + BM) + BR - 1) / BR;
  float nl2[MG][2], Dr[MG][2];
#pragma unroll
  for (int mg = 0; mg < MG; ++mg)
#pragma unroll
    for (int hf = 0; hf < 2; ++hf) {
      const int t = w0 + mg * 16 + gq + hf * 8;
      nl2[mg][hf] = t < T ? -lse[(int64_t(b) * Hq + h) * T + t] * kLog2e : 0.f;
      Dr[mg][hf] = t < T ? D[(int64_t(b) * Hq + h) * T + t] : 0.f;
    }
  load_rows<HD, BM, THREADS>(sq, q, b, i0, h, T, Hq);
  load_rows<HD, BM, THREADS>(sdo, dout, b, i0, h, T, Hq);
  load_rows<HD, BR, THREADS>(skv, k, b, jt0 * BR, g, T, Hkv);
  load_rows<HD, BR, THREADS>(skv + TILE, v, b, jt0 * BR, g, T, Hkv);
  cp_async_commit();
  uint32_t qf[MG][kSteps<HD>][4], df[MG][kSteps<HD>][4];
  float acc[MG][HD / 8][4] = {};
  for (int jt = jt0; jt < jt1; ++jt) {
    const int j0 = jt * BR, buf = (jt - jt0) & 1;
    if (jt + 1 < jt1) {
      const uint32_t nk = skv + (buf ^ 1) * 2 * TILE;
      load_rows<HD, BR, THREADS>(nk, k, b, j0 + BR, g, T, Hkv);
      load_rows<HD, BR, THREADS>(nk + TILE, v, b, j0 + BR, g, T, Hkv);
    }
    cp_async_commit();
    cp_async_wait<1>();
    __syncthreads();
    if (jt == jt0) {
#pragma unroll
      for (int mg = 0; mg < MG; ++mg) {
        load_a_frags<HD>(sq, warp * WR + mg * 16, qf[mg]);
        load_a_frags<HD>(sdo, warp * WR + mg * 16, df[mg]);
      }
    }
    const uint32_t sk = skv + buf * 2 * TILE, sv = sk + TILE;
#pragma unroll
    for (int kh = 0; kh < 2; ++kh) {
      const int c0 = j0 + kh * 32;
      if (c0 <= w0 + WR - 1 && c0 + 31 >= w0 - W) {
        if (c0 + 31 > w0 || c0 < w0 + WR - 1 - W)
          dq_half<HD, MG, true>(qf, df, sk, sv, kh * 32, c0, w0, W, sl2, nl2, Dr, acc);
        else
          dq_half<HD, MG, false>(qf, df, sk, sv, kh * 32, c0, w0, W, sl2, nl2, Dr, acc);
      }
    }
    __syncthreads();
  }
#pragma unroll
  for (int mg = 0; mg < MG; ++mg) store_rows<HD>(acc[mg], dq, b, w0 + mg * 16, h, T, Hq, scale);
}

// --- dk, dv -------------------------------------------------------------------------------------

// QH queries (tile rows r0 + [0, QH), positions qa + [0, QH)) of the dk/dv pass for a warp's 16
// keys (kw0 + [0, 16)). At head dim 64 the warp's K and V fragments stay in registers; at 128
// they would not fit beside the dK, dV accumulators, so they are re-read from shared memory.
template <int HD, int QH, bool MASK>
__device__ __forceinline__ void dkv_part(const uint32_t (&kf)[1][kSteps<HD>][4], const uint32_t (&vf)[1][kSteps<HD>][4],
                                         uint32_t sq, uint32_t sdo, int r0, const float* lse_s, const float* d_s,
                                         int qa, int kw0, int T, int W, float sl2, float (&dka)[1][HD / 8][4],
                                         float (&dva)[1][HD / 8][4]) {
  const int lane = threadIdx.x & 31, gq = lane >> 2, t4 = lane & 3;
  constexpr int NI = QH / 8;
  float s[1][NI][4] = {}, dp[1][NI][4] = {};
  mma_a_bt<HD, 1, QH / 16>(kf, sq, r0, s);   // S^T: keys x queries
  mma_a_bt<HD, 1, QH / 16>(vf, sdo, r0, dp);  // dP^T = V dO^T
#pragma unroll
  for (int ni = 0; ni < NI; ++ni) {
    const int qc = r0 + ni * 8 + 2 * t4;
    const float2 ls = *reinterpret_cast<const float2*>(lse_s + qc);
    const float2 dd = *reinterpret_cast<const float2*>(d_s + qc);
    const float nl[2] = {-ls.x * kLog2e, -ls.y * kLog2e};
#pragma unroll
    for (int r = 0; r < 4; ++r) {
      float p = ex2(fmaf(s[0][ni][r], sl2, nl[r & 1]));
      if constexpr (MASK) {
        const int qt = qa + ni * 8 + 2 * t4 + (r & 1), key = kw0 + gq + (r >> 1) * 8;
        if (qt < key || qt > key + W || qt >= T) p = 0.f;
      }
      s[0][ni][r] = p;
      dp[0][ni][r] = p * (dp[0][ni][r] - ((r & 1) ? dd.y : dd.x));
    }
  }
  mma_p_v<HD, 1, QH / 16>(s, sdo, r0, dva);  // dV += P^T dO
  mma_p_v<HD, 1, QH / 16>(dp, sq, r0, dka);  // dK += dS^T Q
}

template <int HD, int NW>
constexpr int dkv_smem() {
  return 2 * (16 * NW) * HD * 2 + 4 * kTile<HD> + 4 * BR * int(sizeof(float));
}

// dk, dv; NW warps x 16 keys a block; grid (B*Hkv, key blocks), key block 0 first.
template <int HD, int NW, class TG>
__global__ void __launch_bounds__(32 * NW) dkv_kernel(const bf16* q, const bf16* k, const bf16* v, const bf16* dout,
                                                      const float* lse, const float* D, TG* dk, TG* dv, int T,
                                                      int Hq, int Hkv, int W, float scale) {
  constexpr int BN = 16 * NW, NTH = 32 * NW, KV_BYTES = BN * HD * 2, TILE = kTile<HD>;
  constexpr bool kKvInRegs = HD <= 64;
  constexpr int QH = HD <= 64 ? 64 : 32;  // queries per part: keeps S and dP small at HD 128
  // K, V (BN rows each), then (Q, dO) twice, then lse and D of those queries, twice.
  extern __shared__ __align__(128) char smem[];
  float* lse_all = reinterpret_cast<float*>(smem + 2 * KV_BYTES + 4 * TILE);  // [2][BR]
  float* d_all = lse_all + 2 * BR;                                             // [2][BR]
  const int bg = blockIdx.x, b = bg / Hkv, g = bg % Hkv, group = Hq / Hkv;
  const int j0 = blockIdx.y * BN;
  const int warp = threadIdx.x >> 5;
  const uint32_t sk = smem_u32(smem), sv = sk + KV_BYTES, sqd = sk + 2 * KV_BYTES;
  const float sl2 = scale * kLog2e;
  const int kw0 = j0 + warp * 16;
  load_rows<HD, BN, NTH>(sk, k, b, j0, g, T, Hkv);
  load_rows<HD, BN, NTH>(sv, v, b, j0, g, T, Hkv);
  cp_async_commit();
  cp_async_wait<0>();
  __syncthreads();
  uint32_t kf[1][kSteps<HD>][4], vf[1][kSteps<HD>][4];
  if constexpr (kKvInRegs) {
    load_a_frags<HD>(sk, warp * 16, kf[0]);
    load_a_frags<HD>(sv, warp * 16, vf[0]);
  }
  float dka[1][HD / 8][4] = {}, dva[1][HD / 8][4] = {};
  // Iterations run over (query head of the group, query tile that sees a key of the block),
  // flattened so that the next Q/dO pair (and its lse, D) loads while the current one is used.
  const int nq = (min(T, j0 + BN + W) - j0 + BR - 1) / BR, iters = group * nq;
  auto prefetch = [&](int it) {
    const int h = g * group + it / nq, i0 = j0 + (it % nq) * BR, buf = it & 1;
    const uint32_t dst = sqd + buf * 2 * TILE;
    load_rows<HD, BR, NTH>(dst, q, b, i0, h, T, Hq);
    load_rows<HD, BR, NTH>(dst + TILE, dout, b, i0, h, T, Hq);
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
#pragma unroll
    for (int part = 0; part < BR / QH; ++part) {
      const int qa = i0 + part * QH;
      // Skip queries that all precede this warp's keys or all lie past every key's window.
      if (qa + QH - 1 >= kw0 && qa <= kw0 + 15 + W) {
        if constexpr (!kKvInRegs) {
          load_a_frags<HD>(sk, warp * 16, kf[0]);
          load_a_frags<HD>(sv, warp * 16, vf[0]);
        }
        const bool mask = qa < kw0 + 15 || qa + QH - 1 > kw0 + W || qa + QH > T;
        if (mask)
          dkv_part<HD, QH, true>(kf, vf, sq, sdo, part * QH, lse_all + buf * BR, d_all + buf * BR, qa, kw0, T, W,
                                 sl2, dka, dva);
        else
          dkv_part<HD, QH, false>(kf, vf, sq, sdo, part * QH, lse_all + buf * BR, d_all + buf * BR, qa, kw0, T, W,
                                  sl2, dka, dva);
      }
    }
    __syncthreads();  // this buffer is refilled two iterations on
  }
  store_rows<HD>(dka[0], dk, b, kw0, g, T, Hkv, scale);
  store_rows<HD>(dva[0], dv, b, kw0, g, T, Hkv, 1.f);
}

// D[b, h, t] = <dout, out> of one row, a warp per row (2 elements a lane per 64 columns).
template <int HD>
__global__ void row_dot_kernel(const bf16* out, const bf16* dout, float* D, int64_t rows, int T, int Hq) {
  const int64_t r = blockIdx.x * 8ll + (threadIdx.x >> 5);  // r = (b * T + t) * Hq + h
  if (r >= rows) return;
  const int lane = threadIdx.x & 31;
  float s = 0.f;
#pragma unroll
  for (int c = 0; c < HD / 64; ++c) {
    const float2 o = __bfloat1622float2(reinterpret_cast<const __nv_bfloat162*>(out + r * HD)[c * 32 + lane]);
    const float2 d = __bfloat1622float2(reinterpret_cast<const __nv_bfloat162*>(dout + r * HD)[c * 32 + lane]);
    s += o.x * d.x + o.y * d.y;
  }
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

// Per head dim, the tiling the engine runs (chosen by timing the variants in dev/cuda):
// head dim 64 gives each forward/dq warp 32 query rows (MG = 2); at 128 the accumulators double,
// so 16 rows a warp (MG = 1).
template <int HD> struct Tiling;
template <> struct Tiling<64> { static constexpr int fwd_mg = 2, dq_mg = 2, dkv_nw = 4; };
template <> struct Tiling<128> { static constexpr int fwd_mg = 1, dq_mg = 1, dkv_nw = 4; };

template <int HD>
void forward_hd(const bf16* q, const bf16* k, const bf16* v, bf16* out, float* lse, int B, int T, int Hq, int Hkv,
                int W, float scale, cudaStream_t stream) {
  constexpr int MG = Tiling<HD>::fwd_mg, smem = fwd_smem<HD, MG>();
  static const bool once = (allow_smem(fwd_kernel<HD, MG>, smem), true);
  (void)once;
  dim3 grid(unsigned(B * Hq), unsigned((T + 64 * MG - 1) / (64 * MG)));
  fwd_kernel<HD, MG><<<grid, THREADS, smem, stream>>>(q, k, v, out, lse, T, Hq, Hkv, W, scale);
}

template <int HD, class TG>
void backward_hd(const bf16* q, const bf16* k, const bf16* v, const bf16* dout, const float* lse, const float* D,
                 TG* dq, TG* dk, TG* dv, int B, int T, int Hq, int Hkv, int W, float scale, cudaStream_t stream) {
  constexpr int MG = Tiling<HD>::dq_mg, NW = Tiling<HD>::dkv_nw;
  constexpr int qsmem = dq_smem<HD, MG>(), kvsmem = dkv_smem<HD, NW>();
  static const bool once =
      (allow_smem(dq_kernel<HD, MG, TG>, qsmem), allow_smem(dkv_kernel<HD, NW, TG>, kvsmem), true);
  (void)once;
  dim3 gq(unsigned(B * Hq), unsigned((T + 64 * MG - 1) / (64 * MG)));
  dq_kernel<HD, MG, TG><<<gq, THREADS, qsmem, stream>>>(q, k, v, dout, lse, D, dq, T, Hq, Hkv, W, scale);
  dim3 gk(unsigned(B * Hkv), unsigned((T + 16 * NW - 1) / (16 * NW)));
  dkv_kernel<HD, NW, TG><<<gk, 32 * NW, kvsmem, stream>>>(q, k, v, dout, lse, D, dk, dv, T, Hq, Hkv, W, scale);
}

}  // namespace

bool supports_head_dim(int head_dim) { return head_dim == 64 || head_dim == 128; }

void forward(const bf16* q, const bf16* k, const bf16* v, bf16* out, float* lse, int B, int T, int Hq, int Hkv,
             int head_dim, int window, float scale, cudaStream_t stream) {
  const int W = span_of(window, T);
  if (head_dim == 64)
    forward_hd<64>(q, k, v, out, lse, B, T, Hq, Hkv, W, scale, stream);
  else
    forward_hd<128>(q, k, v, out, lse, B, T, Hq, Hkv, W, scale, stream);
  MOELAB_CUDA_LAUNCH_CHECK("flash forward");
}

void row_dot(const bf16* out, const bf16* dout, float* D, int B, int T, int Hq, int head_dim, cudaStream_t stream) {
  const int64_t rows = int64_t(B) * T * Hq;
  const unsigned blocks = unsigned((rows + 7) / 8);
  if (head_dim == 64)
    row_dot_kernel<64><<<blocks, 256, 0, stream>>>(out, dout, D, rows, T, Hq);
  else
    row_dot_kernel<128><<<blocks, 256, 0, stream>>>(out, dout, D, rows, T, Hq);
  MOELAB_CUDA_LAUNCH_CHECK("flash row_dot");
}

void backward(const bf16* q, const bf16* k, const bf16* v, const bf16* dout, const float* lse, const float* D,
              void* dq, void* dk, void* dv, DType grad_dtype, int B, int T, int Hq, int Hkv, int head_dim, int window,
              float scale, cudaStream_t stream) {
  const int W = span_of(window, T);
  auto run = [&](auto hd_tag, auto grad_tag) {
    constexpr int HD = decltype(hd_tag)::value;
    using TG = decltype(grad_tag);
    backward_hd<HD, TG>(q, k, v, dout, lse, D, static_cast<TG*>(dq), static_cast<TG*>(dk), static_cast<TG*>(dv),
                        B, T, Hq, Hkv, W, scale, stream);
  };
  const bool f32 = grad_dtype == DType::f32;
  if (head_dim == 64)
    f32 ? run(std::integral_constant<int, 64>{}, float{}) : run(std::integral_constant<int, 64>{}, bf16{});
  else
    f32 ? run(std::integral_constant<int, 128>{}, float{}) : run(std::integral_constant<int, 128>{}, bf16{});
  MOELAB_CUDA_LAUNCH_CHECK("flash backward");
}

}  // namespace flash
}  // namespace moelab
