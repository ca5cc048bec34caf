// The GotoBLAS shape: C is cut into MC x NC blocks (the parallel tasks), K into KC slices; per
// slice a task packs its A block into MR-row strips and its B block into NR-column strips (zero
// padded, so edge tiles run the same micro-kernel), then a register-tiled MR x NR micro-kernel
// written with GCC vector extensions sweeps the block. The sweep is compiled twice (x86-64-v3,
// i.e. AVX2+FMA, and the baseline) and picked at load time, which is deterministic on one
// machine. Blocks are the unit of parallel work, and a block's arithmetic does not depend on
// which thread runs it, so results are the same for any thread count.
#include "backend/cpu/gemm.hpp"

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <new>

#include "backend/cpu/simd.hpp"

namespace moelab::cpu {

namespace {

constexpr int64_t kMR = 6;
constexpr int64_t kKC = 256;
constexpr int64_t kMC = 96;   // multiple of kMR
constexpr int64_t kNC = 256;  // multiple of both NR values (16 for f32, 8 for f64)

template <class T>
struct Tile {
  static constexpr int64_t VL = 32 / int64_t(sizeof(T));  // lanes in a 32-byte vector
  static constexpr int64_t NR = 2 * VL;
  typedef T Vec __attribute__((vector_size(32)));
};

// Per-thread packing buffers, grown on demand and 64-byte aligned.
struct Scratch {
  void* p = nullptr;
  size_t bytes = 0;
  ~Scratch() { std::free(p); }
  void* get(size_t n) {
    if (n > bytes) {
      std::free(p);
      bytes = (n + 63) / 64 * 64;
      p = std::aligned_alloc(64, bytes);
      if (!p) throw std::bad_alloc();
    }
    return p;
  }
};

}  // namespace

namespace detail {

// Sweeps one packed block: pa holds ceil(mc/MR) strips of [kc][MR], pb ceil(nc/NR) strips of
// [kc][NR]. first: this is the first K slice, so beta applies (beta == 0: C is not read).
template <class T>
MOELAB_CPU_INLINE void block_sweep(int64_t mc, int64_t nc, int64_t kc, const T* pa, const T* pb,
                                   T* C, int64_t ldc, T alpha, T beta, bool first) {
  using V = typename Tile<T>::Vec;
  constexpr int64_t VL = Tile<T>::VL, NR = Tile<T>::NR;
  for (int64_t jr = 0; jr < nc; jr += NR) {
    const T* bs = pb + (jr / NR) * kc * NR;
    const int64_t nr = std::min(NR, nc - jr);
    for (int64_t ir = 0; ir < mc; ir += kMR) {
      const T* as = pa + (ir / kMR) * kc * kMR;
      V c0[kMR], c1[kMR];
      for (int64_t i = 0; i < kMR; ++i) {
        c0[i] = V{};
        c1[i] = V{};
      }
      for (int64_t k = 0; k < kc; ++k) {
        V b0, b1;
        std::memcpy(&b0, bs + k * NR, sizeof(V));
        std::memcpy(&b1, bs + k * NR + VL, sizeof(V));
        const T* a = as + k * kMR;
#pragma GCC unroll 6
        for (int64_t i = 0; i < kMR; ++i) {
          c0[i] += a[i] * b0;
          c1[i] += a[i] * b1;
        }
      }
      alignas(64) T acc[kMR][NR];
      for (int64_t i = 0; i < kMR; ++i) {
        std::memcpy(&acc[i][0], &c0[i], sizeof(V));
        std::memcpy(&acc[i][VL], &c1[i], sizeof(V));
      }
      const int64_t mr = std::min(kMR, mc - ir);
      for (int64_t i = 0; i < mr; ++i) {
        T* crow = C + (ir + i) * ldc + jr;
        if (first && beta == T(0)) {
          for (int64_t j = 0; j < nr; ++j) crow[j] = alpha * acc[i][j];
        } else if (first && beta != T(1)) {
          for (int64_t j = 0; j < nr; ++j) crow[j] = beta * crow[j] + alpha * acc[i][j];
        } else {
          for (int64_t j = 0; j < nr; ++j) crow[j] += alpha * acc[i][j];
        }
      }
    }
  }
}

MOELAB_CPU_CLONES void block_sweep_f32(
    int64_t mc, int64_t nc, int64_t kc, const float* pa, const float* pb, float* C, int64_t ldc,
    float alpha, float beta, bool first) {
  block_sweep<float>(mc, nc, kc, pa, pb, C, ldc, alpha, beta, first);
}

MOELAB_CPU_CLONES void block_sweep_f64(
    int64_t mc, int64_t nc, int64_t kc, const double* pa, const double* pb, double* C,
    int64_t ldc, double alpha, double beta, bool first) {
  block_sweep<double>(mc, nc, kc, pa, pb, C, ldc, alpha, beta, first);
}

}  // namespace detail

namespace {

inline void sweep(int64_t mc, int64_t nc, int64_t kc, const float* pa, const float* pb, float* C,
                  int64_t ldc, float alpha, float beta, bool first) {
  detail::block_sweep_f32(mc, nc, kc, pa, pb, C, ldc, alpha, beta, first);
}
inline void sweep(int64_t mc, int64_t nc, int64_t kc, const double* pa, const double* pb,
                  double* C, int64_t ldc, double alpha, double beta, bool first) {
  detail::block_sweep_f64(mc, nc, kc, pa, pb, C, ldc, alpha, beta, first);
}

// Rows [i0, i0+mc), depth [p0, p0+kc) of op(A) into strips of [kc][MR].
template <class T>
void pack_a(const T* A, bool trans_a, int64_t M, int64_t K, int64_t i0, int64_t mc, int64_t p0,
            int64_t kc, T* out) {
  for (int64_t s = 0; s < mc; s += kMR) {
    T* dst = out + (s / kMR) * kc * kMR;
    const int64_t mr = std::min(kMR, mc - s);
    if (!trans_a) {
      for (int64_t i = 0; i < kMR; ++i) {
        if (i < mr) {
          const T* src = A + (i0 + s + i) * K + p0;
          for (int64_t k = 0; k < kc; ++k) dst[k * kMR + i] = src[k];
        } else {
          for (int64_t k = 0; k < kc; ++k) dst[k * kMR + i] = T(0);
        }
      }
    } else {
      for (int64_t k = 0; k < kc; ++k) {
        const T* src = A + (p0 + k) * M + i0 + s;
        for (int64_t i = 0; i < kMR; ++i) dst[k * kMR + i] = i < mr ? src[i] : T(0);
      }
    }
  }
}

// Depth [p0, p0+kc), columns [j0, j0+nc) of op(B) into strips of [kc][NR].
template <class T>
void pack_b(const T* B, bool trans_b, int64_t N, int64_t K, int64_t j0, int64_t nc, int64_t p0,
            int64_t kc, T* out) {
  constexpr int64_t NR = Tile<T>::NR;
  for (int64_t s = 0; s < nc; s += NR) {
    T* dst = out + (s / NR) * kc * NR;
    const int64_t nr = std::min(NR, nc - s);
    if (!trans_b) {
      for (int64_t k = 0; k < kc; ++k) {
        const T* src = B + (p0 + k) * N + j0 + s;
        for (int64_t j = 0; j < NR; ++j) dst[k * NR + j] = j < nr ? src[j] : T(0);
      }
    } else {
      for (int64_t j = 0; j < NR; ++j) {
        if (j < nr) {
          const T* src = B + (j0 + s + j) * K + p0;
          for (int64_t k = 0; k < kc; ++k) dst[k * NR + j] = src[k];
        } else {
          for (int64_t k = 0; k < kc; ++k) dst[k * NR + j] = T(0);
        }
      }
    }
  }
}

// Blocks of one problem: MC x NC tiles aligned to the problem's origin, so an element's arithmetic
// is the same whichever task (and thread) computes it.
template <class T>
int64_t block_count(const GemmProblem<T>& p) {
  if (p.M <= 0 || p.N <= 0) return 0;
  return ((p.M + kMC - 1) / kMC) * ((p.N + kNC - 1) / kNC);
}

template <class T>
void run_block(const GemmProblem<T>& p, int64_t block) {
  constexpr int64_t NR = Tile<T>::NR;
  thread_local Scratch sa, sb;
  const int64_t nblocks = (p.N + kNC - 1) / kNC;
  const int64_t i0 = (block / nblocks) * kMC, j0 = (block % nblocks) * kNC;
  const int64_t mc = std::min(kMC, p.M - i0), nc = std::min(kNC, p.N - j0);
  T* C = p.C + i0 * p.N + j0;
  if (p.K <= 0 || p.alpha == T(0)) {
    // Nothing to multiply: C = beta * C (beta == 0 writes zeros even over NaN).
    for (int64_t i = 0; i < mc; ++i)
      for (int64_t j = 0; j < nc; ++j)
        C[i * p.N + j] = p.beta == T(0) ? T(0) : p.beta * C[i * p.N + j];
    return;
  }
  const int64_t mc_pad = (mc + kMR - 1) / kMR * kMR, nc_pad = (nc + NR - 1) / NR * NR;
  const int64_t kc_max = std::min(kKC, p.K);
  T* pa = static_cast<T*>(sa.get(size_t(mc_pad * kc_max) * sizeof(T)));
  T* pb = static_cast<T*>(sb.get(size_t(nc_pad * kc_max) * sizeof(T)));
  for (int64_t p0 = 0; p0 < p.K; p0 += kKC) {
    const int64_t kc = std::min(kKC, p.K - p0);
    pack_a(p.A, p.trans_a, p.M, p.K, i0, mc, p0, kc, pa);
    pack_b(p.B, p.trans_b, p.N, p.K, j0, nc, p0, kc, pb);
    sweep(mc, nc, kc, pa, pb, C, p.N, p.alpha, p.beta, p0 == 0);
  }
}

}  // namespace

template <class T>
void gemm_batch(ThreadPool& pool, const std::vector<GemmProblem<T>>& problems) {
  std::vector<int64_t> first_task(problems.size() + 1, 0);  // prefix sum of block counts
  for (size_t i = 0; i < problems.size(); ++i)
    first_task[i + 1] = first_task[i] + block_count(problems[i]);
  pool.run(first_task.back(), [&](int64_t task) {
    const size_t i = size_t(std::upper_bound(first_task.begin(), first_task.end(), task) -
                            first_task.begin()) - 1;
    run_block(problems[i], task - first_task[i]);
  });
}

template <class T>
void gemm(ThreadPool& pool, int64_t M, int64_t N, int64_t K, const T* A, bool trans_a, const T* B,
          bool trans_b, T* C, T alpha, T beta) {
  gemm_batch<T>(pool, {GemmProblem<T>{M, N, K, A, trans_a, B, trans_b, C, alpha, beta}});
}

template void gemm_batch<float>(ThreadPool&, const std::vector<GemmProblem<float>>&);
template void gemm_batch<double>(ThreadPool&, const std::vector<GemmProblem<double>>&);
template void gemm<float>(ThreadPool&, int64_t, int64_t, int64_t, const float*, bool, const float*,
                          bool, float*, float, float);
template void gemm<double>(ThreadPool&, int64_t, int64_t, int64_t, const double*, bool,
                           const double*, bool, double*, double, double);

}  // namespace moelab::cpu
