// Linear algebra: the dense GEMM and the experts' grouped GEMMs (BF16/f32; the FP8 forms are
// in fp8.hpp).
#pragma once
#include "backend/ops/elementwise.hpp"

namespace moelab {

// The grouped GEMMs may fold ReLU² in (ElementwiseOps::relu2_*), hence the base.
class LinearAlgebraOps : public virtual ElementwiseOps {
 public:
  // C = alpha * op(A) @ op(B) + beta * C on matrix views. op(A) is [M, K] (A is [K, M] when
  // trans_a), op(B) is [K, N] (B is [N, K] when trans_b), C is [M, N]. With beta == 0, C's old
  // contents are ignored (NaN included).
  virtual void matmul(const Tensor& A, bool trans_a, const Tensor& B, bool trans_b, Tensor& C,
                      float alpha = 1.0f, float beta = 0.0f) = 0;

  // Expert GEMMs over the permuted rows, reading offsets [E+1] on the device. For each expert e,
  // rows [offsets[e], offsets[e+1]) of A [R, K] times op(W[e]) go to the same rows of C [R, N]:
  // C = alpha A op(W) + beta addend, addend [R, N] (may be C itself; ignored when beta = 0).
  // W is [E, N, K] when trans_w (y = x W_e^T, the Linear convention) else [E, K, N].
  virtual void grouped_matmul(const Tensor& A, const Tensor& W, bool trans_w, Tensor& C,
                              const Tensor& offsets, float alpha = 1.0f, float beta = 0.0f,
                              const Tensor* addend = nullptr) = 0;
  // grouped_matmul (alpha 1, beta 0) with the expert MLP's ReLU² in its store: fold.relu2_output
  // (the up projection's forward) or fold.relu2_input (the down projection's data gradient; C
  // then holds dh). The FP8 fields must be unset. This default runs the unfolded ops.
  virtual void grouped_matmul_relu2(const Tensor& A, const Tensor& W, bool trans_w, Tensor& C, const Tensor& offsets,
                                    const ExpertRelu2Fold& fold) {
    check_bf16_relu2_fold(fold, C);
    grouped_matmul(A, W, trans_w, C, offsets);
    if (fold.relu2_output) relu2_fwd(C, *fold.relu2_output);
    if (fold.relu2_input) relu2_bwd(*fold.relu2_input, C, C);
  }
  // dW[e] = dY_e^T X_e + beta * addend[e] with dY [R, N], X [R, K], dW and addend [E, N, K];
  // addend defaults to dW itself (accumulation).
  virtual void grouped_matmul_wgrad(const Tensor& dY, const Tensor& X, Tensor& dW,
                                    const Tensor& offsets, float beta, const Tensor* addend = nullptr) = 0;
};

}  // namespace moelab
