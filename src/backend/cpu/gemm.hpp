// Blocked, packed matrix multiply on the host: C = alpha * op(A) op(B) + beta * C for contiguous
// row-major operands. Used by matmul, grouped_matmul and its weight gradient.
#pragma once
#include <cstdint>
#include <vector>

#include "backend/cpu/thread_pool.hpp"

namespace moelab::cpu {

// op(A) is [M, K] (A stored [K, M] when trans_a), op(B) is [K, N] (B stored [N, K] when trans_b),
// C is [M, N]. beta == 0 overwrites C without reading it. Each element of C is computed by one
// thread with a summation order fixed by the K blocking alone, so results do not depend on the
// thread count.
template <class T>
struct GemmProblem {
  int64_t M = 0, N = 0, K = 0;
  const T* A = nullptr;
  bool trans_a = false;
  const T* B = nullptr;
  bool trans_b = false;
  T* C = nullptr;
  T alpha = T(1), beta = T(0);
};

// Several independent products (e.g. one per expert) in one parallel pass: their blocks form one
// task list, so many small GEMMs still keep every thread busy. Same bits as separate gemm calls.
template <class T>
void gemm_batch(ThreadPool& pool, const std::vector<GemmProblem<T>>& problems);

template <class T>
void gemm(ThreadPool& pool, int64_t M, int64_t N, int64_t K, const T* A, bool trans_a, const T* B,
          bool trans_b, T* C, T alpha, T beta);

}  // namespace moelab::cpu
