// Dense matmul through cuBLASLt. Row-major C = op(A) op(B) is computed as the column-major
// product C^T = op(B)^T op(A)^T, so no data is transposed. bf16 operands accumulate in f32 and
// write bf16 or f32 (f32 with beta for weight-gradient accumulation); f32 operands run as TF32.
// Mixed operand types are converted to bf16 in scratch first (cuBLASLt wants one operand type).
#include <algorithm>

#include "backend/cuda/cuda_backend.hpp"
#include "backend/cuda/cuda_check.hpp"
#include "backend/cuda/gemm_cache.hpp"

namespace moelab {

namespace {

cudaDataType_t cuda_type(DType d) {
  switch (d) {
    case DType::f32: return CUDA_R_32F;
    case DType::bf16: return CUDA_R_16BF;
    default: throw Error(std::string("cuda matmul: unsupported dtype ") + dtype_name(d));
  }
}

int pointer_alignment(const void* p) {
  auto a = reinterpret_cast<uintptr_t>(p);
  int al = 256;
  while (al > 1 && (a % al) != 0) al /= 2;
  return al;
}

}  // namespace

void CudaBackend::matmul(const Tensor& A_in, bool trans_a, const Tensor& B_in, bool trans_b,
                         Tensor& C, float alpha, float beta) {
  for (const Tensor* t : {&A_in, &B_in, static_cast<const Tensor*>(&C)})
    if (t->device != Device::cuda || (t->dtype != DType::f32 && t->dtype != DType::bf16))
      throw Error("cuda matmul: operands must be f32/bf16 GPU tensors, got " + t->describe());
  const int64_t M = trans_a ? A_in.cols() : A_in.rows();
  const int64_t K = trans_a ? A_in.rows() : A_in.cols();
  const int64_t Kb = trans_b ? B_in.cols() : B_in.rows();
  const int64_t N = trans_b ? B_in.rows() : B_in.cols();
  if (K != Kb || C.rows() != M || C.cols() != N)
    throw Error("cuda matmul: shapes do not agree: A " + A_in.describe() + (trans_a ? "^T" : "") +
                ", B " + B_in.describe() + (trans_b ? "^T" : "") + ", C " + C.describe());
  if (M == 0 || N == 0) return;
  if (K == 0) {
    if (beta == 0) fill(C, 0.f);
    else axpby(0.f, C, beta, C);
    return;
  }

  // One operand type: convert the f32 side to bf16 when the two differ.
  Tensor A = A_in, B = B_in;
  if (A.dtype != B.dtype) {
    Tensor& f = A.dtype == DType::f32 ? A : B;
    Tensor conv;
    conv.dtype = DType::bf16;
    conv.device = Device::cuda;
    conv.shape = f.shape;
    conv.data = scratch(&f == &A ? ScratchSlot::gemm_a : ScratchSlot::gemm_b, conv.bytes());
    copy(f, conv);
    f = conv;
  }
  const DType tab = A.dtype;

  // Column-major problem: D (N x M) = opA(B') (N x K) * opB(A') (K x M).
  const cublasOperation_t op_first = trans_b ? CUBLAS_OP_T : CUBLAS_OP_N;
  const cublasOperation_t op_second = trans_a ? CUBLAS_OP_T : CUBLAS_OP_N;
  const int64_t first_rows = trans_b ? K : N, first_cols = trans_b ? N : K;
  const int64_t second_rows = trans_a ? M : K, second_cols = trans_a ? K : M;

  int align = std::min({pointer_alignment(A.data), pointer_alignment(B.data), pointer_alignment(C.data)});
  GemmKey key{M, N, K, trans_a, trans_b, int(tab), int(C.dtype), align, beta != 0};

  LtDesc d;
  cublasComputeType_t compute = tab == DType::f32 ? CUBLAS_COMPUTE_32F_FAST_TF32 : CUBLAS_COMPUTE_32F;
  MOELAB_CUBLAS_CHECK(cublasLtMatmulDescCreate(&d.op, compute, CUDA_R_32F));
  MOELAB_CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(d.op, CUBLASLT_MATMUL_DESC_TRANSA, &op_first, sizeof(op_first)));
  MOELAB_CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(d.op, CUBLASLT_MATMUL_DESC_TRANSB, &op_second, sizeof(op_second)));
  MOELAB_CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&d.a, cuda_type(tab), first_rows, first_cols, first_rows));
  MOELAB_CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&d.b, cuda_type(tab), second_rows, second_cols, second_rows));
  MOELAB_CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&d.c, cuda_type(C.dtype), N, M, N));

  auto it = gemm_->algos.find(key);
  if (it == gemm_->algos.end()) {
    if (capturing_)
      throw Error("cuda matmul: new GEMM shape " + std::to_string(M) + "x" + std::to_string(N) + "x" +
                  std::to_string(K) + " first seen during graph capture; run the step eagerly first");
    MOELAB_CUBLAS_CHECK(cublasLtMatmulPreferenceCreate(&d.pref));
    uint64_t ws = gemm_->workspace_bytes;
    uint32_t al = uint32_t(align);
    MOELAB_CUBLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(d.pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ws, sizeof(ws)));
    for (auto attr : {CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES,
                      CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES})
      MOELAB_CUBLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(d.pref, attr, &al, sizeof(al)));
    cublasLtMatmulHeuristicResult_t res{};
    int found = 0;
    MOELAB_CUBLAS_CHECK(cublasLtMatmulAlgoGetHeuristic(gemm_->handle, d.op, d.a, d.b, d.c, d.c, d.pref, 1, &res, &found));
    if (found == 0)
      throw Error("cuda matmul: cuBLASLt has no algorithm for " + std::to_string(M) + "x" +
                  std::to_string(N) + "x" + std::to_string(K) + " (" + dtype_name(tab) + " -> " +
                  dtype_name(C.dtype) + ")");
    it = gemm_->algos.emplace(key, res.algo).first;
  }
  MOELAB_CUBLAS_CHECK(cublasLtMatmul(gemm_->handle, d.op, &alpha, B.data, d.a, A.data, d.b, &beta, C.data,
                                     d.c, C.data, d.c, &it->second, gemm_->workspace.get(),
                                     gemm_->workspace_bytes, stream_));
}

}  // namespace moelab
