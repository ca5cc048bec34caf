// cuBLASLt state of a CudaBackend: the handle, the workspace, and the algorithm chosen per GEMM
// problem (shape, types, transposes, alignments). The heuristic query runs once per problem,
// outside capture, so a captured step only replays known algorithms.
#pragma once
#include <cublasLt.h>

#include <map>
#include <memory>
#include <tuple>

namespace moelab {

struct GemmKey {
  int64_t m, n, k;
  int ta, tb, type_ab, type_c, align, beta_nonzero;
  auto tie() const { return std::tie(m, n, k, ta, tb, type_ab, type_c, align, beta_nonzero); }
  bool operator<(const GemmKey& o) const { return tie() < o.tie(); }
};

struct GemmCache {
  cublasLtHandle_t handle = nullptr;
  std::shared_ptr<void> workspace;
  size_t workspace_bytes = 0;
  std::map<GemmKey, cublasLtMatmulAlgo_t> algos;
  ~GemmCache() {
    if (handle) cublasLtDestroy(handle);
  }
};

}  // namespace moelab
