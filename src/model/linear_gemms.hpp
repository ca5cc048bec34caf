// The model's linear layers as GEMMs, in the run's precision: plain matmuls (f32 on the CPU,
// bf16 on CUDA), or, for the linears the [fp8] recipe names, FP8 GEMMs whose operands are
// quantized just before each product (activations, weights and gradients alike, with the
// recipe's scaling). The model says which linear it multiplies; this class turns the recipe
// into quantize_fp8 + matmul_fp8 calls, so GptMoE has one code path for every precision.
//
// Per GEMM of a linear W [out, in] over T tokens (all operands K-major, as FP8 tensor cores need):
//   forward  y  = x W^T    A = x [T, in]          B = W [out, in]
//   dgrad    dx = dy W     A = dy [T, out]        B = W^T [in, out]   (transposed copy)
//   wgrad    dW += dy^T x  A = dy^T [out, T]      B = x^T [in, T]     (transposed copies)
// The backward quantizes dy once into its two copies (dy for dgrad, dy^T for wgrad).
// Weights are not quantized per product: every FP8 weight is declared (add_weight) and keeps
// its two forms, W and W^T (an expert stack: each expert's), remade by refresh_weights() when
// the weights change, so a step quantizes each weight once however many micro-batches it runs.
// Activation and gradient copies live in one buffer per role (see Slot), planned up front.
// Formats and scaling are the recipe's (Fp8Recipe): x and W in its forward format, dy in its
// gradient format; token-side operands at its token granularity, weights at its weight
// granularity (blockwise: both wgrad operands are 1x128 tiles along the tokens). Under its amax
// policy (producer_amax) the operands' producers' amax replaces the amax passes.
#pragma once
#include <cstdint>
#include <vector>

#include "backend/backend.hpp"
#include "core/fp8_recipe.hpp"
#include "model/params.hpp"

namespace moelab {

class LinearGemms {
 public:
  LinearGemms(Backend& backend, const Fp8Recipe& recipe);

  bool fp8_enabled() const { return fp8_; }
  // Call for every linear that may run in FP8 (tokens rows through W [out, in]) before
  // allocate(), so the quantization buffers are planned once and a step allocates nothing.
  void plan(int64_t tokens, int64_t out, int64_t in);
  // Declares a weight the FP8 products multiply: W [out, in], or an expert stack [E, out, in]
  // (the tensor the model passes, its compute copy). Before allocate(); no-op without FP8.
  // origin: W's Param, whose value_amax (once raised by the optimizer) a refresh under tensor
  // scaling takes in place of an amax pass (when W is origin's value, not a copy of it).
  void add_weight(const Tensor& W, Param* origin = nullptr);
  void allocate();
  // Quantizes every declared weight into its forms, as it is now. Call after allocate() and
  // whenever the weights change (the model does, with its compute copies); the products read
  // the forms as last refreshed.
  void refresh_weights();

  // Reuse hint: the caller promises that x is the same tensor, unchanged, as in the previous
  // call of the same kind (q, k and v read one xn), so its FP8 copy is reused instead of
  // quantized again. A hint whose tensor is not the one last quantized into that buffer (other
  // memory, shape or format) is ignored.
  enum Reuse : unsigned { none = 0, same_x = 1 };

  // An input's x^T copy (the weight gradient's B) made by the forward from the same read of x as
  // its straight copy, and kept for the backward: it then needs neither an amax pass nor a second
  // read of x. From saved_input(); empty (and ignored) without FP8.
  struct SavedInput {
    QuantizedOperand xt;
    const void* src = nullptr;  // the x it holds, checked by the backward
    Shape src_shape;
  };
  SavedInput saved_input(int64_t tokens, int64_t in);

  // y = x W^T + beta y. With save (FP8), x^T is quantized into it as well. x_amax / dy_amax
  // below: the operand's amax from its producer (f32 [1], see backend.hpp), which tensor scaling
  // then uses instead of an amax pass (with save, and in the backward); the other recipes ignore it.
  void forward(bool fp8, const Tensor& x, const Tensor& W, Tensor& y, float beta = 0.0f, unsigned reuse = none,
               SavedInput* save = nullptr, const Tensor* x_amax = nullptr);
  // The backward of y = x W^T: dx = dy W + beta dx and dW += dy^T x. In FP8, dy is quantized
  // once into both copies the two products read (quantize_fp8_pair); x^T comes from `saved` (the
  // forward's) when given, else same_x reuses the last x^T, else x is quantized.
  void backward(bool fp8, const Tensor& dy, const Tensor& W, const Tensor& x, Tensor& dx, Tensor& dW, float beta = 0.0f,
                unsigned reuse = none, const SavedInput* saved = nullptr, const Tensor* dy_amax = nullptr);

  // The experts' GEMMs over permuted rows grouped by offsets (W [E, N, K]), in FP8 by the same
  // recipe with one set of scales per expert (the backend quantizes expert by expert):
  // y = x W_e^T; backward: dx = dy W_e and dW_e += dy_e^T x_e. In FP8 the forward keeps x for
  // the weight gradient in `saved` (from saved_expert_operand) and the backward reads it from
  // there, so x itself need not outlive the forward; otherwise the backward reads x.
  SavedExpertOperand saved_expert_operand(int64_t rows, int64_t cols, int experts);
  // x_amax / dy_amax: the operand's per-expert amax from its producer (an AmaxSink it filled), which tensor
  // scaling then uses instead of an amax pass; ignored by the other recipes.
  // fold: the expert MLP's ReLU² folded into the GEMMs (ExpertRelu2Fold: its FP8 fields in FP8,
  // relu2_output in BF16; relu2_input in both).
  void expert_forward(bool fp8, const Tensor& x, const Tensor& W, Tensor& y, const Tensor& offsets,
                      SavedExpertOperand& saved, const Tensor* x_amax = nullptr, const ExpertRelu2Fold& fold = {});
  void expert_backward(bool fp8, const Tensor& dy, const Tensor& W, const Tensor& x, const SavedExpertOperand& saved,
                       Tensor& dx, Tensor& dW, const Tensor& offsets, const Tensor* dy_amax = nullptr,
                       const ExpertRelu2Fold& fold = {});

 private:
  // One quantization buffer per operand role, so an operand that several GEMMs share stays valid
  // while the others are quantized (xn across q, k and v and their backward).
  struct Slot {
    Tensor data, scale;  // flat buffers; each use takes a prefix view
    int64_t data_elems = 0, scale_elems = 0;
    void need(int64_t rows, int64_t k, Fp8Granularity g);
    // What the buffer holds now, for reuse hints.
    const void* src = nullptr;
    Shape src_shape;
    bool src_transposed = false;
    DType src_format = DType::e4m3;
    QuantizedOperand last;
  };
  // A declared weight and its forms: dense (w, wt) or an expert stack (ew, ewt).
  struct WeightForms {
    Tensor source;
    Param* origin = nullptr;  // its Param when the optimizer may raise the source's amax
    bool experts = false;
    QuantizedOperand w, wt;    // forward B = W [out, in]; dgrad B = W^T [in, out]
    QuantizedExperts ew, ewt;  // per expert: W_e [out, in]; W_e^T [in, out]
  };
  // The forms of W; a weight that was not declared is refused, naming the fix.
  const WeightForms& forms_of(const Tensor& W) const;
  QuantizedOperand quantize(Slot& slot, const Tensor& x, bool transpose, DType format, Fp8Granularity g, bool reuse);
  // The slot's buffers as the operand for x (or x^T), and what a reuse hint later compares against.
  QuantizedOperand operand(Slot& slot, const Tensor& x, bool transpose, DType format, Fp8Granularity g) const;
  static void remember(Slot& slot, const Tensor& x, bool transpose, DType format, const QuantizedOperand& q);

  Backend& be_;
  Fp8Recipe recipe_;
  bool fp8_ = false;             // the recipe puts some linear in FP8
  Fp8Granularity act_, weight_;  // the recipe's token-side and weight granularities
  DType grad_format_;
  Slot a_;   // A operands: x (forward), dy (dgrad)
  Slot at_;  // wgrad A: dy^T
  Slot xt_;  // wgrad B: x^T
  std::vector<WeightForms> weights_;
};

}  // namespace moelab
