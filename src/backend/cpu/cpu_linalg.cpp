// Dense and per-expert matrix multiplies, all on the blocked kernel of gemm.cpp. Grouped GEMMs
// read the expert offsets from host memory (on the CPU the "device" is the host, so this is no
// sync) and run all experts' GEMMs as one batch, so small experts still fill every thread.
#include <algorithm>

#include "backend/cpu/cpu_backend.hpp"
#include "backend/cpu/cpu_common.hpp"
#include "backend/cpu/gemm.hpp"

namespace moelab {

using namespace cpu;

namespace {

// Checked expert offsets: E+1 non-decreasing values from 0 to at most rows.
std::vector<int64_t> read_offsets(const Tensor& offsets, int64_t experts, int64_t rows,
                                  const char* op) {
  require_i32(offsets, op, "offsets");
  require_numel(offsets, experts + 1, op, "offsets");
  const int32_t* o = ptr<int32_t>(offsets);
  std::vector<int64_t> out(size_t(experts + 1));
  for (int64_t e = 0; e <= experts; ++e) {
    out[size_t(e)] = o[e];
    require(o[e] >= 0 && o[e] <= rows && (e == 0 || o[e] >= o[e - 1]), op,
            "offsets[" + std::to_string(e) + "] = " + std::to_string(o[e]) +
                " is out of order or past the " + std::to_string(rows) +
                " rows; pass the offsets written by moe_plan");
  }
  return out;
}

}  // namespace

void CpuBackend::matmul(const Tensor& A, bool trans_a, const Tensor& B, bool trans_b, Tensor& C,
                        float alpha, float beta) {
  require_float(A, "matmul", "A");
  require_like(A, B, "matmul", "B");
  require_like(A, C, "matmul", "C");
  const int64_t ar = matrix_rows(A), br = matrix_rows(B);
  const int64_t M = trans_a ? A.cols() : ar, K = trans_a ? ar : A.cols();
  const int64_t Kb = trans_b ? B.cols() : br, N = trans_b ? br : B.cols();
  require(K == Kb, "matmul",
          "inner dimensions differ: op(A) of " + A.describe() + (trans_a ? " (transposed)" : "") +
              " has K = " + std::to_string(K) + ", op(B) of " + B.describe() +
              (trans_b ? " (transposed)" : "") + " has K = " + std::to_string(Kb));
  require(matrix_rows(C) == M && C.cols() == N, "matmul",
          "C is " + C.describe() + " but op(A) op(B) is [" + std::to_string(M) + ", " +
              std::to_string(N) + "]");
  require(C.numel() == 0 || (C.data != A.data && C.data != B.data), "matmul",
          "C must not alias A or B; write into a separate tensor");
  with_float(A.dtype, [&](auto te) {
    using T = decltype(te);
    gemm<T>(pool_, M, N, K, ptr<T>(A), trans_a, ptr<T>(B), trans_b, ptr<T>(C), T(alpha), T(beta));
  });
}

void CpuBackend::grouped_matmul(const Tensor& A, const Tensor& W, bool trans_w, Tensor& C, const Tensor& offsets,
                                float alpha, float beta, const Tensor* addend) {
  const char* op = "grouped_matmul";
  require_float(A, op, "A");
  require_like(A, W, op, "W");
  require_like(A, C, op, "C");
  require(W.ndim() == 3, op, "W is " + W.describe() + " but must be [E, N, K] or [E, K, N]");
  const int64_t E = W.dim(0), N = trans_w ? W.dim(1) : W.dim(2), K = trans_w ? W.dim(2) : W.dim(1);
  require(A.cols() == K, op, "A is " + A.describe() + " but W gives K = " + std::to_string(K));
  require(C.cols() == N && matrix_rows(C) == matrix_rows(A), op,
          "C is " + C.describe() + " but must be [" + std::to_string(matrix_rows(A)) + ", " +
              std::to_string(N) + "]");
  const bool add = beta != 0.0f && addend;
  if (add) {
    require_like(C, *addend, op, "addend");
    require(addend->numel() == C.numel(), op, "addend is " + addend->describe() + " but C is " + C.describe());
  }
  const auto off = read_offsets(offsets, E, matrix_rows(A), op);
  with_float(A.dtype, [&](auto te) {
    using T = decltype(te);
    std::vector<GemmProblem<T>> problems;
    for (int64_t e = 0; e < E; ++e) {
      const int64_t r0 = off[size_t(e)], rows = off[size_t(e + 1)] - r0;
      if (rows == 0) continue;
      // The addend goes into C first, so the GEMM's beta accumulation adds it.
      if (add && addend->data != C.data)
        std::copy_n(ptr<T>(*addend) + r0 * N, rows * N, ptr<T>(C) + r0 * N);
      problems.push_back({rows, N, K, ptr<T>(A) + r0 * K, false, ptr<T>(W) + e * N * K, trans_w,
                          ptr<T>(C) + r0 * N, T(alpha), T(add ? beta : 0.0f)});
    }
    gemm_batch(pool_, problems);
  });
}

void CpuBackend::grouped_matmul_wgrad(const Tensor& dY, const Tensor& X, Tensor& dW, const Tensor& offsets,
                                      float beta, const Tensor* addend) {
  const char* op = "grouped_matmul_wgrad";
  require_float(dY, op, "dY");
  require_like(dY, X, op, "X");
  require_like(dY, dW, op, "dW");
  require(dW.ndim() == 3, op, "dW is " + dW.describe() + " but must be [E, N, K]");
  const int64_t E = dW.dim(0), N = dW.dim(1), K = dW.dim(2);
  require(dY.cols() == N && X.cols() == K && matrix_rows(dY) == matrix_rows(X), op,
          "dY " + dY.describe() + " and X " + X.describe() + " do not match dW " + dW.describe());
  if (beta != 0.0f && addend && addend->data != dW.data) {
    require_like(dW, *addend, op, "addend");
    require(addend->numel() == dW.numel(), op, "addend is " + addend->describe() + " but dW is " + dW.describe());
    with_float(dW.dtype, [&](auto te) {
      using T = decltype(te);
      std::copy_n(ptr<T>(*addend), dW.numel(), ptr<T>(dW));
    });
  }
  const auto off = read_offsets(offsets, E, matrix_rows(dY), op);
  with_float(dY.dtype, [&](auto te) {
    using T = decltype(te);
    std::vector<GemmProblem<T>> problems;
    for (int64_t e = 0; e < E; ++e) {
      const int64_t r0 = off[size_t(e)], rows = off[size_t(e + 1)] - r0;
      problems.push_back({N, K, rows, ptr<T>(dY) + r0 * N, true, ptr<T>(X) + r0 * K, false,
                          ptr<T>(dW) + e * N * K, T(1), T(beta)});
    }
    gemm_batch(pool_, problems);
  });
}

}  // namespace moelab
