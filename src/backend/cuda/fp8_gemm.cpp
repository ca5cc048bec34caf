// matmul_fp8 through cuBLASLt: C[M, N] = alpha deq(A) deq(B)^T + beta C with both operands
// K-major (the TN layout Hopper's FP8 tensor cores require). Row-major C is the column-major
// product C^T = B A^T, so cuBLASLt's "A" is our B (transposed) and its "B" is our A; the scale
// modes map one to one: tensor -> SCALAR_32F, row -> OUTER_VEC_32F, 1x128 -> VEC128_32F,
// 128x128 -> BLK128x128_32F (the scale layouts of backend.hpp are the ones cuBLASLt reads).
// The algorithm is chosen once per problem, outside graph capture.
#include <cuda_fp8.h>

#include "backend/cuda/cuda_backend.hpp"
#include "backend/cuda/cuda_check.hpp"
#include "backend/cuda/gemm_cache.hpp"

namespace moelab {

namespace {

cudaDataType_t fp8_type(DType d) { return d == DType::e5m2 ? CUDA_R_8F_E5M2 : CUDA_R_8F_E4M3; }

cublasLtMatmulMatrixScale_t scale_mode(Fp8Granularity g) {
  switch (g) {
    case Fp8Granularity::tensor: return CUBLASLT_MATMUL_MATRIX_SCALE_SCALAR_32F;
    case Fp8Granularity::row: return CUBLASLT_MATMUL_MATRIX_SCALE_OUTER_VEC_32F;
    case Fp8Granularity::block_1x128: return CUBLASLT_MATMUL_MATRIX_SCALE_VEC128_32F;
    case Fp8Granularity::block_128x128: return CUBLASLT_MATMUL_MATRIX_SCALE_BLK128x128_32F;
  }
  return CUBLASLT_MATMUL_MATRIX_SCALE_SCALAR_32F;
}

void check_operand(const QuantizedOperand& q, const char* name) {
  auto bad = [&](const std::string& what) { throw Error(std::string("cuda matmul_fp8: ") + name + " " + what); };
  if (q.data.device != Device::cuda || q.scale.device != Device::cuda) bad("must live on the GPU");
  if (q.data.dtype != DType::e4m3 && q.data.dtype != DType::e5m2) bad("data must be e4m3 or e5m2, got " + q.data.describe());
  if (q.scale.dtype != DType::f32) bad("scale must be f32, got " + q.scale.describe());
  if (q.data.ndim() != 2) bad("data must be [rows, K], got " + q.data.describe());
  if (q.scale.shape != fp8_scale_shape(q.granularity, q.data.dim(0), q.data.dim(1)))
    bad("scale is " + q.scale.describe() + ", not the " + fp8_granularity_name(q.granularity) + " layout of " +
        q.data.describe());
  if (q.data.dim(0) % 16 != 0 || q.data.dim(1) % 16 != 0)
    bad("dimensions must be multiples of 16 for the FP8 tensor cores, got " + q.data.describe());
}

}  // namespace

void CudaBackend::matmul_fp8(const QuantizedOperand& A, const QuantizedOperand& B, Tensor& C, float alpha,
                             float beta, bool fast_accum) {
  check_operand(A, "A");
  check_operand(B, "B");
  const int64_t M = A.data.dim(0), N = B.data.dim(0), K = A.data.dim(1);
  if (B.data.dim(1) != K)
    throw Error("cuda matmul_fp8: A.data " + A.data.describe() + " and B.data " + B.data.describe() + " differ in K");
  if (C.device != Device::cuda || (C.dtype != DType::bf16 && C.dtype != DType::f32) || C.rows() != M || C.cols() != N)
    throw Error("cuda matmul_fp8: C must be a bf16/f32 GPU [" + std::to_string(M) + ", " + std::to_string(N) +
                "] matrix, got " + C.describe());
  if (A.data.dtype == DType::e5m2 && B.data.dtype == DType::e5m2)
    throw Error("cuda matmul_fp8: at most one operand may be e5m2 (Hopper has no e5m2 x e5m2 product)");
  if (M == 0 || N == 0) return;

  // cuBLASLt's A is our B, its B our A.
  const cublasLtMatmulMatrixScale_t mode_a = scale_mode(B.granularity), mode_b = scale_mode(A.granularity);
  const cudaDataType_t c_type = C.dtype == DType::bf16 ? CUDA_R_16BF : CUDA_R_32F;
  const int8_t fast = fast_accum ? 1 : 0;
  Fp8GemmKey key{M, N, K, int(B.data.dtype), int(A.data.dtype), int(mode_a), int(mode_b), int(C.dtype), beta != 0, fast};

  LtDesc d;
  const cublasOperation_t op_t = CUBLAS_OP_T, op_n = CUBLAS_OP_N;
  MOELAB_CUBLAS_CHECK(cublasLtMatmulDescCreate(&d.op, CUBLAS_COMPUTE_32F, CUDA_R_32F));
  MOELAB_CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(d.op, CUBLASLT_MATMUL_DESC_TRANSA, &op_t, sizeof(op_t)));
  MOELAB_CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(d.op, CUBLASLT_MATMUL_DESC_TRANSB, &op_n, sizeof(op_n)));
  MOELAB_CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(d.op, CUBLASLT_MATMUL_DESC_FAST_ACCUM, &fast, sizeof(fast)));
  MOELAB_CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(d.op, CUBLASLT_MATMUL_DESC_A_SCALE_MODE, &mode_a, sizeof(mode_a)));
  MOELAB_CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(d.op, CUBLASLT_MATMUL_DESC_B_SCALE_MODE, &mode_b, sizeof(mode_b)));
  const void* scale_a = B.scale.data;
  const void* scale_b = A.scale.data;
  MOELAB_CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(d.op, CUBLASLT_MATMUL_DESC_A_SCALE_POINTER, &scale_a, sizeof(scale_a)));
  MOELAB_CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(d.op, CUBLASLT_MATMUL_DESC_B_SCALE_POINTER, &scale_b, sizeof(scale_b)));
  MOELAB_CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&d.a, fp8_type(B.data.dtype), K, N, K));
  MOELAB_CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&d.b, fp8_type(A.data.dtype), K, M, K));
  MOELAB_CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&d.c, c_type, N, M, N));

  auto via_bf16 = [&] {
    Tensor tmp;
    tmp.dtype = DType::bf16;
    tmp.device = Device::cuda;
    tmp.shape = {M, N};
    tmp.data = scratch(ScratchSlot::fp8_out, tmp.bytes());
    matmul_fp8(A, B, tmp, alpha, 0.0f, fast_accum);
    axpby(1.0f, tmp, beta, C);
  };
  if (fast_accum && gemm_->fp8_no_fast.count(key)) return matmul_fp8(A, B, C, alpha, beta, false);
  if (gemm_->fp8_via_bf16.count(key)) return via_bf16();
  auto it = gemm_->fp8_algos.find(key);
  if (it == gemm_->fp8_algos.end()) {
    if (capturing_)
      throw Error("cuda matmul_fp8: new GEMM shape " + std::to_string(M) + "x" + std::to_string(N) + "x" +
                  std::to_string(K) + " first seen during graph capture; run the step eagerly first");
    MOELAB_CUBLAS_CHECK(cublasLtMatmulPreferenceCreate(&d.pref));
    uint64_t ws = gemm_->workspace_bytes;
    MOELAB_CUBLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(d.pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ws, sizeof(ws)));
    cublasLtMatmulHeuristicResult_t res{};
    int found = 0;
    cublasStatus_t st = cublasLtMatmulAlgoGetHeuristic(gemm_->handle, d.op, d.a, d.b, d.c, d.c, d.pref, 1, &res, &found);
    if ((st != CUBLAS_STATUS_SUCCESS || found == 0) && fast_accum) {
      // Some scale modes have no fast-accumulation kernels: run them with full accumulation.
      gemm_->fp8_no_fast.insert(key);
      return matmul_fp8(A, B, C, alpha, beta, false);
    }
    if ((st != CUBLAS_STATUS_SUCCESS || found == 0) && C.dtype == DType::f32) {
      gemm_->fp8_via_bf16.insert(key);
      return via_bf16();
    }
    if (st != CUBLAS_STATUS_SUCCESS || found == 0)
      throw Error("cuda matmul_fp8: cuBLASLt has no FP8 algorithm for " + std::to_string(M) + "x" + std::to_string(N) +
                  "x" + std::to_string(K) + " (" + dtype_name(A.data.dtype) + " " + fp8_granularity_name(A.granularity) +
                  " x " + dtype_name(B.data.dtype) + " " + fp8_granularity_name(B.granularity) + " -> " +
                  dtype_name(C.dtype) + (beta != 0 ? ", beta != 0" : "") + "; status " + std::to_string(int(st)) +
                  "); use another fp8.recipe or precision = bf16");
    it = gemm_->fp8_algos.emplace(key, res.algo).first;
  }
  MOELAB_CUBLAS_CHECK(cublasLtMatmul(gemm_->handle, d.op, &alpha, B.data.data, d.a, A.data.data, d.b, &beta, C.data,
                                     d.c, C.data, d.c, &it->second, gemm_->workspace.get(), gemm_->workspace_bytes,
                                     stream_));
}

}  // namespace moelab
