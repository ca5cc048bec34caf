// Stores of wgmma accumulator rows to row-major bf16 memory in whole 32-byte sectors. In the
// m64nN f32 accumulator a quad of lanes shares a row, and lane t4 holds columns 8j + 2 t4 and
// 8j + 2 t4 + 1 of every 8-column step j, so storing those pairs directly writes 16 of each
// sector's 32 bytes per instruction (Nsight Compute on the grouped forward kernels: half of all
// store sectors excessive, L2 the busiest unit). Over four steps (32 columns) the quad trades
// its packed pairs so that each lane holds 8 consecutive columns, written with one 16-byte store.
#pragma once
#include <cuda_bf16.h>

#include <cstdint>

#include "backend/cuda/expert_amax.cuh"
#include "backend/cuda/mma_utils.cuh"

namespace moelab::cuda_detail {

// A 4x4 transpose of 32-bit words across the quad of `lane`: out[s] = in[t4] of quad lane s,
// where t4 is this lane's place in its quad. Only the quad's four lanes take part, so quads may
// skip it independently (rows past a tile's end).
__device__ __forceinline__ void quad_transpose(const uint32_t (&in)[4], uint32_t (&out)[4], int lane) {
  const int t4 = lane & 3, base = lane & ~3;
  const unsigned mask = 0xFu << base;
#pragma unroll
  for (int k = 0; k < 4; ++k) {
    const int give = (t4 + k) & 3;  // quad lane (t4 - k) wants this lane's word `give`...
    const uint32_t send = give == 0 ? in[0] : give == 1 ? in[1] : give == 2 ? in[2] : in[3];
    const int from = (t4 - k) & 3;  // ...and this lane takes quad lane (t4 - k)'s word t4
    const uint32_t got = __shfl_sync(mask, send, base + from);
    out[0] = from == 0 ? got : out[0];
    out[1] = from == 1 ? got : out[1];
    out[2] = from == 2 ? got : out[2];
    out[3] = from == 3 ? got : out[3];
  }
}

// One accumulator row of a tile starting at column n0 into `row` (the output row, N columns):
// v[j] holds this lane's two values of step j (columns n0 + 8j + 2 t4, +1). NJ is a multiple of
// 4; N a multiple of 8 (and row 16-byte aligned), so a lane's 8 columns are all in or all out.
// finish(g, n, words) may rewrite a lane's 8 packed values of columns n .. n + 7 (its part of
// 32-column group g) before the store: an epilogue that reads another tensor at the same place.
template <int NJ, class Finish>
__device__ __forceinline__ void store_row_bf16(__nv_bfloat16* row, int n0, int N, const float (&v)[NJ][2], int lane,
                                               Finish&& finish) {
  static_assert(NJ % 4 == 0, "store_row_bf16 trades four 8-column steps at a time");
  const int t4 = lane & 3;
#pragma unroll
  for (int g = 0; g < NJ / 4; ++g) {
    uint32_t words[4], mine[4];
#pragma unroll
    for (int jj = 0; jj < 4; ++jj) words[jj] = pack_bf16x2(v[4 * g + jj][0], v[4 * g + jj][1]);
    quad_transpose(words, mine, lane);
    const int n = n0 + 32 * g + 8 * t4;
    if (n < N) {
      finish(g, n, mine);
      *reinterpret_cast<uint4*>(row + n) = make_uint4(mine[0], mine[1], mine[2], mine[3]);
    }
  }
}

template <int NJ>
__device__ __forceinline__ void store_row_bf16(__nv_bfloat16* row, int n0, int N, const float (&v)[NJ][2], int lane) {
  store_row_bf16(row, n0, N, v, lane, [](int, int, uint32_t (&)[4]) {});
}

// The expert MLP's ReLU² in an epilogue (store_row_bf16's finish), on a lane's 8 packed bf16
// values, rounded exactly as relu2_fwd and relu2_bwd round them.
// a = relu²(h) of the stored h: max(h, 0)^2 in f32, stored as bf16.
__device__ __forceinline__ void relu2_fwd8(const uint32_t (&h)[4], uint32_t (&a)[4]) {
#pragma unroll
  for (int k = 0; k < 4; ++k) {
    const float2 x = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&h[k]));
    const float r0 = fmaxf(x.x, 0.f), r1 = fmaxf(x.y, 0.f);
    a[k] = pack_bf16x2(r0 * r0, r1 * r1);
  }
}
// dh = da * 2 relu(h) in f32 over the stored da, given the same columns' h, stored as bf16 in
// place of da; raises m to the largest |dh| as stored.
__device__ __forceinline__ void relu2_bwd8(uint32_t (&da)[4], uint4 hv, float& m) {
  const uint32_t hw[4] = {hv.x, hv.y, hv.z, hv.w};
#pragma unroll
  for (int k = 0; k < 4; ++k) {
    const float2 d = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&da[k]));
    const float2 x = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&hw[k]));
    const float g0 = d.x * (2.f * fmaxf(x.x, 0.f)), g1 = d.y * (2.f * fmaxf(x.y, 0.f));
    da[k] = pack_bf16x2(g0, g1);
    m = fmaxf(m, fmaxf(fabsf(stored<__nv_bfloat16>(g0)), fabsf(stored<__nv_bfloat16>(g1))));
  }
}

}  // namespace moelab::cuda_detail
