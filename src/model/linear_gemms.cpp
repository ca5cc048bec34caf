// LinearGemms: the recipe -> quantize_fp8 + matmul_fp8 mapping (see linear_gemms.hpp).
#include "model/linear_gemms.hpp"

#include <algorithm>

#include "core/error.hpp"

namespace moelab {

LinearGemms::LinearGemms(Backend& backend, const Fp8Recipe& recipe)
    : be_(backend),
      recipe_(recipe),
      fp8_(recipe.enabled()),
      act_(recipe.tokens()),
      weight_(recipe.weights()),
      grad_format_(recipe.grad_format) {}

void LinearGemms::Slot::need(int64_t rows, int64_t k, Fp8Granularity g) {
  data_elems = std::max(data_elems, rows * k);
  int64_t s = 1;
  for (int64_t d : fp8_scale_shape(g, rows, k)) s *= d;
  scale_elems = std::max(scale_elems, s);
}

void LinearGemms::plan(int64_t tokens, int64_t out, int64_t in) {
  if (!fp8_) return;
  a_.need(tokens, in, act_);    // forward: x
  a_.need(tokens, out, act_);   // dgrad: dy
  at_.need(out, tokens, act_);  // wgrad: dy^T
  xt_.need(in, tokens, act_);   // wgrad: x^T
}

void LinearGemms::add_weight(const Tensor& W, Param* origin) {
  if (!fp8_) return;
  MOELAB_CHECK(W.ndim() == 2 || W.ndim() == 3, "LinearGemms::add_weight: W must be [out, in] or [E, out, in]");
  WeightForms f;
  f.source = W;
  // The optimizer's amax is the master's: it serves forms quantized from the master itself.
  f.origin = recipe_.producer_amax() && origin && origin->value.data == W.data ? origin : nullptr;
  f.experts = W.ndim() == 3;
  weights_.push_back(f);
}

namespace {

int64_t count_of(const Shape& s) {
  int64_t n = 1;
  for (int64_t d : s) n *= d;
  return n;
}

}  // namespace

void LinearGemms::allocate() {
  if (!fp8_) return;
  for (Slot* s : {&a_, &at_, &xt_}) {
    s->data = be_.alloc({std::max<int64_t>(s->data_elems, 1)}, DType::e4m3);
    s->scale = be_.alloc({std::max<int64_t>(s->scale_elems, 1)}, DType::f32);
    be_.fill(s->scale, 1.0f);
  }
  // Scales start at 1: block scaling's padding entries belong to no block and stay so.
  auto operand = [&](int64_t rows, int64_t k) {
    QuantizedOperand q;
    q.granularity = weight_;
    q.data = be_.alloc({rows, k}, DType::e4m3);
    q.scale = be_.alloc(fp8_scale_shape(weight_, rows, k), DType::f32);
    be_.fill(q.scale, 1.0f);
    return q;
  };
  auto stack = [&](int64_t E, int64_t rows, int64_t k) {
    QuantizedExperts q;
    q.granularity = weight_;
    q.data = be_.alloc({E, rows, k}, DType::e4m3);
    q.scale = be_.alloc({E, count_of(fp8_scale_shape(weight_, rows, k))}, DType::f32);
    be_.fill(q.scale, 1.0f);
    return q;
  };
  for (WeightForms& f : weights_) {
    const int64_t out = f.source.dim(-2), in = f.source.dim(-1);
    if (f.experts) {
      f.ew = stack(f.source.dim(0), out, in);
      f.ewt = stack(f.source.dim(0), in, out);
    } else {
      f.w = operand(out, in);
      f.wt = operand(in, out);
    }
  }
}

void LinearGemms::refresh_weights() {
  std::vector<Fp8PairJob> dense;  // one call for all of them: the backend may batch them
  for (WeightForms& f : weights_) {
    // The optimizer's amax of this update, taken once (its owner zeroes it for the next).
    const bool raised = f.origin && f.origin->value_amax_raised;
    const Tensor* amax = raised ? &f.origin->value_amax : nullptr;
    if (f.origin) f.origin->value_amax_raised = false;
    if (f.experts) be_.quantize_experts_fp8_pair(f.source, f.ew, f.ewt, amax);
    else dense.push_back({&f.source, &f.w, &f.wt, amax});
  }
  be_.quantize_fp8_pairs(dense);
}

const LinearGemms::WeightForms& LinearGemms::forms_of(const Tensor& W) const {
  for (const WeightForms& f : weights_)
    if (f.source.data == W.data && f.source.shape == W.shape && f.source.dtype == W.dtype) {
      MOELAB_CHECK((f.experts ? f.ew.data.data : f.w.data.data) != nullptr,
                   "LinearGemms: weights were declared but allocate() was not called");
      return f;
    }
  throw Error("LinearGemms: the FP8 product's weight " + W.describe() +
              " was not declared; call add_weight() for every weight an FP8 linear multiplies before allocate()");
}

QuantizedOperand LinearGemms::operand(Slot& slot, const Tensor& x, bool transpose, DType format, Fp8Granularity g) const {
  const int64_t xr = x.numel() / std::max<int64_t>(x.cols(), 1), xc = x.cols();
  const int64_t rows = transpose ? xc : xr, k = transpose ? xr : xc;
  const Shape sshape = fp8_scale_shape(g, rows, k);
  int64_t sn = 1;
  for (int64_t d : sshape) sn *= d;
  if (rows * k > slot.data_elems || sn > slot.scale_elems)
    throw Error("LinearGemms: FP8 operand [" + std::to_string(rows) + ", " + std::to_string(k) +
                "] was not planned; call plan() for every FP8 linear before allocate()");
  QuantizedOperand q;
  q.granularity = g;
  q.data = slot.data.prefix({rows, k});
  q.data.dtype = format;  // e4m3 and e5m2 share the byte buffer
  q.scale = slot.scale.prefix(sshape);
  return q;
}

void LinearGemms::remember(Slot& slot, const Tensor& x, bool transpose, DType format, const QuantizedOperand& q) {
  slot.src = x.data;
  slot.src_shape = x.shape;
  slot.src_transposed = transpose;
  slot.src_format = format;
  slot.last = q;
}

QuantizedOperand LinearGemms::quantize(Slot& slot, const Tensor& x, bool transpose, DType format, Fp8Granularity g,
                                       bool reuse) {
  if (reuse && slot.src == x.data && slot.src_shape == x.shape && slot.src_transposed == transpose &&
      slot.src_format == format && slot.last.granularity == g)
    return slot.last;
  QuantizedOperand q = operand(slot, x, transpose, format, g);
  be_.quantize_fp8(x, transpose, q);
  remember(slot, x, transpose, format, q);
  return q;
}

LinearGemms::SavedInput LinearGemms::saved_input(int64_t tokens, int64_t in) {
  SavedInput s;
  if (!fp8_) return s;
  s.xt.granularity = act_;
  s.xt.data = be_.alloc({in, tokens}, DType::e4m3);
  s.xt.scale = be_.alloc(fp8_scale_shape(act_, in, tokens), DType::f32);
  be_.fill(s.xt.scale, 1.0f);
  return s;
}

void LinearGemms::forward(bool fp8, const Tensor& x, const Tensor& W, Tensor& y, float beta, unsigned reuse,
                          SavedInput* save, const Tensor* x_amax) {
  if (!(fp8 && fp8_)) {
    be_.matmul(x, false, W, true, y, 1.0f, beta);
    return;
  }
  QuantizedOperand a;
  if (save) {
    const int64_t rows = x.numel() / std::max<int64_t>(x.cols(), 1);
    MOELAB_CHECK(save->xt.data.dim(0) == x.cols() && save->xt.data.dim(1) >= rows,
                 "LinearGemms::forward: the saved input cannot hold x^T of " + x.describe());
    a = operand(a_, x, false, DType::e4m3, act_);
    QuantizedOperand xt = save->xt;
    xt.data = save->xt.data.prefix({x.cols(), rows});
    xt.scale = save->xt.scale.prefix(fp8_scale_shape(act_, x.cols(), rows));
    be_.quantize_fp8_pair(x, a, xt, recipe_.producer_amax() ? x_amax : nullptr);
    remember(a_, x, false, DType::e4m3, a);
    save->src = x.data;
    save->src_shape = x.shape;
  } else {
    a = quantize(a_, x, false, DType::e4m3, act_, reuse & same_x);
  }
  be_.matmul_fp8(a, forms_of(W).w, y, 1.0f, beta, /*fast_accum=*/true);
}

void LinearGemms::backward(bool fp8, const Tensor& dy, const Tensor& W, const Tensor& x, Tensor& dx, Tensor& dW,
                           float beta, unsigned reuse, const SavedInput* saved, const Tensor* dy_amax) {
  if (!(fp8 && fp8_)) {
    be_.matmul(dy, false, W, false, dx, 1.0f, beta);
    be_.matmul(dy, true, x, false, dW, 1.0f, 1.0f);
    return;
  }
  QuantizedOperand g = operand(a_, dy, false, grad_format_, act_);
  QuantizedOperand gt = operand(at_, dy, true, grad_format_, act_);
  be_.quantize_fp8_pair(dy, g, gt, recipe_.producer_amax() ? dy_amax : nullptr);
  remember(a_, dy, false, grad_format_, g);
  remember(at_, dy, true, grad_format_, gt);
  be_.matmul_fp8(g, forms_of(W).wt, dx, 1.0f, beta);
  QuantizedOperand xt;
  if (saved) {
    MOELAB_CHECK(saved->src == x.data && saved->src_shape == x.shape,
                 "LinearGemms::backward: the saved input holds another tensor than x " + x.describe());
    const int64_t rows = x.numel() / std::max<int64_t>(x.cols(), 1);
    xt = saved->xt;
    xt.data = saved->xt.data.prefix({x.cols(), rows});
    xt.scale = saved->xt.scale.prefix(fp8_scale_shape(act_, x.cols(), rows));
  } else {
    xt = quantize(xt_, x, true, DType::e4m3, act_, reuse & same_x);
  }
  be_.matmul_fp8(gt, xt, dW, 1.0f, 1.0f);
}

SavedExpertOperand LinearGemms::saved_expert_operand(int64_t rows, int64_t cols, int experts) {
  if (!fp8_) return {};
  return be_.alloc_saved_expert_operand(rows, cols, experts, act_);
}

void LinearGemms::expert_forward(bool fp8, const Tensor& x, const Tensor& W, Tensor& y, const Tensor& offsets,
                                 SavedExpertOperand& saved, const Tensor* x_amax, const ExpertRelu2Fold& fold) {
  if (!(fp8 && fp8_)) {
    MOELAB_CHECK(!fold.relu2_amax && !fold.relu2_operand, "expert_forward: relu2_amax and relu2_operand fold into "
                                                          "the FP8 expert GEMMs only (BF16 takes relu2_output)");
    if (fold.relu2_output) return be_.grouped_matmul_relu2(x, W, true, y, offsets, fold);
    return be_.grouped_matmul(x, W, true, y, offsets);
  }
  MOELAB_CHECK(!fold.relu2_output, "expert_forward: relu2_output folds into the BF16 expert GEMMs only (FP8 "
                                   "takes relu2_amax and relu2_operand)");
  be_.grouped_matmul_fp8_saving(x, act_, forms_of(W).ew, y, offsets, saved,
                                recipe_.producer_amax() ? x_amax : nullptr, fold);
}

void LinearGemms::expert_backward(bool fp8, const Tensor& dy, const Tensor& W, const Tensor& x,
                                  const SavedExpertOperand& saved, Tensor& dx, Tensor& dW, const Tensor& offsets,
                                  const Tensor* dy_amax, const ExpertRelu2Fold& fold) {
  if (!(fp8 && fp8_)) {
    MOELAB_CHECK(!fold.dx_amax, "expert_backward: dx_amax folds into the FP8 expert GEMMs only");
    if (fold.relu2_input) be_.grouped_matmul_relu2(dy, W, false, dx, offsets, fold);  // dx holds dh
    else be_.grouped_matmul(dy, W, false, dx, offsets);
    be_.grouped_matmul_wgrad(dy, x, dW, offsets, 1.0f);
    return;
  }
  be_.grouped_matmul_backward_fp8(dy, grad_format_, act_, forms_of(W).ewt, saved, dx, dW, offsets,
                                  recipe_.producer_amax() ? dy_amax : nullptr, fold);
}

}  // namespace moelab
