// FP8 recipes on the CPU: quantize_fp8 against a direct emulation of each granularity (groups
// enumerated as rectangles, independent of the backend's indexing), edge cases (all zeros, one
// huge value or Inf, denormals, saturation) that must never give Inf/NaN scales, transposed
// copies, and matmul_fp8 against the f64 product of the dequantized operands and of the
// unquantized ones.
#include <cfloat>
#include <cmath>

#include "backend/cpu/convert.hpp"
#include "gradcheck.hpp"
#include "ops/fp8_recipes.hpp"

namespace moelab::test {
namespace {

struct Group {
  int64_t r0, r1, k0, k1, scale_at;  // rows [r0, r1) x cols [k0, k1) share scale[scale_at]
};

// The groups of a [rows, K] operand, from the layout documented in backend.hpp.
std::vector<Group> groups_of(Fp8Granularity g, int64_t rows, int64_t K) {
  std::vector<Group> out;
  const int64_t kb = (K + 127) / 128, rb = (rows + 127) / 128, kb_stride = (kb + 3) / 4 * 4;
  switch (g) {
    case Fp8Granularity::tensor: out.push_back({0, rows, 0, K, 0}); break;
    case Fp8Granularity::row:
      for (int64_t r = 0; r < rows; ++r) out.push_back({r, r + 1, 0, K, r});
      break;
    case Fp8Granularity::block_1x128:
      for (int64_t b = 0; b < kb; ++b)
        for (int64_t r = 0; r < rows; ++r) out.push_back({r, r + 1, b * 128, std::min(K, b * 128 + 128), b * rows + r});
      break;
    case Fp8Granularity::block_128x128:
      for (int64_t i = 0; i < rb; ++i)
        for (int64_t b = 0; b < kb; ++b)
          out.push_back({i * 128, std::min(rows, i * 128 + 128), b * 128, std::min(K, b * 128 + 128), i * kb_stride + b});
      break;
  }
  return out;
}

struct Emulated {
  std::vector<uint8_t> codes;
  std::vector<float> scale;
};

// Direct emulation: the operand op(x) as f32 [rows, K], each group scaled by fmax / amax.
Emulated emulate(const std::vector<float>& v, int64_t rows, int64_t K, Fp8Granularity g, DType fmt) {
  const cpu::MiniFloat& f = fmt == DType::e4m3 ? cpu::kE4M3 : cpu::kE5M2;
  const float fmax = fmt == DType::e4m3 ? 448.0f : 57344.0f;
  Emulated e;
  e.codes.assign(size_t(rows * K), 0xff);
  int64_t ns = 1;
  for (int64_t d : fp8_scale_shape(g, rows, K)) ns *= d;
  e.scale.assign(size_t(ns), 1.0f);  // entries of no group (128x128 row padding) hold 1
  for (const Group& gr : groups_of(g, rows, K)) {
    float amax = 0;
    for (int64_t r = gr.r0; r < gr.r1; ++r)
      for (int64_t k = gr.k0; k < gr.k1; ++k) amax = std::fmax(amax, std::fabs(v[size_t(r * K + k)]));
    const float a = std::fmin(std::fmax(amax, 1e-30f), FLT_MAX);
    const float q = fmax / a;
    e.scale[size_t(gr.scale_at)] = 1.0f / q;
    for (int64_t r = gr.r0; r < gr.r1; ++r)
      for (int64_t k = gr.k0; k < gr.k1; ++k) e.codes[size_t(r * K + k)] = cpu::encode_minifloat(double(v[size_t(r * K + k)] * q), f);
  }
  return e;
}

QuantizedOperand make_operand(CpuBackend& be, int64_t rows, int64_t K, Fp8Granularity g, DType fmt) {
  QuantizedOperand q;
  q.granularity = g;
  q.data = be.alloc({rows, K}, fmt);
  q.scale = be.alloc(fp8_scale_shape(g, rows, K), DType::f32);
  be.fill(q.scale, NAN);  // every scale must be written
  return q;
}

std::vector<double> dequantize(const QuantizedOperand& q) {
  const int64_t rows = q.data.dim(0), K = q.data.dim(1);
  const cpu::MiniFloat& f = q.data.dtype == DType::e4m3 ? cpu::kE4M3 : cpu::kE5M2;
  std::vector<double> out(size_t(rows * K));
  for (const Group& gr : groups_of(q.granularity, rows, K))
    for (int64_t r = gr.r0; r < gr.r1; ++r)
      for (int64_t k = gr.k0; k < gr.k1; ++k)
        out[size_t(r * K + k)] = cpu::decode_minifloat(q.data.as<uint8_t>()[r * K + k], f) * q.scale.as<float>()[gr.scale_at];
  return out;
}

const Fp8Granularity kAll[] = {Fp8Granularity::tensor, Fp8Granularity::row, Fp8Granularity::block_1x128,
                               Fp8Granularity::block_128x128};

// Quantizes x [xr, xc] (optionally transposed) and checks codes and scales bit for bit against
// the emulation; returns the operand.
QuantizedOperand check_against_emulation(CpuBackend& be, const std::vector<float>& x, int64_t xr, int64_t xc,
                                         bool transpose, Fp8Granularity g, DType fmt) {
  Tensor t = be.alloc({xr, xc}, DType::f32);
  std::copy(x.begin(), x.end(), t.as<float>());
  const int64_t rows = transpose ? xc : xr, K = transpose ? xr : xc;
  std::vector<float> v(size_t(rows * K));
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t k = 0; k < K; ++k) v[size_t(r * K + k)] = transpose ? x[size_t(k * xc + r)] : x[size_t(r * xc + k)];
  QuantizedOperand q = make_operand(be, rows, K, g, fmt);
  be.quantize_fp8(t, transpose, q);
  Emulated e = emulate(v, rows, K, g, fmt);
  int64_t code_mismatch = 0;
  for (int64_t i = 0; i < rows * K; ++i) code_mismatch += q.data.as<uint8_t>()[i] != e.codes[size_t(i)];
  EXPECT_EQ(code_mismatch, 0) << fp8_granularity_name(g) << " " << dtype_name(fmt) << (transpose ? " T" : "");
  for (int64_t i = 0; i < q.scale.numel(); ++i) {
    const float s = q.scale.as<float>()[i];
    EXPECT_TRUE(std::isfinite(s) && s > 0) << fp8_granularity_name(g) << " scale " << i << " = " << s;
    EXPECT_EQ(s, e.scale[size_t(i)]) << fp8_granularity_name(g) << " scale " << i;
  }
  return q;
}

TEST(Fp8Quantize, EachGranularityMatchesDirectEmulationAndBoundsTheError) {
  CpuBackend be(DType::f32, 2);
  Rng rng(11);
  // Ragged shapes: partial 128-blocks in both directions; rows of very different magnitudes so
  // per-row and per-block scales matter.
  const int64_t xr = 200, xc = 300;
  std::vector<float> x(size_t(xr * xc));
  for (int64_t r = 0; r < xr; ++r)
    for (int64_t c = 0; c < xc; ++c) x[size_t(r * xc + c)] = float(rng.normal() * std::pow(10.0, double(r % 7) - 3));
  for (Fp8Granularity g : kAll)
    for (DType fmt : {DType::e4m3, DType::e5m2})
      for (bool tr : {false, true}) {
        QuantizedOperand q = check_against_emulation(be, x, xr, xc, tr, g, fmt);
        // Dequantized values: within half an ulp of the format, relative to each group's amax
        // (mantissa 3 bits: 2^-4; 2 bits: 2^-3), so the round trip is an actual quantization.
        const std::vector<double> d = dequantize(q);
        const int64_t rows = q.data.dim(0), K = q.data.dim(1);
        const double rel = fmt == DType::e4m3 ? 1.0 / 16 : 1.0 / 8;
        double worst = 0;
        for (const Group& gr : groups_of(g, rows, K)) {
          double amax = 0;
          for (int64_t r = gr.r0; r < gr.r1; ++r)
            for (int64_t k = gr.k0; k < gr.k1; ++k) {
              const double v = tr ? x[size_t(k * xc + r)] : x[size_t(r * xc + k)];
              amax = std::max(amax, std::fabs(v));
            }
          for (int64_t r = gr.r0; r < gr.r1; ++r)
            for (int64_t k = gr.k0; k < gr.k1; ++k) {
              const double v = tr ? x[size_t(k * xc + r)] : x[size_t(r * xc + k)];
              const double err = std::fabs(d[size_t(r * K + k)] - v);
              // Normals: relative bound; subnormals of the format: absolute bound near the bottom.
              const double bound = std::max(rel * std::fabs(v), amax * 1e-5) * 1.0001;
              worst = std::max(worst, err / bound);
            }
        }
        EXPECT_LE(worst, 1.0) << fp8_granularity_name(g) << " " << dtype_name(fmt) << (tr ? " T" : "");
      }
}

TEST(Fp8Quantize, EdgeCasesGiveFiniteScales) {
  CpuBackend be(DType::f32, 1);
  const int64_t xr = 130, xc = 260;
  auto filled = [&](float v) { return std::vector<float>(size_t(xr * xc), v); };
  std::vector<std::pair<std::string, std::vector<float>>> cases;
  cases.push_back({"all zero", filled(0.0f)});
  auto huge = filled(0.5f);
  huge[777] = 3e38f;
  cases.push_back({"one huge value", huge});
  auto inf = filled(-0.25f);
  inf[12345] = INFINITY;
  cases.push_back({"one infinity", inf});
  auto denorm = filled(1e-40f);
  for (size_t i = 0; i < denorm.size(); i += 3) denorm[i] = -3e-42f;
  cases.push_back({"denormals", denorm});
  auto tiny = filled(1e-36f);  // normal f32 but below kFp8MinAmax: flushes to zero
  cases.push_back({"below the amax floor", tiny});
  for (auto& [name, x] : cases)
    for (Fp8Granularity g : kAll)
      for (DType fmt : {DType::e4m3, DType::e5m2})
        for (bool tr : {false, true}) {
          SCOPED_TRACE(name + " " + fp8_granularity_name(g) + " " + dtype_name(fmt) + (tr ? " T" : ""));
          QuantizedOperand q = check_against_emulation(be, x, xr, xc, tr, g, fmt);
          for (double v : dequantize(q)) ASSERT_FALSE(std::isnan(v));
        }
  // What the edge cases quantize to: zeros stay zero; the huge value (and Inf) saturate to the
  // format's largest finite code while the rest of their group keeps its sign and finite value.
  {
    Tensor t = be.alloc({xr, xc}, DType::f32);
    std::copy(inf.begin(), inf.end(), t.as<float>());
    QuantizedOperand q = make_operand(be, xr, xc, Fp8Granularity::row, DType::e4m3);
    be.quantize_fp8(t, false, q);
    EXPECT_EQ(q.data.as<uint8_t>()[12345], 0x7e);  // +448
    const auto d = dequantize(q);
    EXPECT_TRUE(std::isfinite(d[12345]));
    EXPECT_TRUE(std::signbit(d[12345 - 1]));  // -0.25 * (448 / FLT_MAX) underflows to -0
    EXPECT_NEAR(d[0], -0.25, 1e-6);             // other rows keep their own scale
  }
  {
    Tensor t = be.alloc({xr, xc}, DType::f32);
    be.fill(t, 0.0f);
    QuantizedOperand q = make_operand(be, xr, xc, Fp8Granularity::tensor, DType::e5m2);
    be.quantize_fp8(t, false, q);
    for (int64_t i = 0; i < q.data.numel(); ++i) ASSERT_EQ(q.data.as<uint8_t>()[i], 0);
  }
}

TEST(Fp8Quantize, SaturatesInsteadOfOverflowing) {
  // A multiplier computed from one group applied to a larger value cannot happen inside
  // quantize_fp8 (amax bounds every element), so check the cast itself: x * q that rounds past
  // the top lands on the largest finite code, never on Inf or NaN.
  for (DType fmt : {DType::e4m3, DType::e5m2}) {
    const cpu::MiniFloat& f = fmt == DType::e4m3 ? cpu::kE4M3 : cpu::kE5M2;
    const double top = fp8_max(fmt);
    for (double v : {top, top * 1.03, top * 1e6, double(INFINITY)}) {
      EXPECT_EQ(cpu::encode_minifloat(v, f), f.max_code) << dtype_name(fmt) << " " << v;
      EXPECT_EQ(cpu::encode_minifloat(-v, f), 0x80 | f.max_code) << dtype_name(fmt) << " " << -v;
    }
  }
}

TEST(Fp8Matmul, EachRecipeMatchesTheDequantizedProduct) {
  CpuBackend be(DType::f32, 2);
  Rng rng(5);
  const int64_t M = 96, N = 160, K = 300;
  std::vector<float> a(size_t(M * K)), b(size_t(N * K));
  for (auto& v : a) v = float(rng.normal());
  for (auto& v : b) v = float(rng.normal() * 0.02);
  Tensor ta = be.alloc({M, K}, DType::f32), tb = be.alloc({N, K}, DType::f32);
  std::copy(a.begin(), a.end(), ta.as<float>());
  std::copy(b.begin(), b.end(), tb.as<float>());
  // f64 product of the unquantized operands.
  std::vector<double> exact(size_t(M * N), 0.0);
  for (int64_t i = 0; i < M; ++i)
    for (int64_t j = 0; j < N; ++j)
      for (int64_t k = 0; k < K; ++k) exact[size_t(i * N + j)] += double(a[size_t(i * K + k)]) * b[size_t(j * K + k)];
  for (const ops::Fp8GemmPair& p : ops::kFp8GemmPairs) {
    SCOPED_TRACE(std::string(fp8_granularity_name(p.ga)) + " x " + fp8_granularity_name(p.gb) + " " + dtype_name(p.fa));
    QuantizedOperand qa = make_operand(be, M, K, p.ga, p.fa), qb = make_operand(be, N, K, p.gb, DType::e4m3);
    be.quantize_fp8(ta, false, qa);
    be.quantize_fp8(tb, false, qb);
    const std::vector<double> da = dequantize(qa), db = dequantize(qb);
    std::vector<double> ref(size_t(M * N), 0.0), init(size_t(M * N));
    Tensor c = be.alloc({M, N}, DType::f32);
    for (int64_t i = 0; i < M * N; ++i) init[size_t(i)] = c.as<float>()[i] = float(rng.normal());
    for (int64_t i = 0; i < M; ++i)
      for (int64_t j = 0; j < N; ++j) {
        double s = 0;
        for (int64_t k = 0; k < K; ++k) s += da[size_t(i * K + k)] * db[size_t(j * K + k)];
        ref[size_t(i * N + j)] = 0.5 * s + 0.25 * init[size_t(i * N + j)];
      }
    be.matmul_fp8(qa, qb, c, 0.5f, 0.25f);
    EXPECT_LT(normalized_error(values(c), ref), 1e-6);
    // Against the unquantized product: the quantization error of the recipe (e4m3 ~ 2-3%,
    // e5m2 ~ 5%), and clearly non-zero, so FP8 rounding really happened.
    be.matmul_fp8(qa, qb, c, 1.0f, 0.0f);
    const double err = normalized_error(values(c), exact);
    EXPECT_LT(err, p.fa == DType::e5m2 ? 0.08 : 0.05);
    EXPECT_GT(err, 1e-3);
  }
  // Unsupported pairs are refused naming the pair.
  QuantizedOperand qa = make_operand(be, M, K, Fp8Granularity::tensor, DType::e4m3);
  QuantizedOperand qb = make_operand(be, N, K, Fp8Granularity::row, DType::e4m3);
  be.quantize_fp8(ta, false, qa);
  be.quantize_fp8(tb, false, qb);
  Tensor c = be.alloc({M, N}, DType::f32);
  try {
    be.matmul_fp8(qa, qb, c);
    ADD_FAILURE() << "mixed tensor/row scaling was accepted";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("(tensor, row)"), std::string::npos) << e.what();
  }
}

// The experts' FP8 GEMMs: each expert gets its own scales, so an expert whose values are 1e4
// times larger does not flush a small expert to zero (which shared scales would); results stay
// within the formats' rounding of the f32 grouped GEMMs, and empty experts are skipped.
TEST(Fp8Grouped, PerExpertScalesForwardDataAndWeightGradients) {
  CpuBackend be(DType::f32, 2);
  Rng rng(23);
  const int64_t E = 4, K = 96, N = 64;
  const std::vector<int32_t> offs = {0, 40, 40, 170, 200};  // expert 1 empty
  const int64_t R = 200;
  Tensor offsets = i32_tensor(be, {E + 1}, offs);
  std::vector<double> av(size_t(R * K));
  for (int64_t r = 0; r < R; ++r)
    for (int64_t k = 0; k < K; ++k) av[size_t(r * K + k)] = rng.normal() * (r >= 170 ? 1e4 : 1.0);  // expert 3 huge
  Tensor A = tensor_from(be, {R, K}, av);
  Tensor W = random_tensor(be, {E, N, K}, rng, 0.1);
  Tensor dY = random_tensor(be, {R, N}, rng, 0.01);
  auto per_expert_err = [&](const Tensor& got, const Tensor& ref, int64_t cols) {
    std::vector<double> errs;
    const std::vector<double> gv = values(got), fv = values(ref);
    for (int64_t e = 0; e < E; ++e) {
      const int64_t r0 = offs[size_t(e)], r1 = offs[size_t(e + 1)];
      if (r0 == r1) continue;
      std::vector<double> g(gv.begin() + r0 * cols, gv.begin() + r1 * cols);
      std::vector<double> f(fv.begin() + r0 * cols, fv.begin() + r1 * cols);
      errs.push_back(normalized_error(g, f));
    }
    return errs;
  };
  for (auto [ga, gw] : {std::pair{Fp8Granularity::tensor, Fp8Granularity::tensor}, {Fp8Granularity::row, Fp8Granularity::row},
                        {Fp8Granularity::block_1x128, Fp8Granularity::block_128x128}}) {
    SCOPED_TRACE(fp8_granularity_name(ga));
    Tensor C = be.alloc({R, N}, DType::f32), Cr = be.alloc({R, N}, DType::f32);
    be.grouped_matmul_fp8(A, DType::e4m3, ga, W, true, gw, C, offsets);
    be.grouped_matmul(A, W, true, Cr, offsets);
    for (double e : per_expert_err(C, Cr, N)) {
      EXPECT_GT(e, 1e-3);
      EXPECT_LT(e, 0.05);
    }
    // Data gradient form: G [R, N] times W_e [N, K] (not transposed), e5m2 operand.
    Tensor D = be.alloc({R, K}, DType::f32), Dr = be.alloc({R, K}, DType::f32);
    Tensor G = random_tensor(be, {R, N}, rng, 0.01);
    be.grouped_matmul_fp8(G, DType::e5m2, ga, W, false, gw, D, offsets);
    be.grouped_matmul(G, W, false, Dr, offsets);
    for (double e : per_expert_err(D, Dr, K)) EXPECT_LT(e, 0.08);
    // Weight gradient: accumulates; the empty expert's dW stays as it was.
    Tensor dW = be.alloc({E, N, K}, DType::f32), dWr = be.alloc({E, N, K}, DType::f32);
    be.fill(dW, 0.25f);
    be.fill(dWr, 0.25f);
    be.grouped_matmul_wgrad_fp8(dY, DType::e5m2, A, ga, dW, offsets);
    be.grouped_matmul_wgrad(dY, A, dWr, offsets, 1.0f);
    for (int64_t e = 0; e < E; ++e) {
      std::vector<double> g(size_t(N * K)), f(size_t(N * K));
      for (int64_t i = 0; i < N * K; ++i) {
        g[size_t(i)] = dW.as<float>()[e * N * K + i] - 0.25;
        f[size_t(i)] = dWr.as<float>()[e * N * K + i] - 0.25;
      }
      if (e == 1) {
        for (double v : g) ASSERT_EQ(v, 0.0);
        continue;
      }
      EXPECT_LT(normalized_error(g, f), 0.08) << "expert " << e;
    }
  }
}

TEST(Fp8Grouped, Relu2FoldGivesTheUnfoldedOps) {
  // ExpertRelu2Fold on a backend without fused kernels (the CPU): the same values as relu2_fwd
  // and relu2_bwd around the plain FP8 expert GEMMs, the amax of relu²(h) and of dh included.
  CpuBackend be(DType::f32, 2);
  Rng rng(29);
  const int64_t E = 3, D = 32, H = 48, R = 90;
  Tensor offsets = i32_tensor(be, {E + 1}, {0, 50, 50, 90});
  Tensor x = random_tensor(be, {R, D}, rng, 1.0), dy = random_tensor(be, {R, D}, rng, 0.1);
  Tensor w1 = random_tensor(be, {E, H, D}, rng, 0.2), w2 = random_tensor(be, {E, D, H}, rng, 0.2);
  auto forms = [&](const Tensor& w, bool transpose) {
    QuantizedExperts q;
    q.granularity = Fp8Granularity::tensor;
    const int64_t rows = transpose ? w.dim(2) : w.dim(1), k = transpose ? w.dim(1) : w.dim(2);
    q.data = be.alloc({E, rows, k}, DType::e4m3);
    q.scale = be.alloc({E, 1}, DType::f32);
    be.quantize_experts_fp8(w, transpose, q);
    return q;
  };
  const QuantizedExperts q1 = forms(w1, false), q2 = forms(w2, false), q2t = forms(w2, true);
  auto zeros = [&](const Shape& shape) {
    Tensor t = be.alloc(shape, DType::f32);
    be.fill(t, 0.0f);
    return t;
  };
  const Fp8Granularity g = Fp8Granularity::tensor;
  // Unfolded.
  Tensor h1 = zeros({R, H}), a1 = zeros({R, H}), y1 = zeros({R, D}), da1 = zeros({R, H}), dh1 = zeros({R, H});
  Tensor am1 = zeros({E}), dm1 = zeros({E}), dw1 = zeros({E, D, H});
  SavedExpertOperand sx1 = be.alloc_saved_expert_operand(R, D, int(E), g), sa1 = be.alloc_saved_expert_operand(R, H, int(E), g);
  be.grouped_matmul_fp8_saving(x, g, q1, h1, offsets, sx1);
  const AmaxSink am1_of{am1, offsets}, dm1_of{dm1, offsets};
  be.relu2_fwd(h1, a1, &am1_of);
  be.grouped_matmul_fp8_saving(a1, g, q2, y1, offsets, sa1);
  be.grouped_matmul_backward_fp8(dy, DType::e5m2, g, q2t, sa1, da1, dw1, offsets);
  be.relu2_bwd(h1, da1, dh1, &dm1_of);
  // Folded.
  Tensor h2 = zeros({R, H}), y2 = zeros({R, D}), dh2 = zeros({R, H}), am2 = zeros({E}), dm2 = zeros({E});
  Tensor dw2 = zeros({E, D, H});
  SavedExpertOperand sx2 = be.alloc_saved_expert_operand(R, D, int(E), g), sa2 = be.alloc_saved_expert_operand(R, H, int(E), g);
  ExpertRelu2Fold up, down, back;
  up.relu2_amax = &am2;
  down.relu2_operand = true;
  back.relu2_input = &h2;
  back.dx_amax = &dm2;
  be.grouped_matmul_fp8_saving(x, g, q1, h2, offsets, sx2, nullptr, up);
  be.grouped_matmul_fp8_saving(h2, g, q2, y2, offsets, sa2, nullptr, down);
  be.grouped_matmul_backward_fp8(dy, DType::e5m2, g, q2t, sa2, dh2, dw2, offsets, nullptr, back);
  EXPECT_EQ(values(h1), values(h2));
  EXPECT_EQ(values(am1), values(am2));
  EXPECT_GT(values(am2)[0], 0.0);
  EXPECT_EQ(values(am2)[1], 0.0);  // the empty expert
  EXPECT_EQ(values(y1), values(y2));
  EXPECT_EQ(values(dh1), values(dh2));
  EXPECT_EQ(values(dm1), values(dm2));
  EXPECT_EQ(values(dw1), values(dw2));
  // The fold does change the operand: the product of h itself is far from y.
  Tensor y3 = zeros({R, D});
  SavedExpertOperand sa3 = be.alloc_saved_expert_operand(R, H, int(E), g);
  be.grouped_matmul_fp8_saving(h2, g, q2, y3, offsets, sa3);
  EXPECT_GT(normalized_error(values(y3), values(y2)), 0.1);
}

}  // namespace
}  // namespace moelab::test
