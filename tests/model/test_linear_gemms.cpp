// LinearGemms, the recipe -> GEMM mapping of the model: without precision = fp8 it is exactly the
// plain matmuls; with it each product (forward, data gradient, weight gradient) is the FP8 one,
// within the formats' rounding of the f32 product but not equal to it; reuse hints give the bits
// of a fresh quantization, and a hint naming another tensor is ignored rather than trusted.
#include <gtest/gtest.h>

#include <cmath>

#include "backend/cpu/cpu_backend.hpp"
#include "core/rng.hpp"
#include "config/config.hpp"
#include "model/linear_gemms.hpp"

namespace moelab {
namespace {

std::vector<float> host(const Tensor& t) { return std::vector<float>(t.as<float>(), t.as<float>() + t.numel()); }

double nerr(const std::vector<float>& a, const std::vector<float>& b) {
  double num = 0, den = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    if (!std::isfinite(a[i])) return INFINITY;
    num += (double(a[i]) - b[i]) * (double(a[i]) - b[i]);
    den += double(b[i]) * b[i];
  }
  return std::sqrt(num / den);
}

struct Fixture {
  CpuBackend be{DType::f32, 2};
  Rng rng{17};
  Tensor random(const Shape& s, double scale) {
    Tensor t = be.alloc(s, DType::f32);
    for (int64_t i = 0; i < t.numel(); ++i) t.as<float>()[i] = float(rng.normal() * scale);
    return t;
  }
};

// precision = fp8 with a recipe, and the scaling it gives activations and weights.
struct RecipeCase {
  Config config;
  Fp8Granularity act, weight;
};
RecipeCase recipe_case(const std::string& recipe) {
  RecipeCase r;
  r.config.precision = "fp8";
  r.config.fp8.recipe = recipe;
  r.act = recipe == "rowwise" ? Fp8Granularity::row : recipe == "blockwise" ? Fp8Granularity::block_1x128
                                                                             : Fp8Granularity::tensor;
  r.weight = recipe == "blockwise" ? Fp8Granularity::block_128x128 : r.act;
  return r;
}

TEST(LinearGemms, PlainPrecisionIsExactlyMatmul) {
  Fixture f;
  Config c;  // precision = auto
  LinearGemms lin(f.be, fp8_recipe(c));
  lin.plan(32, 48, 64);
  lin.allocate();
  Tensor x = f.random({32, 64}, 1.0), w = f.random({48, 64}, 0.1);
  Tensor y = f.be.alloc({32, 48}, DType::f32), ref = f.be.alloc({32, 48}, DType::f32);
  lin.forward(true, x, w, y);
  f.be.matmul(x, false, w, true, ref);
  EXPECT_EQ(host(y), host(ref));
}

TEST(LinearGemms, Fp8ProductsAreQuantizedAndReuseIsSafe) {
  for (std::string recipe : {"tensorwise", "rowwise", "blockwise"}) {
    SCOPED_TRACE(recipe);
    Fixture f;
    Config c;
    c.precision = "fp8";
    c.fp8.recipe = recipe;
    LinearGemms lin(f.be, fp8_recipe(c));
    const int64_t T = 160, out = 48, in = 200;
    Tensor x = f.random({T, in}, 1.0), x2 = f.random({T, in}, 2.0), w = f.random({out, in}, 0.1);
    lin.plan(T, out, in);
    lin.add_weight(w);
    lin.allocate();
    lin.refresh_weights();
    Tensor dy = f.random({T, out}, 0.01);
    Tensor y = f.be.alloc({T, out}, DType::f32), ref = f.be.alloc({T, out}, DType::f32);
    // Forward: FP8 differs from f32 by the e4m3 rounding, no more.
    lin.forward(true, x, w, y);
    f.be.matmul(x, false, w, true, ref);
    const std::vector<float> y1 = host(y);
    EXPECT_GT(nerr(y1, host(ref)), 1e-3);
    EXPECT_LT(nerr(y1, host(ref)), 0.05);
    // FP8 off for this linear: the plain product.
    lin.forward(false, x, w, y);
    EXPECT_EQ(host(y), host(ref));
    // A truthful hint reuses the copy: same bits.
    lin.forward(true, x, w, y);
    lin.forward(true, x, w, y, 0.0f, LinearGemms::same_x);
    EXPECT_EQ(host(y), y1);
    // A hint naming another tensor is ignored: x2's product, not x's.
    lin.forward(true, x2, w, y, 0.0f, LinearGemms::same_x);
    const std::vector<float> hinted = host(y);
    lin.forward(true, x2, w, y);
    EXPECT_EQ(hinted, host(y));
    f.be.matmul(x2, false, w, true, ref);
    EXPECT_LT(nerr(hinted, host(ref)), 0.05);
    // Backward: the data gradient (e5m2 dy, transposed W) and the weight gradient (accumulating,
    // transposed dy and x) from one quantization of dy.
    Tensor dx = f.be.alloc({T, in}, DType::f32), dxr = f.be.alloc({T, in}, DType::f32);
    Tensor dw = f.be.alloc({out, in}, DType::f32), dwr = f.be.alloc({out, in}, DType::f32);
    f.be.fill(dw, 0.5f);
    f.be.fill(dwr, 0.5f);
    lin.backward(true, dy, w, x, dx, dw);
    f.be.matmul(dy, false, w, false, dxr);
    EXPECT_GT(nerr(host(dx), host(dxr)), 1e-3);
    EXPECT_LT(nerr(host(dx), host(dxr)), 0.08);
    f.be.matmul(dy, true, x, false, dwr, 1.0f, 1.0f);
    // Compare the accumulated parts (dW - 0.5).
    std::vector<float> a = host(dw), b = host(dwr);
    for (auto& v : a) v -= 0.5f;
    for (auto& v : b) v -= 0.5f;
    EXPECT_GT(nerr(a, b), 1e-3);
    EXPECT_LT(nerr(a, b), 0.08);
    // beta = 1 adds the data gradient into dx; a true same_x hint reuses x^T: the same bits again.
    const std::vector<float> dx1 = host(dx), dw1 = a;
    f.be.fill(dw, 0.5f);
    lin.backward(true, dy, w, x, dx, dw, 1.0f, LinearGemms::same_x);
    std::vector<float> dx2 = host(dx), dw2 = host(dw);
    for (size_t i = 0; i < dx2.size(); ++i) EXPECT_EQ(dx2[i], 2.0f * dx1[i]) << i;
    for (auto& v : dw2) v -= 0.5f;
    EXPECT_EQ(dw2, dw1);
  }
}

TEST(LinearGemms, UnplannedShapesAreRefused) {
  Fixture f;
  Config c;
  c.precision = "fp8";
  LinearGemms lin(f.be, fp8_recipe(c));
  Tensor x = f.random({64, 32}, 1.0), w = f.random({32, 32}, 0.1), y = f.be.alloc({64, 32}, DType::f32);
  lin.plan(16, 32, 32);
  lin.add_weight(w);
  lin.allocate();
  lin.refresh_weights();
  EXPECT_THROW(lin.forward(true, x, w, y), Error);
}

TEST(LinearGemms, Fp8WeightsAreTheirFormsAsLastRefreshed) {
  // A step quantizes each weight once (refresh_weights): the products read those forms, which
  // are exactly quantize_fp8 of W and of W^T, and follow the weights only when refreshed.
  for (std::string recipe : {"tensorwise", "rowwise", "blockwise"}) {
    SCOPED_TRACE(recipe);
    Fixture f;
    const RecipeCase r = recipe_case(recipe);
    const Fp8Granularity act = r.act, wg = r.weight;
    LinearGemms lin(f.be, fp8_recipe(r.config));
    const int64_t T = 96, out = 144, in = 160;
    Tensor x = f.random({T, in}, 1.0), w = f.random({out, in}, 0.1), dy = f.random({T, out}, 0.01);
    Tensor other = f.random({out, in}, 0.1);
    lin.plan(T, out, in);
    lin.add_weight(w);
    lin.allocate();
    lin.refresh_weights();
    auto quantized = [&](const Tensor& t, bool transpose, DType fmt, Fp8Granularity g) {
      const int64_t rows = transpose ? t.cols() : t.rows(), k = transpose ? t.rows() : t.cols();
      QuantizedOperand q;
      q.granularity = g;
      q.data = f.be.alloc({rows, k}, fmt);
      q.scale = f.be.alloc(fp8_scale_shape(g, rows, k), DType::f32);
      f.be.fill(q.scale, 1.0f);
      f.be.quantize_fp8(t, transpose, q);
      return q;
    };
    auto by_hand = [&](const Tensor& weights) {
      Tensor y = f.be.alloc({T, out}, DType::f32), dx = f.be.alloc({T, in}, DType::f32);
      f.be.matmul_fp8(quantized(x, false, DType::e4m3, act), quantized(weights, false, DType::e4m3, wg), y);
      f.be.matmul_fp8(quantized(dy, false, DType::e5m2, act), quantized(weights, true, DType::e4m3, wg), dx);
      return std::make_pair(host(y), host(dx));
    };
    auto through_lin = [&] {
      Tensor y = f.be.alloc({T, out}, DType::f32), dx = f.be.alloc({T, in}, DType::f32);
      Tensor dw = f.be.alloc({out, in}, DType::f32);
      f.be.fill(dw, 0.0f);
      lin.forward(true, x, w, y);
      lin.backward(true, dy, w, x, dx, dw);
      return std::make_pair(host(y), host(dx));
    };
    const auto first = through_lin();
    EXPECT_EQ(first, by_hand(w));
    // The weights change (an optimizer step): the products keep the old forms until a refresh.
    f.be.copy(other, w);
    EXPECT_EQ(through_lin(), first);
    lin.refresh_weights();
    const auto second = through_lin();
    EXPECT_EQ(second, by_hand(w));
    EXPECT_NE(second.first, first.first);
    // A weight that was not declared is refused, not quantized on the fly.
    Tensor y = f.be.alloc({T, out}, DType::f32);
    EXPECT_THROW(lin.forward(true, x, other, y), Error);
  }
}

TEST(LinearGemms, TheForwardsSavedInputGivesTheBackwardsBits) {
  // forward(..., save) quantizes x^T with x's read; the backward reading it gives exactly the
  // weight gradient of quantizing x^T there, and refuses a saved input of another tensor.
  for (std::string recipe : {"tensorwise", "rowwise", "blockwise"}) {
    SCOPED_TRACE(recipe);
    Fixture f;
    LinearGemms lin(f.be, fp8_recipe(recipe_case(recipe).config));
    const int64_t T = 144, out = 64, in = 160;
    Tensor x = f.random({T, in}, 1.0), x2 = f.random({T, in}, 1.0), w = f.random({out, in}, 0.1);
    Tensor dy = f.random({T, out}, 0.01);
    lin.plan(T, out, in);
    lin.add_weight(w);
    lin.allocate();
    lin.refresh_weights();
    LinearGemms::SavedInput saved = lin.saved_input(T, in);
    Tensor y1 = f.be.alloc({T, out}, DType::f32), y2 = f.be.alloc({T, out}, DType::f32);
    Tensor dx = f.be.alloc({T, in}, DType::f32), dw1 = f.be.alloc({out, in}, DType::f32);
    Tensor dw2 = f.be.alloc({out, in}, DType::f32);
    f.be.fill(dw1, 0.0f);
    f.be.fill(dw2, 0.0f);
    lin.forward(true, x, w, y1, 0.0f, LinearGemms::none, &saved);
    lin.forward(true, x2, w, y2);  // the buffers move on to another input
    lin.backward(true, dy, w, x, dx, dw1, 0.0f, LinearGemms::none, &saved);
    lin.backward(true, dy, w, x, dx, dw2);
    EXPECT_EQ(host(dw1), host(dw2));
    lin.forward(true, x, w, y2);
    EXPECT_EQ(host(y1), host(y2));
    EXPECT_THROW(lin.backward(true, dy, w, x2, dx, dw1, 0.0f, LinearGemms::none, &saved), Error);
  }
}

// Records which weight forms a refresh quantizes with an amax handed in (Param::value_amax).
class AmaxRecordingBackend : public CpuBackend {
 public:
  AmaxRecordingBackend() : CpuBackend(DType::f32, 2) {}
  std::vector<bool> stack_amax, matrix_amax;
  void quantize_experts_fp8_pair(const Tensor& W, QuantizedExperts& s, QuantizedExperts& t, const Tensor* amax) override {
    stack_amax.push_back(amax != nullptr);
    CpuBackend::quantize_experts_fp8_pair(W, s, t, amax);
  }
  void quantize_fp8_pairs(const std::vector<Fp8PairJob>& jobs) override {
    for (const Fp8PairJob& j : jobs) matrix_amax.push_back(j.known_amax != nullptr);
    CpuBackend::quantize_fp8_pairs(jobs);
  }
};

TEST(LinearGemms, RefreshTakesTheOptimizersAmaxOncePerRaise) {
  // Under tensor scaling a weight declared with its Param takes Param::value_amax in place of an
  // amax pass, only after the optimizer raised it and once per raise (the flag is cleared); a
  // weight that is a copy of its master, and the other recipes, never take it.
  for (std::string recipe : {"tensorwise", "rowwise"}) {
    SCOPED_TRACE(recipe);
    AmaxRecordingBackend be;
    Rng rng(5);
    auto random = [&](const Shape& shape) {
      Tensor t = be.alloc(shape, DType::f32);
      for (int64_t i = 0; i < t.numel(); ++i) t.as<float>()[i] = float(rng.normal() * 0.1);
      return t;
    };
    LinearGemms lin(be, fp8_recipe(recipe_case(recipe).config));
    Param stack, matrix, copied;
    stack.value = random({2, 32, 48});
    matrix.value = random({32, 48});
    copied.value = random({32, 48});
    Tensor copy = random({32, 48});
    for (Param* p : {&stack, &matrix, &copied}) {
      p->value_amax = be.alloc({p->value.ndim() == 3 ? p->value.dim(0) : 1}, DType::f32);
      be.fill(p->value_amax, 0.0f);
    }
    lin.add_weight(stack.value, &stack);
    lin.add_weight(matrix.value, &matrix);
    lin.add_weight(copy, &copied);  // not copied's value: its amax would be another tensor's
    lin.allocate();
    const bool tensor = recipe == "tensorwise";
    lin.refresh_weights();  // nothing raised yet (the first refresh after init or a load)
    for (Param* p : {&stack, &matrix, &copied}) p->value_amax_raised = true;
    lin.refresh_weights();
    lin.refresh_weights();  // taken once: a second refresh without a new raise makes its own pass
    EXPECT_EQ(be.stack_amax, (std::vector<bool>{false, tensor, false}));
    EXPECT_EQ(be.matrix_amax, (std::vector<bool>{false, false, tensor, false, false, false}));
    EXPECT_FALSE(stack.value_amax_raised && tensor);
    EXPECT_FALSE(matrix.value_amax_raised && tensor);
  }
}

TEST(LinearGemms, Fp8ExpertsReadTheirStacksForms) {
  // An expert stack's forms give the products grouped_matmul_fp8 makes of the bf16 stack itself.
  for (std::string recipe : {"tensorwise", "rowwise", "blockwise"}) {
    SCOPED_TRACE(recipe);
    const int64_t E = 3, R = 70, N = 128, K = 160;  // experts, rows, and each expert's out x in
    const RecipeCase r = recipe_case(recipe);
    const Fp8Granularity act = r.act, wg = r.weight;
    Fixture f;
    LinearGemms lin(f.be, fp8_recipe(r.config));
    Tensor W = f.random({E, N, K}, 0.1), x = f.random({R, K}, 1.0), dy = f.random({R, N}, 0.01);
    Tensor offsets = f.be.alloc({E + 1}, DType::i32);
    f.be.write_i32(offsets, {0, 30, 30, R});
    lin.add_weight(W);
    lin.allocate();
    lin.refresh_weights();
    SavedExpertOperand saved = lin.saved_expert_operand(R, K, int(E));
    Tensor y = f.be.alloc({R, N}, DType::f32), dx = f.be.alloc({R, K}, DType::f32);
    Tensor dW = f.be.alloc({E, N, K}, DType::f32);
    f.be.fill(dW, 0.0f);
    lin.expert_forward(true, x, W, y, offsets, saved);
    lin.expert_backward(true, dy, W, x, saved, dx, dW, offsets);
    Tensor yr = f.be.alloc({R, N}, DType::f32), dxr = f.be.alloc({R, K}, DType::f32);
    f.be.grouped_matmul_fp8(x, DType::e4m3, act, W, true, wg, yr, offsets);
    f.be.grouped_matmul_fp8(dy, DType::e5m2, act, W, false, wg, dxr, offsets);
    EXPECT_EQ(host(y), host(yr));
    EXPECT_EQ(host(dx), host(dxr));
    // And the forward is the FP8 product, not the f32 one: within e4m3 rounding of it.
    Tensor yf = f.be.alloc({R, N}, DType::f32);
    f.be.grouped_matmul(x, W, true, yf, offsets);
    EXPECT_GT(nerr(host(y), host(yf)), 1e-3);
    EXPECT_LT(nerr(host(y), host(yf)), 0.05);
  }
}

}  // namespace
}  // namespace moelab
