// Hopper building blocks of the grouped GEMM's TMA kernels (grouped_gemm_sm90.cu), shared with
// the kernel lab's variants (dev/cuda/grouped_gemm_variants.cu): the tile constants, mbarrier
// waits, the 2D bulk tensor copy and the tensor map of a K-major bf16 matrix.
#pragma once
#include <cuda.h>
#include <cuda_bf16.h>

#include <cstdint>

namespace moelab::grouped_gemm::sm90 {

constexpr int BM = 128, BK = 64, THREADS = 256;  // rows of a tile, k-step, two warpgroups
constexpr int A_BYTES = BM * BK * 2;

// --- TMA variant: the copy engine brings each stage's tiles (one thread issues them), completion
// is tracked by one mbarrier per stage, and one wgmma group stays in flight while the next is
// issued. 4 stages of 48 KiB. Rows past an expert's end are loaded (from the next expert or as
// zeros past the tensor) but never stored.
// Tile widths (TBN) 256 (one block per SM, 4 stages) or 128 (two blocks per SM, 3 stages, so one
// block's epilogue overlaps the other's main loop).
template <int TBN, int TST>
constexpr int tma_smem_bytes() { return TST * (A_BYTES + TBN * BK * 2) + 1024 + 64; }

__device__ __forceinline__ void mbar_init(uint32_t bar, int count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(count));
}
// One mbarrier per pipeline stage (8 bytes apart from `bars`), initialised by the leader thread and
// made visible to the copy engine before any thread of the block waits on them.
__device__ __forceinline__ void init_stage_barriers(uint32_t bars, int stages, bool leader) {
  if (leader) {
    for (int st = 0; st < stages; ++st) mbar_init(bars + st * 8, 1);
    asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
  }
  __syncthreads();
}
__device__ __forceinline__ void mbar_expect_tx(uint32_t bar, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(bar), "r"(bytes) : "memory");
}
__device__ __forceinline__ void mbar_wait(uint32_t bar, uint32_t parity) {
  uint32_t done = 0;
  while (!done) {
    asm volatile(
        "{\n.reg .pred P;\nmbarrier.try_wait.parity.shared::cta.b64 P, [%1], %2;\nselp.u32 %0, 1, 0, P;\n}\n"
        : "=r"(done)
        : "r"(bar), "r"(parity)
        : "memory");
  }
}
__device__ __forceinline__ void tma_load_2d(uint32_t dst, const CUtensorMap* map, int c0, int c1, uint32_t bar) {
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3}], [%4];\n" ::"r"(dst),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(c0), "r"(c1), "r"(bar)
      : "memory");
}

// 2D map of a row-major [rows, cols] bf16 matrix, boxes of box_rows x 64 columns, 128B swizzle.
CUtensorMap make_map(const __nv_bfloat16* base, int64_t rows, int64_t cols, int box_rows);
// The same for a [rows, cols] matrix of FP8 codes (one byte each): boxes of box_rows x 128.
CUtensorMap make_map_fp8(const uint8_t* base, int64_t rows, int64_t cols, int box_rows);

// The persistent forward kernels' tile order: output tile t of a grouped product walks the
// experts' row tiles (BM rows, the last of each expert partial) in order, n_tiles_n column tiles
// of width TBN each, row tile major (neighbouring blocks share an A tile through L2).
struct FwdTile {
  int e = 0, row0 = 0, rows = 0, n0 = 0;
  bool valid = false;
};

template <int TBN>
__device__ __forceinline__ FwdTile fwd_tile(int t, const int32_t* offsets, int E, int n_tiles_n) {
  FwdTile f;
  const int rt = t / n_tiles_n;
  int seen = 0;
  for (int e = 0; e < E; ++e) {
    const int lo = offsets[e], hi = offsets[e + 1];
    const int n = (hi - lo + BM - 1) / BM;
    if (rt < seen + n) {
      f.e = e;
      f.row0 = lo + (rt - seen) * BM;
      f.rows = min(BM, hi - f.row0);
      f.n0 = (t % n_tiles_n) * TBN;
      f.valid = true;
      return f;
    }
    seen += n;
  }
  return f;
}

// The weight-gradient kernels' blocks (grid x: column tiles of TBN, y: row tiles of BM, z:
// experts) take the experts largest first. A block's time is its expert's rows, and blocks start
// in the order of their linear index, so the long ones go first and the short ones fill the last
// wave (in index order, an expert with twice the mean rows finished alone, much of the GPU idle).
// The order comes from the device offsets (ties by index), so it costs no host sync; past
// kWgradOrderedExperts experts the index order stays. Every thread calls it (it synchronizes);
// by_size is shared memory of kWgradOrderedExperts ints.
constexpr int kWgradOrderedExperts = 64;
struct WgradTile {
  int e, m0, n0;
};
template <int TBN>
__device__ __forceinline__ WgradTile wgrad_tile_by_size(const int32_t* offsets, int* by_size) {
  const int tiles = int(gridDim.x * gridDim.y), E = int(gridDim.z);
  const int b = int(blockIdx.x + gridDim.x * (blockIdx.y + gridDim.y * blockIdx.z)), t = b % tiles;
  int e = b / tiles;
  if (E <= kWgradOrderedExperts) {
    if (int(threadIdx.x) < E) {
      const int me = int(threadIdx.x), rows = offsets[me + 1] - offsets[me];
      int rank = 0;
      for (int j = 0; j < E; ++j) {
        const int rj = offsets[j + 1] - offsets[j];
        rank += rj > rows || (rj == rows && j < me);
      }
      by_size[rank] = me;
    }
    __syncthreads();
    e = by_size[e];
  }
  return {e, (t / int(gridDim.x)) * BM, (t % int(gridDim.x)) * TBN};
}

}  // namespace moelab::grouped_gemm::sm90
