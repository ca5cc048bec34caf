// The FP8 operand types the backend's FP8 family reads and writes, and the amax sink through
// which other families' ops record the amax of an FP8 operand they produce.
#pragma once
#include <string>

#include "core/error.hpp"
#include "core/fp8_format.hpp"
#include "core/tensor.hpp"

namespace moelab {

struct QuantizedOperand {
  Tensor data;   // [rows, K], e4m3 or e5m2
  Tensor scale;  // f32, fp8_scale_shape(granularity, rows, K)
  Fp8Granularity granularity = Fp8Granularity::tensor;
};

// One matrix's two FP8 copies to make (Backend::quantize_fp8_pairs).
struct Fp8PairJob {
  const Tensor* x = nullptr;
  QuantizedOperand* straight = nullptr;
  QuantizedOperand* transposed = nullptr;
  const Tensor* known_amax = nullptr;  // as quantize_fp8_pair's
};

// An expert GEMM's token-side operand kept from the forward for the weight gradient, in the form
// the backend's grouped_matmul_backward_fp8 reads it (alloc_saved_expert_operand makes one): on
// CUDA the FP8 codes of its transposed, padded expert segments with their scales, written by the
// forward from the same read of the operand; on the CPU a plain copy, quantized in the backward
// exactly as grouped_matmul_wgrad_fp8 quantizes it.
struct SavedExpertOperand {
  Tensor data, scale;
  Fp8Granularity granularity = Fp8Granularity::tensor;
};

// The expert MLP's ReLU² folded into its GEMMs, so that no relu2_fwd or relu2_bwd pass runs over
// the experts' hidden rows (h the up projection's output, a = relu²(h) the down projection's
// operand). Each field gives exactly the values the unfolded ops give:
//   forward of the up projection (C = h): relu2_amax (FP8) raises each expert's amax of
//     relu²(C), as relu2_fwd(C, a, amax) would (C's rows in expert order; zeroed by the caller);
//     relu2_output (BF16) also stores relu²(C) there, as relu2_fwd(C, a) writes it;
//   forward of the down projection (FP8): relu2_operand makes A the hidden pre-activation h and
//     the operand relu²(h), rounded as relu2_fwd writes it (what the saved operand keeps, too);
//   backward of the down projection: relu2_input (h) makes dX relu2_bwd(h, dX), dX rounded to
//     its dtype first, so dX holds dh; dx_amax (FP8) then raises each expert's amax of that dh.
struct ExpertRelu2Fold {
  const Tensor* relu2_amax = nullptr;
  Tensor* relu2_output = nullptr;
  bool relu2_operand = false;
  const Tensor* relu2_input = nullptr;
  const Tensor* dx_amax = nullptr;
};

// grouped_matmul_relu2's arguments: one BF16 fold field, no FP8 ones; relu2_output and relu2_input
// shaped like C.
inline void check_bf16_relu2_fold(const ExpertRelu2Fold& f, const Tensor& C) {
  const char* op = "grouped_matmul_relu2";
  if (f.relu2_amax || f.relu2_operand || f.dx_amax)
    throw Error(std::string(op) + ": relu2_amax, relu2_operand and dx_amax fold into the FP8 expert GEMMs only");
  if (!f.relu2_output == !f.relu2_input)
    throw Error(std::string(op) + ": give exactly one of relu2_output (forward) and relu2_input (data gradient)");
  const Tensor* t = f.relu2_output ? f.relu2_output : f.relu2_input;
  if (t->shape != C.shape || t->dtype != C.dtype)
    throw Error(std::string(op) + ": " + (f.relu2_output ? "relu2_output " : "relu2_input ") + t->describe() +
                " must match C " + C.describe());
}

// A stack of expert weights in FP8 as a grouped GEMM reads them: one K-major B operand per
// expert, e4m3, each with its own scales. data [E, N, K] holds expert e's [N, K] codes at
// data.index(e); scale [E, n] holds its fp8_scale_shape(granularity, N, K) scales, flattened.
// From W [E, N, K]: the forward's form (quantize_experts_fp8 without transpose) and the data
// gradient's (with transpose: each expert's W_e^T [K, N]).
struct QuantizedExperts {
  Tensor data;   // [E, N, K], e4m3
  Tensor scale;  // [E, n], f32
  Fp8Granularity granularity = Fp8Granularity::tensor;

  int64_t experts() const { return data.dim(0); }
  // Expert e's operand: views into data and scale.
  QuantizedOperand expert(int64_t e) const {
    QuantizedOperand q;
    q.granularity = granularity;
    q.data = data.index(e);
    q.scale = scale.index(e).view(fp8_scale_shape(granularity, data.dim(1), data.dim(2)));
    return q;
  }
};

// Where an op that writes an FP8 GEMM's operand records that operand's absolute maximum, so
// that tensor scaling (Fp8Recipe::producer_amax) quantizes it without an amax pass of its own.
// Every producer takes one optional `const AmaxSink*` (null: record nothing). amax (f32) holds
// one maximum per group, raised to the largest |value| the op wrote, as stored (after rounding
// to the output's dtype); raised, never lowered: the caller zeroes it first. The groups:
// - offsets empty: the output's elements as amax.numel() equal consecutive parts: one for a
//   whole tensor (a norm's or the loss's output), one per matrix of a stack (the optimizer);
// - offsets (i32 [E + 1], on the device): rows in expert order, group e the rows
//   [offsets[e], offsets[e+1]) (the permute, ReLU² of the experts' rows, the combine's backward).
// Each op says which form it takes and refuses the other.
struct AmaxSink {
  Tensor amax;
  Tensor offsets;

  bool per_expert() const { return offsets.data != nullptr; }
};

}  // namespace moelab
