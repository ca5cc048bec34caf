// The FP8 family: quantization into FP8 operands (QuantizedOperand, QuantizedExperts) and the
// dense and grouped FP8 GEMMs. Which products run in FP8 and with which scaling is the recipe's
// (core/fp8_recipe.hpp); these ops take the granularities and formats it gives.
#pragma once
#include <vector>

#include "backend/ops/linear_algebra.hpp"

namespace moelab {

// The FP8 defaults below fall back on the unfolded ops (ReLU², copies), hence the base.
class Fp8Ops : public virtual LinearAlgebraOps {
 public:
  // Quantizes the matrix view of x (any float dtype) into out: out.data's dtype (e4m3 | e5m2)
  // picks the format, out.granularity the scaling; amax and scales are computed on the device.
  // transpose = false: out.data [rows, cols] = x; true: out.data [cols, rows] = x^T (the copy a
  // weight or data gradient needs to be K-major). out.data and out.scale must have the shapes
  // above. An all-zero x gives zero data and finite scales.
  virtual void quantize_fp8(const Tensor& x, bool transpose, QuantizedOperand& out) = 0;
  // Both copies of x at once, exactly as quantize_fp8(x, false, straight) and
  // quantize_fp8(x, true, transposed) give them (the data and weight gradients of a linear read
  // the same dy both ways); both take the same format and granularity. A backend may read x once
  // for the two (CUDA does).
  // known_amax (tensor scaling only): x's amax from its producer (an AmaxSink it filled), in
  // place of the amax pass; a backend may ignore it and compute its own (the CPU does: it gives
  // the same scales).
  virtual void quantize_fp8_pair(const Tensor& x, QuantizedOperand& straight, QuantizedOperand& transposed,
                                 const Tensor* known_amax = nullptr) {
    (void)known_amax;
    quantize_fp8(x, false, straight);
    quantize_fp8(x, true, transposed);
  }
  // quantize_fp8_pair of each job (the dense weights' forms after an optimizer step), exactly. A
  // backend may batch same-shaped matrices into a few launches (CUDA does, for tensor scaling).
  virtual void quantize_fp8_pairs(const std::vector<Fp8PairJob>& jobs) {
    for (const Fp8PairJob& j : jobs) quantize_fp8_pair(*j.x, *j.straight, *j.transposed, j.known_amax);
  }
  // C[M, N] = alpha * deq(A) deq(B)^T + beta * C with A.data [M, K], B.data [N, K] (the TN
  // product), accumulated in f32; C bf16 or f32. Supported granularity pairs: (tensor, tensor),
  // (row, row), and the block pairs (1x128, 128x128), (128x128, 1x128), (1x128, 1x128); at most
  // one operand may be e5m2. fast_accum allows the tensor cores' faster, less precise
  // accumulation (the forward pass uses it, as FP8 recipes usually do); the CPU ignores it.
  virtual void matmul_fp8(const QuantizedOperand& A, const QuantizedOperand& B, Tensor& C, float alpha = 1.0f,
                          float beta = 0.0f, bool fast_accum = false) = 0;
  // The experts' GEMMs in FP8 (fp8.layers = experts | all): grouped_matmul (alpha 1, beta 0) and
  // grouped_matmul_wgrad (accumulating, beta 1) with both operands quantized expert by expert,
  // since expert boundaries are known only on the device. a_gran scales the token-side operand
  // (A, dY; in the weight gradient both operands, whose 1x128 tiles then run along each expert's
  // own tokens), w_gran the expert weights; "tensor" means one scale per expert. a_format is the
  // token-side operand's format (e4m3 forward, the gradient format backward); weights are e4m3.
  virtual void grouped_matmul_fp8(const Tensor& A, DType a_format, Fp8Granularity a_gran, const Tensor& W,
                                  bool trans_w, Fp8Granularity w_gran, Tensor& C, const Tensor& offsets) = 0;
  virtual void grouped_matmul_wgrad_fp8(const Tensor& dY, DType dy_format, const Tensor& X, Fp8Granularity gran,
                                        Tensor& dW, const Tensor& offsets) = 0;
  // Expert weights W [E, N, K] (bf16 or f32) quantized expert by expert into out (shaped for W,
  // or for W^T per expert when transpose): exactly what grouped_matmul_fp8 makes of W inside.
  // The model keeps both forms and refreshes them when the weights change, so a step quantizes
  // its weights once, not in every forward and backward.
  virtual void quantize_experts_fp8(const Tensor& W, bool transpose, QuantizedExperts& out) {
    for (int64_t e = 0; e < W.dim(0); ++e) {
      QuantizedOperand q = out.expert(e);
      quantize_fp8(W.index(e), transpose, q);
    }
  }
  // Both forms of a stack, exactly as quantize_experts_fp8 without and with transpose give them
  // (one granularity). A backend may read W once and share one amax pass (CUDA does, for tensor
  // and row scaling). amax (tensor scaling only): each expert's amax of W (f32 [E]) from W's
  // producer, in place of the amax pass; it must be exact. Backends may ignore it (the CPU does).
  virtual void quantize_experts_fp8_pair(const Tensor& W, QuantizedExperts& straight, QuantizedExperts& transposed,
                                         const Tensor* /*amax*/ = nullptr) {
    quantize_experts_fp8(W, false, straight);
    quantize_experts_fp8(W, true, transposed);
  }
  // grouped_matmul_fp8 with the weights already quantized: the rows of expert e of C are
  // deq(A_e) deq(W.expert(e))^T, A quantized as above.
  virtual void grouped_matmul_fp8(const Tensor& A, DType a_format, Fp8Granularity a_gran, const QuantizedExperts& W,
                                  Tensor& C, const Tensor& offsets) = 0;
  // Room for a saved expert operand of up to `rows` rows of `cols` (token-side granularity g).
  virtual SavedExpertOperand alloc_saved_expert_operand(int64_t rows, int64_t cols, int /*experts*/, Fp8Granularity g) {
    SavedExpertOperand s;
    s.data = alloc({rows, cols}, act_dtype());
    s.granularity = g;
    return s;
  }
  // The forward of an expert GEMM (grouped_matmul_fp8 with A e4m3 and W the forward's form of the
  // weights) that also keeps A for the weight gradient in `save`.
  // a_amax: A's per-expert amax from its producer (an AmaxSink per expert it filled), used with tensor scaling in place
  // of an amax pass; it must be exact. Backends may ignore it (the CPU does).
  // fold: ReLU² folded in (ExpertRelu2Fold); this default runs the unfolded ops.
  virtual void grouped_matmul_fp8_saving(const Tensor& A, Fp8Granularity a_gran, const QuantizedExperts& W, Tensor& C,
                                         const Tensor& offsets, SavedExpertOperand& save,
                                         const Tensor* /*a_amax*/ = nullptr, const ExpertRelu2Fold& fold = {}) {
    Tensor operand = A;
    if (fold.relu2_operand) {
      operand = alloc(A.shape, A.dtype);
      relu2_fwd(A, operand);
    }
    grouped_matmul_fp8(operand, DType::e4m3, a_gran, W, C, offsets);
    Tensor kept = save.data.prefix(A.shape);
    copy(operand, kept);
    if (fold.relu2_amax) {
      Tensor relu2_of_c = alloc(C.shape, C.dtype);
      const AmaxSink amax{*fold.relu2_amax, offsets};
      relu2_fwd(C, relu2_of_c, &amax);
    }
  }
  // The backward of that GEMM in FP8, Wt the data gradient's form of the weights (W_e^T per
  // expert) and X the operand its forward saved: dX = grouped_matmul_fp8(dY, ..., Wt, ...) and
  // dW += grouped_matmul_wgrad_fp8(dY, ..., X, ...), exactly as those two calls give them. A
  // backend may quantize dY once for both products (CUDA does).
  // dy_amax: dY's per-expert amax from its producer, as a_amax above; fold as above.
  virtual void grouped_matmul_backward_fp8(const Tensor& dY, DType dy_format, Fp8Granularity a_gran,
                                           const QuantizedExperts& Wt, const SavedExpertOperand& X, Tensor& dX,
                                           Tensor& dW, const Tensor& offsets, const Tensor* /*dy_amax*/ = nullptr,
                                           const ExpertRelu2Fold& fold = {}) {
    grouped_matmul_fp8(dY, dy_format, a_gran, Wt, dX, offsets);
    grouped_matmul_wgrad_fp8(dY, dy_format, X.data.prefix({dY.rows(), X.data.cols()}), a_gran, dW, offsets);
    if (fold.relu2_input) {
      const AmaxSink amax{fold.dx_amax ? *fold.dx_amax : Tensor{}, offsets};
      relu2_bwd(*fold.relu2_input, dX, dX, fold.dx_amax ? &amax : nullptr);
    }
  }
};

}  // namespace moelab
