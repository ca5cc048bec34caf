// cuBLASLt state of a CudaBackend: the handle, the workspace, and the algorithm chosen per GEMM
// problem (shape, types, transposes, alignments). The heuristic query runs once per problem,
// outside capture, so a captured step only replays known algorithms.
#pragma once
#include <cublasLt.h>

#include <map>
#include <set>
#include <memory>
#include <tuple>

namespace moelab {

struct GemmKey {
  int64_t m, n, k;
  int ta, tb, type_ab, type_c, align, beta_nonzero;
  auto tie() const { return std::tie(m, n, k, ta, tb, type_ab, type_c, align, beta_nonzero); }
  bool operator<(const GemmKey& o) const { return tie() < o.tie(); }
};

// An FP8 GEMM problem (fp8_gemm.cpp): shape, operand formats, scale modes, output type.
struct Fp8GemmKey {
  int64_t m, n, k;
  int type_a, type_b, mode_a, mode_b, type_c, beta_nonzero, fast_accum;
  auto tie() const { return std::tie(m, n, k, type_a, type_b, mode_a, mode_b, type_c, beta_nonzero, fast_accum); }
  bool operator<(const Fp8GemmKey& o) const { return tie() < o.tie(); }
};

// The descriptors of one cuBLASLt GEMM call (operation, the three layouts, the algorithm
// preference), destroyed together.
struct LtDesc {
  cublasLtMatmulDesc_t op = nullptr;
  cublasLtMatrixLayout_t a = nullptr, b = nullptr, c = nullptr;
  cublasLtMatmulPreference_t pref = nullptr;
  LtDesc() = default;
  LtDesc(const LtDesc&) = delete;
  LtDesc& operator=(const LtDesc&) = delete;
  ~LtDesc() {
    if (pref) cublasLtMatmulPreferenceDestroy(pref);
    if (c) cublasLtMatrixLayoutDestroy(c);
    if (b) cublasLtMatrixLayoutDestroy(b);
    if (a) cublasLtMatrixLayoutDestroy(a);
    if (op) cublasLtMatmulDescDestroy(op);
  }
};

struct GemmCache {
  cublasLtHandle_t handle = nullptr;
  std::shared_ptr<void> workspace;
  size_t workspace_bytes = 0;
  std::map<GemmKey, cublasLtMatmulAlgo_t> algos;
  std::map<Fp8GemmKey, cublasLtMatmulAlgo_t> fp8_algos;
  // FP8 problems with f32 output that cuBLASLt serves only with bf16 output: run into bf16
  // scratch, then C = tmp + beta C.
  std::set<Fp8GemmKey> fp8_via_bf16;
  std::set<Fp8GemmKey> fp8_no_fast;  // problems without a fast-accumulation kernel
  ~GemmCache() {
    if (handle) cublasLtDestroy(handle);
  }
};

}  // namespace moelab
