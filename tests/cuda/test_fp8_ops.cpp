// The GPU's FP8 checks beside the op table (whose rows hold quantize_fp8's codes and scales bit for
// bit against the CPU emulation, edge cases included, matmul_fp8 for each scaling pair, the
// backward products, the experts' FP8 GEMMs and weight forms): quantize_fp8_pair and _pairs give
// the single calls' bits (with a producer's amax too), graph capture and replay, the segment
// quantizer's codes, the saving forward and fused backward against the separate ops, and ReLU²
// folded into the FP8 expert GEMMs. Fresh random inputs each run; skips without a GPU.
#include <gtest/gtest.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstring>

#include "backend/cpu/cpu_backend.hpp"
#include "backend/cuda/cuda_backend.hpp"
#include "backend/cuda/grouped_gemm_fp8.cuh"
#include "core/rng.hpp"
#include "gpu_fixture.hpp"
#include "ops/fp8_recipes.hpp"

namespace moelab {
namespace {

const Fp8Granularity kAll[] = {Fp8Granularity::tensor, Fp8Granularity::row, Fp8Granularity::block_1x128,
                               Fp8Granularity::block_128x128};

class CudaFp8 : public GpuTest {
 protected:
  // bf16-representable values with row magnitudes spread over 1e-3..1e3.
  std::vector<float> spread(int64_t rows, int64_t cols) {
    std::vector<float> v(size_t(rows * cols));
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t c = 0; c < cols; ++c)
        v[size_t(r * cols + c)] = round_to_bf16(float(rng->normal() * std::pow(10.0, double((r * 7 + c / 37) % 7) - 3)));
    return v;
  }
  struct Both {
    QuantizedOperand c, g;
  };
  QuantizedOperand operand(Backend& be, int64_t rows, int64_t k, Fp8Granularity gr, DType fmt) {
    QuantizedOperand q;
    q.granularity = gr;
    q.data = be.alloc({rows, k}, fmt);
    q.scale = be.alloc(fp8_scale_shape(gr, rows, k), DType::f32);
    be.fill(q.scale, NAN);
    return q;
  }
  // Quantizes the same values on both backends.
  Both quantize_both(const std::vector<float>& v, int64_t xr, int64_t xc, bool tr, Fp8Granularity gr, DType fmt) {
    Tensor xc_ = cpu->alloc({xr, xc}, DType::f32), xg = gpu->alloc({xr, xc}, DType::bf16);
    cpu->write(xc_, v);
    gpu->write(xg, v);
    const int64_t rows = tr ? xc : xr, k = tr ? xr : xc;
    Both b{operand(*cpu, rows, k, gr, fmt), operand(*gpu, rows, k, gr, fmt)};
    cpu->quantize_fp8(xc_, tr, b.c);
    gpu->quantize_fp8(xg, tr, b.g);
    return b;
  }
  std::vector<uint8_t> bytes(const Tensor& t) {
    std::vector<uint8_t> out(t.bytes());
    gpu->synchronize();
    EXPECT_EQ(cudaMemcpy(out.data(), t.data, t.bytes(), cudaMemcpyDeviceToHost), cudaSuccess);
    return out;
  }
  void expect_identical(const Both& b, const std::string& what) {
    const std::vector<uint8_t> g = bytes(b.g.data);
    const uint8_t* c = b.c.data.as<uint8_t>();
    int64_t diff = 0, first = -1;
    for (size_t i = 0; i < g.size(); ++i)
      if (g[i] != c[i]) {
        ++diff;
        if (first < 0) first = int64_t(i);
      }
    EXPECT_EQ(diff, 0) << what << ": " << diff << " codes differ, first at " << first << " (gpu "
                       << (first >= 0 ? int(g[size_t(first)]) : 0) << " cpu " << (first >= 0 ? int(c[first]) : 0) << ")";
    const std::vector<float> gs = gpu->read(b.g.scale), cs = cpu->read(b.c.scale);
    ASSERT_EQ(gs.size(), cs.size());
    int64_t sdiff = 0;
    for (size_t i = 0; i < gs.size(); ++i) {
      EXPECT_TRUE(std::isfinite(gs[i]) && gs[i] > 0) << what << ": scale " << i << " = " << gs[i];
      sdiff += std::memcmp(&gs[i], &cs[i], 4) != 0;
    }
    EXPECT_EQ(sdiff, 0) << what << ": " << sdiff << " scales differ";
  }
};

TEST_F(CudaFp8, QuantizePairGivesBothCopiesFromOneCall) {
  // quantize_fp8_pair must give exactly what the two separate calls give (which the test above
  // holds to the CPU emulation), on partial tiles, with a huge value in one row and one column.
  const int64_t xr = 272, xc = 400;
  std::vector<float> v = spread(xr, xc);
  v[size_t(130 * xc + 7)] = round_to_bf16(2e30f);
  Tensor x = gpu->alloc({xr, xc}, DType::bf16);
  gpu->write(x, v);
  for (Fp8Granularity gr : kAll)
    for (DType fmt : {DType::e4m3, DType::e5m2}) {
      const std::string what = std::string(fp8_granularity_name(gr)) + " " + dtype_name(fmt);
      QuantizedOperand s1 = operand(*gpu, xr, xc, gr, fmt), t1 = operand(*gpu, xc, xr, gr, fmt);
      QuantizedOperand s2 = operand(*gpu, xr, xc, gr, fmt), t2 = operand(*gpu, xc, xr, gr, fmt);
      // Every code must be written: the two sets of buffers start from different bytes.
      for (auto [q, byte] : {std::pair{&s1, 0x11}, {&t1, 0x11}, {&s2, 0x22}, {&t2, 0x22}})
        ASSERT_EQ(cudaMemset(q->data.data, byte, q->data.bytes()), cudaSuccess);
      gpu->quantize_fp8_pair(x, s1, t1);
      gpu->quantize_fp8(x, false, s2);
      gpu->quantize_fp8(x, true, t2);
      EXPECT_EQ(bytes(s1.data), bytes(s2.data)) << what << " straight codes";
      EXPECT_EQ(bytes(t1.data), bytes(t2.data)) << what << " transposed codes";
      EXPECT_EQ(bytes(s1.scale), bytes(s2.scale)) << what << " straight scales";
      EXPECT_EQ(bytes(t1.scale), bytes(t2.scale)) << what << " transposed scales";
      if (gr != Fp8Granularity::tensor) continue;
      // With x's amax from its producer (here the value it must be), the pair skips its own pass
      // and gives the same bits.
      float m = 0.f;
      for (float f : v) m = std::max(m, std::fabs(round_to_bf16(f)));  // x holds bf16
      Tensor amax = gpu->alloc({1}, DType::f32);
      gpu->write(amax, {m});
      QuantizedOperand s3 = operand(*gpu, xr, xc, gr, fmt), t3 = operand(*gpu, xc, xr, gr, fmt);
      gpu->quantize_fp8_pair(x, s3, t3, &amax);
      EXPECT_EQ(bytes(s3.data), bytes(s2.data)) << what << " straight codes, producer's amax";
      EXPECT_EQ(bytes(t3.data), bytes(t2.data)) << what << " transposed codes, producer's amax";
      EXPECT_EQ(bytes(s3.scale), bytes(s2.scale)) << what << " straight scales, producer's amax";
      // A wrong amax must change the scale: the pair does read it.
      gpu->write(amax, {2.0f * m});
      gpu->quantize_fp8_pair(x, s3, t3, &amax);
      EXPECT_NE(bytes(s3.scale), bytes(s2.scale)) << what << " the producer's amax is not used";
    }
}

TEST_F(CudaFp8, QuantizePairsAreEachPairAlone) {
  // quantize_fp8_pairs batches same-shaped matrices under tensor scaling through a device table
  // of their addresses: each matrix's copies and scales must be quantize_fp8_pair's, in a batch
  // that mixes shapes, dtypes, formats and a row-scaled matrix, on its first call (the table is
  // made) and its second (the table is reused), after the inputs change.
  struct Case {
    int64_t r, c;
    DType dtype, fmt;
    Fp8Granularity g;
  };
  const Case cases[] = {{272, 400, DType::f32, DType::e4m3, Fp8Granularity::tensor},
                        {272, 400, DType::f32, DType::e4m3, Fp8Granularity::tensor},
                        {64, 96, DType::bf16, DType::e5m2, Fp8Granularity::tensor},
                        {272, 400, DType::f32, DType::e4m3, Fp8Granularity::tensor},
                        {64, 96, DType::bf16, DType::e5m2, Fp8Granularity::tensor},
                        {272, 400, DType::f32, DType::e4m3, Fp8Granularity::row},
                        {128, 32, DType::f32, DType::e4m3, Fp8Granularity::tensor}};
  const size_t n = std::size(cases);
  std::vector<Tensor> xs;
  std::vector<QuantizedOperand> s1, t1, s2, t2;
  for (const Case& c : cases) {
    xs.push_back(gpu->alloc({c.r, c.c}, c.dtype));
    for (auto* v : {&s1, &s2}) v->push_back(operand(*gpu, c.r, c.c, c.g, c.fmt));
    for (auto* v : {&t1, &t2}) v->push_back(operand(*gpu, c.c, c.r, c.g, c.fmt));
  }
  for (int round = 0; round < 2; ++round) {
    for (size_t i = 0; i < n; ++i) {
      std::vector<float> v = spread(cases[i].r, cases[i].c);
      v[size_t(i * 7)] = round_to_bf16(float(1 + i + 10 * round) * 1e4f);  // a different amax each matrix
      gpu->write(xs[i], v);
      for (QuantizedOperand* q : {&s1[i], &t1[i]}) ASSERT_EQ(cudaMemset(q->data.data, 0x11, q->data.bytes()), cudaSuccess);
    }
    // Round 1 hands most matrices their amax (as the optimizer does): those skip the pass.
    std::vector<Tensor> amax(n);
    std::vector<Fp8PairJob> jobs;
    for (size_t i = 0; i < n; ++i) {
      const Tensor* known = nullptr;
      if (round == 1 && i != 1 && cases[i].g == Fp8Granularity::tensor) {
        const std::vector<float> v = gpu->read(xs[i]);
        float m = 0.0f;
        for (float f : v) m = std::max(m, std::fabs(f));
        amax[i] = gpu->alloc({1}, DType::f32);
        gpu->write(amax[i], {m});
        known = &amax[i];
      }
      jobs.push_back({&xs[i], &s1[i], &t1[i], known});
    }
    gpu->quantize_fp8_pairs(jobs);
    for (size_t i = 0; i < n; ++i) {
      gpu->quantize_fp8_pair(xs[i], s2[i], t2[i]);
      const std::string what = "matrix " + std::to_string(i) + " round " + std::to_string(round);
      EXPECT_EQ(bytes(s1[i].data), bytes(s2[i].data)) << what << " straight codes";
      EXPECT_EQ(bytes(t1[i].data), bytes(t2[i].data)) << what << " transposed codes";
      EXPECT_EQ(bytes(s1[i].scale), bytes(s2[i].scale)) << what << " straight scales";
      EXPECT_EQ(bytes(t1[i].scale), bytes(t2[i].scale)) << what << " transposed scales";
    }
  }
  // In a graph: a group first met while recording goes one by one (no table upload can run
  // then); once a call outside a recording has made its table, a recording uses it.
  std::vector<Tensor> ys;
  std::vector<QuantizedOperand> ys1, yt1, ys2, yt2;
  std::vector<Fp8PairJob> jobs;
  for (int i = 0; i < 3; ++i) {
    ys.push_back(gpu->alloc({64, 64}, DType::f32));
    ys1.push_back(operand(*gpu, 64, 64, Fp8Granularity::tensor, DType::e4m3));
    yt1.push_back(operand(*gpu, 64, 64, Fp8Granularity::tensor, DType::e4m3));
    ys2.push_back(operand(*gpu, 64, 64, Fp8Granularity::tensor, DType::e4m3));
    yt2.push_back(operand(*gpu, 64, 64, Fp8Granularity::tensor, DType::e4m3));
  }
  for (int i = 0; i < 3; ++i) jobs.push_back({&ys[size_t(i)], &ys1[size_t(i)], &yt1[size_t(i)]});
  for (int pass = 0; pass < 2; ++pass) {
    for (size_t i = 0; i < 3; ++i) {
      std::vector<float> v = spread(64, 64);
      v[i] = float(100 * (i + 1) * (pass + 1));
      gpu->write(ys[i], v);
    }
    if (pass == 1) gpu->quantize_fp8_pairs(jobs);  // makes the table outside a recording
    CudaGraph graph(*gpu);
    graph.capture([&] { gpu->quantize_fp8_pairs(jobs); });
    for (auto& q : ys1) gpu->fill(q.scale, NAN);
    graph.replay();
    for (size_t i = 0; i < 3; ++i) {
      gpu->quantize_fp8_pair(ys[i], ys2[i], yt2[i]);
      const std::string what = "graph pass " + std::to_string(pass) + " matrix " + std::to_string(i);
      EXPECT_EQ(bytes(ys1[i].data), bytes(ys2[i].data)) << what;
      EXPECT_EQ(bytes(yt1[i].data), bytes(yt2[i].data)) << what;
      EXPECT_EQ(bytes(ys1[i].scale), bytes(ys2[i].scale)) << what;
    }
  }
}

struct PairCase {
  Fp8Granularity ga, gb;
  DType fa;
};

TEST_F(CudaFp8, QuantizeAndMatmulReplayFromAGraph) {
  const int64_t M = 256, N = 256, K = 384;
  Tensor x = gpu->alloc({M, K}, DType::bf16), w = gpu->alloc({N, K}, DType::bf16);
  std::vector<float> xv = spread(M, K), wv = spread(N, K);
  gpu->write(x, xv);
  gpu->write(w, wv);
  QuantizedOperand qa = operand(*gpu, M, K, Fp8Granularity::tensor, DType::e4m3);
  QuantizedOperand qb = operand(*gpu, N, K, Fp8Granularity::tensor, DType::e4m3);
  Tensor c = gpu->alloc({M, N}, DType::bf16);
  auto body = [&] {
    gpu->quantize_fp8(x, false, qa);
    gpu->quantize_fp8(w, false, qb);
    gpu->matmul_fp8(qa, qb, c, 1.0f, 0.0f, true);
  };
  body();  // eager warm-up: scratch and algorithm chosen outside capture
  const std::vector<float> first = gpu->read(c);
  // New inputs (3x larger), then replay: the graph must recompute amax and scales on the device,
  // giving the bits of an eager run on the new inputs (stale scales would saturate at 448).
  for (auto& v : xv) v = round_to_bf16(v * 3.0f);
  gpu->write(x, xv);
  gpu->fill(c, NAN);
  CudaGraph graph(*gpu);
  graph.capture(body);
  graph.replay();
  const std::vector<float> replayed = gpu->read(c);
  body();
  const std::vector<float> eager = gpu->read(c);
  EXPECT_EQ(nerr(replayed, eager), 0.0);
  std::vector<float> tripled(first.size());
  for (size_t i = 0; i < first.size(); ++i) tripled[i] = 3.0f * first[i];
  EXPECT_LT(nerr(replayed, tripled), 0.05);
}

// The experts' FP8 GEMMs (our wgmma kernels) beyond their op-table rows, with uneven experts: an
// empty one, one under a tile, partial tiles.
using GroupedRecipe = ops::Fp8GroupedRecipe;
const auto& kGroupedRecipes = ops::kFp8GroupedRecipes;

class CudaFp8Grouped : public CudaFp8 {
 protected:
  const std::vector<int32_t> counts = {200, 0, 129, 271, 40};
  int64_t R = 640;
  int E = 5;
  std::vector<int32_t> offsets_of(const std::vector<int32_t>& c) {
    std::vector<int32_t> o(1, 0);
    for (int32_t n : c) o.push_back(o.back() + n);
    return o;
  }
  std::vector<float> values(int64_t n, double sd) {
    std::vector<float> v(static_cast<size_t>(n));
    for (auto& x : v) x = round_to_bf16(float(rng->normal() * sd));
    return v;
  }
  struct Pair {
    Tensor c, g;
  };
  Pair both(const Shape& shape, const std::vector<float>& v, DType gpu_dtype = DType::bf16) {
    Pair p{cpu->alloc(shape, DType::f32), gpu->alloc(shape, gpu_dtype)};
    cpu->write(p.c, v);
    gpu->write(p.g, v);
    return p;
  }
  // Room for an expert stack's FP8 form: E operands [rows, k] with their scales.
  static QuantizedExperts experts_operand(Backend& be, int64_t E, int64_t rows, int64_t k, Fp8Granularity g) {
    QuantizedExperts q;
    q.granularity = g;
    q.data = be.alloc({E, rows, k}, DType::e4m3);
    int64_t n = 1;
    for (int64_t d : fp8_scale_shape(g, rows, k)) n *= d;
    q.scale = be.alloc({E, n}, DType::f32);
    be.fill(q.scale, 1.0f);
    return q;
  }
  Pair offsets(const std::vector<int32_t>& o) {
    Pair p{cpu->alloc({int64_t(o.size())}, DType::i32), gpu->alloc({int64_t(o.size())}, DType::i32)};
    cpu->write_i32(p.c, o);
    gpu->write_i32(p.g, o);
    return p;
  }
};

// The segment quantizer's codes, byte for byte, against the CPU quantizing each expert's tokens
// on its own: the transposed segments are x_e^T with tensor or row scales (a row of x_e^T is a
// column over the expert's tokens), zeros in the padding; the straight copy beside them is x_e
// with the expert's scale (tensor) or x with row scales. C = 272 leaves a partial column tile.
TEST_F(CudaFp8Grouped, SegmentCodesMatchTheCpuExpertByExpert) {
  const int64_t C = 272, Rp = grouped_gemm::padded_rows_bound(R, E);
  const std::vector<int32_t> off = offsets_of(counts);
  std::vector<int32_t> pad(1, 0);
  for (int32_t n : counts) pad.push_back(pad.back() + (n + 127) / 128 * 128);
  const std::vector<float> xv = spread(R, C);
  Pair x = both({R, C}, xv), o = offsets(off);
  Tensor padded = gpu->alloc({E + 1}, DType::i32);
  grouped_gemm::padded_offsets(o.g.as<int32_t>(), E, padded.as<int32_t>(), gpu->stream());
  EXPECT_EQ(gpu->read_i32(padded), pad);
  for (auto mode : {grouped_gemm::Fp8ScaleMode::tensor, grouped_gemm::Fp8ScaleMode::row})
    for (DType fmt : {DType::e4m3, DType::e5m2}) {
      const bool row = mode == grouped_gemm::Fp8ScaleMode::row;
      const Fp8Granularity g = row ? Fp8Granularity::row : Fp8Granularity::tensor;
      const std::string what = std::string(row ? "row " : "tensor ") + dtype_name(fmt);
      Tensor out = gpu->alloc({C, Rp}, fmt), scale = gpu->alloc({row ? E * C : E}, DType::f32);
      Tensor amax = gpu->alloc({E * C + R}, DType::i32);
      Tensor straight = gpu->alloc({R, C}, fmt), straight_scale = gpu->alloc({R}, DType::f32);
      ASSERT_EQ(cudaMemset(out.data, 0xff, out.bytes()), cudaSuccess);  // every code and padding byte must be written
      grouped_gemm::StraightCopy sc;
      sc.out = straight.as<uint8_t>();
      sc.scale = row ? straight_scale.as<float>() : nullptr;
      sc.R = R;
      grouped_gemm::quantize_segments_transposed(x.g.data, int(C), o.g.as<int32_t>(), padded.as<int32_t>(), E, Rp, mode,
                                                 fmt, out.as<uint8_t>(), scale.as<float>(),
                                                 reinterpret_cast<unsigned*>(amax.data), gpu->stream(), sc);
      const std::vector<uint8_t> got = bytes(out), got_straight = bytes(straight);
      const std::vector<float> got_scale = gpu->read(scale), got_straight_scale = gpu->read(straight_scale);
      int64_t code_diff = 0, pad_diff = 0, scale_diff = 0, straight_diff = 0;
      for (int e = 0; e < E; ++e) {
        const int64_t n = counts[size_t(e)];
        for (int64_t c = 0; c < C; ++c)
          for (int64_t i = n; i < pad[size_t(e) + 1] - pad[size_t(e)]; ++i) pad_diff += got[size_t(c * Rp + pad[size_t(e)] + i)] != 0;
        if (n == 0) continue;
        const Tensor xe = x.c.rows_slice(off[size_t(e)], off[size_t(e)] + n);
        QuantizedOperand t = operand(*cpu, C, n, g, fmt);
        cpu->quantize_fp8(xe, true, t);
        const uint8_t* tc = t.data.as<uint8_t>();
        const std::vector<float> ts = cpu->read(t.scale);
        for (int64_t c = 0; c < C; ++c)
          for (int64_t i = 0; i < n; ++i) code_diff += got[size_t(c * Rp + pad[size_t(e)] + i)] != tc[c * n + i];
        for (size_t k = 0; k < ts.size(); ++k)
          scale_diff += std::memcmp(&ts[k], &got_scale[row ? size_t(e) * C + k : size_t(e)], 4) != 0;
        if (!row) {  // the straight copy shares the expert's scale
          QuantizedOperand st = operand(*cpu, n, C, g, fmt);
          cpu->quantize_fp8(xe, false, st);
          for (int64_t k = 0; k < n * C; ++k)
            straight_diff += got_straight[size_t(off[size_t(e)] * C + k)] != st.data.as<uint8_t>()[k];
        }
      }
      if (row) {
        QuantizedOperand st = operand(*cpu, R, C, g, fmt);
        cpu->quantize_fp8(x.c, false, st);
        for (int64_t k = 0; k < R * C; ++k) straight_diff += got_straight[size_t(k)] != st.data.as<uint8_t>()[k];
        const std::vector<float> ss = cpu->read(st.scale);
        for (int64_t r = 0; r < R; ++r) scale_diff += std::memcmp(&ss[size_t(r)], &got_straight_scale[size_t(r)], 4) != 0;
      }
      EXPECT_EQ(code_diff, 0) << what << ": transposed codes differ (seed " << seed << ")";
      EXPECT_EQ(pad_diff, 0) << what << ": padding is not zero";
      EXPECT_EQ(scale_diff, 0) << what << ": scales differ";
      EXPECT_EQ(straight_diff, 0) << what << ": straight codes differ";
    }
}

TEST_F(CudaFp8Grouped, ExpertWeightFormsMatchTheCpu) {
  // The model quantizes its expert stacks once per step, both forms from one read
  // (quantize_experts_fp8_pair): the codes and scales must be the CPU's, expert by expert, for
  // every recipe's weight scaling, and the pair must be the two single forms.
  const int64_t N = 256, K = 384;
  std::vector<float> wv = values(E * N * K, 0.05);
  wv[7] = 3.0f;                                       // one large value in expert 0
  for (int64_t i = 0; i < N * K; ++i) wv[size_t(2 * N * K + i)] = 0.0f;  // expert 2 all zero
  auto expect_same = [&](const QuantizedExperts& g, const QuantizedExperts& c, const std::string& what) {
    const std::vector<uint8_t> gd = bytes(g.data);
    const uint8_t* cd = c.data.as<uint8_t>();
    const std::vector<float> gs = gpu->read(g.scale), cs = cpu->read(c.scale);
    int64_t code_diff = 0, scale_diff = 0, bad = 0;
    for (size_t i = 0; i < gd.size(); ++i) code_diff += gd[i] != cd[i];
    for (size_t i = 0; i < gs.size(); ++i) {
      scale_diff += gs[i] != cs[i];
      bad += !std::isfinite(gs[i]) || gs[i] <= 0.0f;
    }
    EXPECT_EQ(code_diff, 0) << what;
    EXPECT_EQ(scale_diff, 0) << what;
    EXPECT_EQ(bad, 0) << what << ": a scale is not finite and positive";
  };
  // The model quantizes f32 masters (weights only FP8 products read keep no bf16 copy).
  for (DType wdtype : {DType::f32, DType::bf16}) {
    for (const GroupedRecipe& r : kGroupedRecipes) {
      Pair w = both({E, N, K}, wv, wdtype);
      const std::string what = std::string(dtype_name(wdtype)) + " " + fp8_granularity_name(r.weight);
      QuantizedExperts forms[2] = {experts_operand(*cpu, E, N, K, r.weight), experts_operand(*cpu, E, K, N, r.weight)};
      for (bool transpose : {false, true}) {
        const int64_t rows = transpose ? K : N, k = transpose ? N : K;
        QuantizedExperts g = experts_operand(*gpu, E, rows, k, r.weight);
        gpu->quantize_experts_fp8(w.g, transpose, g);
        cpu->quantize_experts_fp8(w.c, transpose, forms[transpose]);
        expect_same(g, forms[transpose], what + (transpose ? " transposed" : ""));
      }
      QuantizedExperts gs = experts_operand(*gpu, E, N, K, r.weight), gt = experts_operand(*gpu, E, K, N, r.weight);
      gpu->quantize_experts_fp8_pair(w.g, gs, gt);
      expect_same(gs, forms[0], what + " pair, straight");
      expect_same(gt, forms[1], what + " pair, transposed");
      if (r.weight != Fp8Granularity::tensor) continue;
      // With each expert's amax from W's producer (the optimizer), the same forms without a pass;
      // a wrong amax changes the scales (it is read).
      std::vector<float> am(size_t(E), 0.0f);
      const std::vector<float> stored = gpu->read(w.g);
      for (int64_t i = 0; i < E * N * K; ++i) am[size_t(i / (N * K))] = std::max(am[size_t(i / (N * K))], std::fabs(stored[size_t(i)]));
      Tensor amax = gpu->alloc({E}, DType::f32);
      gpu->write(amax, am);
      QuantizedExperts ks = experts_operand(*gpu, E, N, K, r.weight), kt = experts_operand(*gpu, E, K, N, r.weight);
      gpu->quantize_experts_fp8_pair(w.g, ks, kt, &amax);
      expect_same(ks, forms[0], what + " pair with the producer's amax, straight");
      expect_same(kt, forms[1], what + " pair with the producer's amax, transposed");
      am[0] *= 2.0f;
      gpu->write(amax, am);
      gpu->quantize_experts_fp8_pair(w.g, ks, kt, &amax);
      EXPECT_NE(gpu->read(ks.scale), cpu->read(forms[0].scale)) << what << ": the producer's amax is not used";
    }
  }
}

TEST_F(CudaFp8Grouped, SavingForwardAndBackwardAreTheSeparateOps) {
  // grouped_matmul_fp8_saving keeps X's FP8 weight-gradient copy from the forward's read of X;
  // grouped_matmul_backward_fp8 quantizes dY once for both of its products and reads that copy.
  // Together they must give exactly what grouped_matmul_fp8 (forward, data gradient) and
  // grouped_matmul_wgrad_fp8 give, with capacity dispatch's unused tail rows (huge values)
  // outside every expert.
  const int64_t used = R;
  R = used + 48;
  Pair off = offsets(offsets_of(counts));
  const int64_t N = 256, K = 384;  // forward y = x W^T: W [E, N, K], X [R, K], dY [R, N]
  for (const GroupedRecipe& r : kGroupedRecipes)
    for (DType fmt : {DType::e5m2, DType::e4m3}) {
      const std::string what = std::string(fp8_granularity_name(r.act)) + " " + dtype_name(fmt);
      std::vector<float> dyv = spread(R, N), xv = values(R * K, 1.0);
      for (int64_t i = used * N; i < R * N; ++i) dyv[size_t(i)] = round_to_bf16(1e38f);
      for (int64_t i = used * K; i < R * K; ++i) xv[size_t(i)] = round_to_bf16(1e38f);
      Pair dy = both({R, N}, dyv), x = both({R, K}, xv), w = both({E, N, K}, values(E * N * K, 0.05));
      const std::vector<float> dw0 = values(E * N * K, 1.0);
      Tensor y1 = gpu->alloc({R, N}, DType::bf16), y2 = gpu->alloc({R, N}, DType::bf16);
      Tensor dx1 = gpu->alloc({R, K}, DType::bf16), dx2 = gpu->alloc({R, K}, DType::bf16);
      Tensor dw1 = gpu->alloc({E, N, K}, DType::f32), dw2 = gpu->alloc({E, N, K}, DType::f32);
      gpu->write(dw1, dw0);
      gpu->write(dw2, dw0);
      gpu->fill(y1, NAN);
      gpu->fill(dx1, NAN);
      SavedExpertOperand saved = gpu->alloc_saved_expert_operand(R, K, E, r.act);
      QuantizedExperts qw = experts_operand(*gpu, E, N, K, r.weight), qwt = experts_operand(*gpu, E, K, N, r.weight);
      try {
        gpu->quantize_experts_fp8(w.g, false, qw);
        gpu->quantize_experts_fp8(w.g, true, qwt);
        gpu->grouped_matmul_fp8_saving(x.g, r.act, qw, y1, off.g, saved);
        gpu->grouped_matmul_backward_fp8(dy.g, fmt, r.act, qwt, saved, dx1, dw1, off.g);
      } catch (const Error& e) {
        ADD_FAILURE() << what << ": " << e.what();
        continue;
      }
      gpu->grouped_matmul_fp8(x.g, DType::e4m3, r.act, w.g, true, r.weight, y2, off.g);
      gpu->grouped_matmul_fp8(dy.g, fmt, r.act, w.g, false, r.weight, dx2, off.g);
      gpu->grouped_matmul_wgrad_fp8(dy.g, fmt, x.g, r.act, dw2, off.g);
      auto used_rows = [&](const Tensor& t, int64_t cols) {
        std::vector<float> v = gpu->read(t);
        v.resize(size_t(used * cols));
        return v;
      };
      const std::vector<float> ya = used_rows(y1, N), dxa = used_rows(dx1, K);
      if (r.act == Fp8Granularity::tensor) {
        // With the operands' per-expert amax from their producers (exact), the same bits.
        auto segment_amax = [&](const Tensor& t) {
          const std::vector<float> v = gpu->read(t);
          const std::vector<int32_t> off_host = offsets_of(counts);
          std::vector<float> m(size_t(E), 0.0f);
          for (int e = 0; e < E; ++e)
            for (int64_t i = int64_t(off_host[size_t(e)]) * t.cols(); i < int64_t(off_host[size_t(e) + 1]) * t.cols(); ++i)
              m[size_t(e)] = std::max(m[size_t(e)], std::fabs(v[size_t(i)]));
          Tensor a = gpu->alloc({E}, DType::f32);
          gpu->write(a, m);
          return a;
        };
        const Tensor x_amax = segment_amax(x.g), dy_amax = segment_amax(dy.g);
        Tensor y3 = gpu->alloc({R, N}, DType::bf16), dx3 = gpu->alloc({R, K}, DType::bf16);
        Tensor dw3 = gpu->alloc({E, N, K}, DType::f32);
        gpu->write(dw3, dw0);
        SavedExpertOperand saved3 = gpu->alloc_saved_expert_operand(R, K, E, r.act);
        gpu->grouped_matmul_fp8_saving(x.g, r.act, qw, y3, off.g, saved3, &x_amax);
        gpu->grouped_matmul_backward_fp8(dy.g, fmt, r.act, qwt, saved3, dx3, dw3, off.g, &dy_amax);
        EXPECT_EQ(nerr(ya, used_rows(y3, N)), 0.0) << what << " forward with the producer's amax";
        EXPECT_EQ(nerr(dxa, used_rows(dx3, K)), 0.0) << what << " data gradient with the producer's amax";
        EXPECT_EQ(nerr(gpu->read(dw1), gpu->read(dw3)), 0.0) << what << " weight gradient with the producer's amax";
      }
      EXPECT_EQ(nerr(ya, used_rows(y2, N)), 0.0) << what << " forward (seed " << seed << ")";
      EXPECT_EQ(nerr(dxa, used_rows(dx2, K)), 0.0) << what << " data gradient (seed " << seed << ")";
      EXPECT_EQ(nerr(gpu->read(dw1), gpu->read(dw2)), 0.0) << what << " weight gradient (seed " << seed << ")";
      // And against the CPU's emulation, so the equal pair is also the right one.
      Tensor dxc = cpu->alloc({R, K}, DType::f32);
      cpu->grouped_matmul_fp8(dy.c, fmt, r.act, w.c, false, r.weight, dxc, off.c);
      std::vector<float> c = cpu->read(dxc);
      c.resize(size_t(used * K));
      EXPECT_LT(nerr(dxa, c), 1e-2) << what << " data gradient against the CPU (seed " << seed << ")";
    }
}

TEST_F(CudaFp8Grouped, Relu2FoldedIntoTheGemmsIsTheUnfoldedOps) {
  // The expert MLP h = x W1^T, a = relu²(h), y = a W2^T and the down projection's backward, with
  // ReLU² folded into the FP8 GEMMs (ExpertRelu2Fold) and as relu2_fwd / relu2_bwd passes: the
  // same bits for h, relu²(h)'s amax, y, dh, dh's amax and the weight gradient, in each recipe,
  // with capacity dispatch's unused tail rows (huge values) outside every expert.
  const int64_t used = R;
  R = used + 48;
  Pair off = offsets(offsets_of(counts));
  const int64_t D = 128, H = 256;
  auto used_rows = [&](const Tensor& t) {
    std::vector<float> v = gpu->read(t);
    v.resize(size_t(used * t.cols()));
    return v;
  };
  auto zeros = [&](const Shape& shape, DType dtype) {
    Tensor t = gpu->alloc(shape, dtype);
    gpu->fill(t, 0.0f);
    return t;
  };
  for (const GroupedRecipe& r : kGroupedRecipes)
    for (DType fmt : {DType::e5m2, DType::e4m3}) {
      const std::string what = std::string(fp8_granularity_name(r.act)) + " " + dtype_name(fmt);
      const bool tensor = r.act == Fp8Granularity::tensor;
      std::vector<float> xv = values(R * D, 1.0), dyv = spread(R, D);
      for (int64_t i = used * D; i < R * D; ++i) xv[size_t(i)] = dyv[size_t(i)] = round_to_bf16(1e38f);
      Pair x = both({R, D}, xv), dy = both({R, D}, dyv);
      Pair w1 = both({E, H, D}, values(E * H * D, 0.08)), w2 = both({E, D, H}, values(E * D * H, 0.05));
      QuantizedExperts q1 = experts_operand(*gpu, E, H, D, r.weight), q2 = experts_operand(*gpu, E, D, H, r.weight);
      QuantizedExperts q2t = experts_operand(*gpu, E, H, D, r.weight);
      gpu->quantize_experts_fp8(w1.g, false, q1);
      gpu->quantize_experts_fp8_pair(w2.g, q2, q2t);
      // Unfolded.
      Tensor h1 = gpu->alloc({R, H}, DType::bf16), a1 = gpu->alloc({R, H}, DType::bf16), y1 = gpu->alloc({R, D}, DType::bf16);
      Tensor da1 = gpu->alloc({R, H}, DType::bf16), dh1 = gpu->alloc({R, H}, DType::bf16);
      Tensor a_amax1 = zeros({E}, DType::f32), dh_amax1 = zeros({E}, DType::f32), dw1 = zeros({E, D, H}, DType::f32);
      SavedExpertOperand sx1 = gpu->alloc_saved_expert_operand(R, D, E, r.act), sa1 = gpu->alloc_saved_expert_operand(R, H, E, r.act);
      gpu->grouped_matmul_fp8_saving(x.g, r.act, q1, h1, off.g, sx1);
      const AmaxSink a_amax_of1{a_amax1, off.g}, dh_amax_of1{dh_amax1, off.g};
      gpu->relu2_fwd(h1, a1, &a_amax_of1);
      gpu->grouped_matmul_fp8_saving(a1, r.act, q2, y1, off.g, sa1, tensor ? &a_amax1 : nullptr);
      gpu->grouped_matmul_backward_fp8(dy.g, fmt, r.act, q2t, sa1, da1, dw1, off.g);
      gpu->relu2_bwd(h1, da1, dh1, &dh_amax_of1);
      // Folded.
      Tensor h2 = gpu->alloc({R, H}, DType::bf16), y2 = gpu->alloc({R, D}, DType::bf16), dh2 = gpu->alloc({R, H}, DType::bf16);
      Tensor a_amax2 = zeros({E}, DType::f32), dh_amax2 = zeros({E}, DType::f32), dw2 = zeros({E, D, H}, DType::f32);
      gpu->fill(dh2, NAN);
      SavedExpertOperand sx2 = gpu->alloc_saved_expert_operand(R, D, E, r.act), sa2 = gpu->alloc_saved_expert_operand(R, H, E, r.act);
      ExpertRelu2Fold up, down, back;
      up.relu2_amax = &a_amax2;
      down.relu2_operand = true;
      back.relu2_input = &h2;
      back.dx_amax = &dh_amax2;
      try {
        gpu->grouped_matmul_fp8_saving(x.g, r.act, q1, h2, off.g, sx2, nullptr, up);
        gpu->grouped_matmul_fp8_saving(h2, r.act, q2, y2, off.g, sa2, tensor ? &a_amax2 : nullptr, down);
        gpu->grouped_matmul_backward_fp8(dy.g, fmt, r.act, q2t, sa2, dh2, dw2, off.g, nullptr, back);
      } catch (const Error& e) {
        ADD_FAILURE() << what << ": " << e.what();
        continue;
      }
      EXPECT_EQ(nerr(used_rows(h1), used_rows(h2)), 0.0) << what << " h (seed " << seed << ")";
      const std::vector<float> am1 = gpu->read(a_amax1), am2 = gpu->read(a_amax2);
      EXPECT_EQ(am1, am2) << what << " relu²(h)'s amax from the up projection's epilogue";
      EXPECT_GT(*std::max_element(am2.begin(), am2.end()), 0.0f) << what;
      EXPECT_EQ(nerr(used_rows(y1), used_rows(y2)), 0.0) << what << " y with relu²(h) quantized from h";
      const std::vector<float> dh = used_rows(dh2);
      EXPECT_EQ(nerr(used_rows(dh1), dh), 0.0) << what << " dh from the data gradient's epilogue";
      EXPECT_EQ(gpu->read(dh_amax1), gpu->read(dh_amax2)) << what << " dh's amax";
      EXPECT_EQ(nerr(gpu->read(dw1), gpu->read(dw2)), 0.0) << what << " weight gradient from the saved relu²(h)";
      // And the folded chain against the CPU's (its default runs the unfolded ops in f32).
      Tensor yc = cpu->alloc({R, D}, DType::f32), hc = cpu->alloc({R, H}, DType::f32), dhc = cpu->alloc({R, H}, DType::f32);
      Tensor dwc = cpu->alloc({E, D, H}, DType::f32);
      cpu->fill(dwc, 0.0f);
      SavedExpertOperand sxc = cpu->alloc_saved_expert_operand(R, D, E, r.act), sac = cpu->alloc_saved_expert_operand(R, H, E, r.act);
      QuantizedExperts c1 = experts_operand(*cpu, E, H, D, r.weight), c2 = experts_operand(*cpu, E, D, H, r.weight);
      QuantizedExperts c2t = experts_operand(*cpu, E, H, D, r.weight);
      cpu->quantize_experts_fp8(w1.c, false, c1);
      cpu->quantize_experts_fp8_pair(w2.c, c2, c2t);
      ExpertRelu2Fold back_c;
      back_c.relu2_input = &hc;
      cpu->grouped_matmul_fp8_saving(x.c, r.act, c1, hc, off.c, sxc);
      cpu->grouped_matmul_fp8_saving(hc, r.act, c2, yc, off.c, sac, nullptr, down);
      cpu->grouped_matmul_backward_fp8(dy.c, fmt, r.act, c2t, sac, dhc, dwc, off.c, nullptr, back_c);
      std::vector<float> yr = cpu->read(yc), dhr = cpu->read(dhc);
      yr.resize(size_t(used * D));
      dhr.resize(size_t(used * H));
      EXPECT_LT(nerr(used_rows(y2), yr), 5e-2) << what << " y against the CPU (seed " << seed << ")";
      EXPECT_LT(nerr(dh, dhr), 5e-2) << what << " dh against the CPU (seed " << seed << ")";
    }
}

TEST_F(CudaFp8Grouped, ReplayFromAGraphFollowsNewOffsetsOnTheDevice) {
  // Captured once, replayed after the routing changed: the kernels read offsets (and every
  // scale) on the device, so the replay gives the eager result for the new experts' rows.
  const int64_t N = 256, K = 384;
  Pair off = offsets(offsets_of(counts));
  for (const GroupedRecipe& r : kGroupedRecipes) {
    Pair a = both({R, K}, spread(R, K)), w = both({E, N, K}, values(E * N * K, 0.05));
    Pair dy = both({R, N}, spread(R, N));
    Tensor c = gpu->alloc({R, N}, DType::bf16), dw = gpu->alloc({E, N, K}, DType::f32);
    auto body = [&] {
      gpu->fill(dw, 0.0f);
      gpu->grouped_matmul_fp8(a.g, DType::e4m3, r.act, w.g, true, r.weight, c, off.g);
      gpu->grouped_matmul_wgrad_fp8(dy.g, DType::e5m2, a.g, r.act, dw, off.g);
    };
    body();  // eager warm-up sizes the scratch buffers
    CudaGraph graph(*gpu);
    graph.capture(body);
    const std::vector<int32_t> moved = offsets_of({64, 300, 0, 17, 259});
    gpu->write_i32(off.g, moved);
    cpu->write_i32(off.c, moved);
    graph.replay();
    const std::vector<float> c_replay = gpu->read(c), dw_replay = gpu->read(dw);
    body();
    EXPECT_EQ(nerr(c_replay, gpu->read(c)), 0.0) << fp8_granularity_name(r.act);
    EXPECT_EQ(nerr(dw_replay, gpu->read(dw)), 0.0) << fp8_granularity_name(r.act);
    Tensor cc = cpu->alloc({R, N}, DType::f32);
    cpu->grouped_matmul_fp8(a.c, DType::e4m3, r.act, w.c, true, r.weight, cc, off.c);
    EXPECT_LT(nerr(c_replay, cpu->read(cc)), 1e-2) << fp8_granularity_name(r.act);
    gpu->write_i32(off.g, offsets_of(counts));
    cpu->write_i32(off.c, offsets_of(counts));
  }
}

}  // namespace
}  // namespace moelab
