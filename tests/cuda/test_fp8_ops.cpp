// The GPU's FP8 ops against the CPU emulation (backend.hpp's scaling rule): quantize_fp8 must
// give the same codes and scales bit for bit for every granularity, both formats and both
// orientations, edge cases included (all zeros, one huge value, Inf, denormals), and
// matmul_fp8 (cuBLASLt) must match the CPU's dequantize-then-f32 product for every supported
// scaling pair, forward (bf16 out) and weight-gradient style (f32 out, beta = 1), eagerly and
// replayed from a CUDA graph. Fresh random inputs each run; skips without a GPU.
#include <gtest/gtest.h>

#include <chrono>
#include <cmath>
#include <cstring>

#include "backend/cpu/cpu_backend.hpp"
#include "backend/cuda/cuda_backend.hpp"
#include "core/rng.hpp"
#include "normalized_error.hpp"

namespace moelab {
namespace {

const Fp8Granularity kAll[] = {Fp8Granularity::tensor, Fp8Granularity::row, Fp8Granularity::block_1x128,
                               Fp8Granularity::block_128x128};

class CudaFp8 : public ::testing::Test {
 protected:
  void SetUp() override {
    if (!CudaBackend::cuda_device_available()) GTEST_SKIP() << "no CUDA GPU on this machine";
    gpu = std::make_unique<CudaBackend>();
    cpu = std::make_unique<CpuBackend>(DType::f32, 2);
    seed = uint64_t(std::chrono::high_resolution_clock::now().time_since_epoch().count());
    rng = std::make_unique<Rng>(seed);
    RecordProperty("seed", std::to_string(seed));
  }
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
  std::unique_ptr<CudaBackend> gpu;
  std::unique_ptr<CpuBackend> cpu;
  std::unique_ptr<Rng> rng;
  uint64_t seed = 0;
};

TEST_F(CudaFp8, QuantizeMatchesCpuEmulationBitForBit) {
  // Partial 128-tiles in both directions.
  const int64_t xr = 272, xc = 400;
  const std::vector<float> v = spread(xr, xc);
  for (Fp8Granularity gr : kAll)
    for (DType fmt : {DType::e4m3, DType::e5m2})
      for (bool tr : {false, true})
        expect_identical(quantize_both(v, xr, xc, tr, gr, fmt),
                         std::string(fp8_granularity_name(gr)) + " " + dtype_name(fmt) + (tr ? " transposed" : ""));
}

TEST_F(CudaFp8, QuantizeEdgeCasesGiveFiniteScalesAsOnTheCpu) {
  const int64_t xr = 144, xc = 160;
  std::vector<std::pair<std::string, std::vector<float>>> cases;
  cases.push_back({"all zero", std::vector<float>(size_t(xr * xc), 0.0f)});
  auto huge = spread(xr, xc);
  huge[333] = round_to_bf16(3e38f);
  cases.push_back({"one huge value", huge});
  auto inf = spread(xr, xc);
  inf[4321] = -INFINITY;
  cases.push_back({"one infinity", inf});
  std::vector<float> denorm(size_t(xr * xc));
  for (size_t i = 0; i < denorm.size(); ++i) denorm[i] = round_to_bf16(float((i % 5) - 2) * 1e-39f);
  cases.push_back({"denormals", denorm});
  for (auto& [name, v] : cases)
    for (Fp8Granularity gr : kAll)
      for (DType fmt : {DType::e4m3, DType::e5m2})
        for (bool tr : {false, true})
          expect_identical(quantize_both(v, xr, xc, tr, gr, fmt),
                           name + " " + fp8_granularity_name(gr) + " " + dtype_name(fmt) + (tr ? " transposed" : ""));
}

struct PairCase {
  Fp8Granularity ga, gb;
  DType fa;
};

TEST_F(CudaFp8, MatmulMatchesCpuEmulationForEachRecipe) {
  const PairCase pairs[] = {{Fp8Granularity::tensor, Fp8Granularity::tensor, DType::e4m3},
                            {Fp8Granularity::tensor, Fp8Granularity::tensor, DType::e5m2},
                            {Fp8Granularity::row, Fp8Granularity::row, DType::e4m3},
                            {Fp8Granularity::row, Fp8Granularity::row, DType::e5m2},
                            {Fp8Granularity::block_1x128, Fp8Granularity::block_128x128, DType::e4m3},
                            {Fp8Granularity::block_1x128, Fp8Granularity::block_128x128, DType::e5m2},
                            {Fp8Granularity::block_1x128, Fp8Granularity::block_1x128, DType::e5m2}};
  const int64_t M = 256, N = 384;
  // K of 4 and 6 blocks of 128 (the 128x128 scales' row stride is padded to 4 blocks).
  for (int64_t K : {512, 768}) {
    for (const PairCase& p : pairs)
      for (bool f32_out : {false, true}) {
        const std::string what = "K " + std::to_string(K) + " " + std::string(fp8_granularity_name(p.ga)) + " x " + fp8_granularity_name(p.gb) + " " +
                                 dtype_name(p.fa) + (f32_out ? " -> f32, beta 1" : " -> bf16");
        Both a = quantize_both(spread(M, K), M, K, false, p.ga, p.fa);
        std::vector<float> wv(size_t(N * K));
        for (auto& x : wv) x = round_to_bf16(float(rng->normal() * 0.03));
        Both b = quantize_both(wv, N, K, false, p.gb, DType::e4m3);
        std::vector<float> init(size_t(M * N));
        for (auto& x : init) x = f32_out ? float(rng->normal()) : 0.0f;
        Tensor cc = cpu->alloc({M, N}, DType::f32), cg = gpu->alloc({M, N}, f32_out ? DType::f32 : DType::bf16);
        cpu->write(cc, init);
        gpu->write(cg, init);
        const float beta = f32_out ? 1.0f : 0.0f;
        cpu->matmul_fp8(a.c, b.c, cc, 0.75f, beta);
        try {
          gpu->matmul_fp8(a.g, b.g, cg, 0.75f, beta, /*fast_accum=*/!f32_out);
        } catch (const Error& e) {
          ADD_FAILURE() << what << ": " << e.what();
          continue;
        }
        const double e = nerr(gpu->read(cg), cpu->read(cc));
        EXPECT_LT(e, f32_out ? 2e-3 : 1e-2) << what;
      }
  }
}

TEST_F(CudaFp8, TransposedOperandsGiveTheBackwardProducts) {
  // dgrad dx = dy W and wgrad dW = dy^T x through transposed quantized copies, as LinearGemms
  // runs them, against the CPU doing the same.
  const int64_t T = 512, out = 256, in = 384;
  for (Fp8Granularity act : {Fp8Granularity::tensor, Fp8Granularity::row, Fp8Granularity::block_1x128}) {
    const Fp8Granularity w = act == Fp8Granularity::block_1x128 ? Fp8Granularity::block_128x128 : act;
    const std::vector<float> dy = spread(T, out), x = spread(T, in);
    std::vector<float> wv(size_t(out * in));
    for (auto& v : wv) v = round_to_bf16(float(rng->normal() * 0.05));
    // dgrad
    Both qa = quantize_both(dy, T, out, false, act, DType::e5m2);
    Both qb = quantize_both(wv, out, in, true, w, DType::e4m3);
    Tensor cc = cpu->alloc({T, in}, DType::f32), cg = gpu->alloc({T, in}, DType::bf16);
    cpu->matmul_fp8(qa.c, qb.c, cc);
    gpu->matmul_fp8(qa.g, qb.g, cg);
    EXPECT_LT(nerr(gpu->read(cg), cpu->read(cc)), 1e-2) << "dgrad " << fp8_granularity_name(act);
    // wgrad
    Both wa = quantize_both(dy, T, out, true, act, DType::e5m2);
    Both wb = quantize_both(x, T, in, true, act, DType::e4m3);
    Tensor dc = cpu->alloc({out, in}, DType::f32), dg = gpu->alloc({out, in}, DType::f32);
    cpu->fill(dc, 0.5f);
    gpu->fill(dg, 0.5f);
    cpu->matmul_fp8(wa.c, wb.c, dc, 1.0f, 1.0f);
    gpu->matmul_fp8(wa.g, wb.g, dg, 1.0f, 1.0f);
    EXPECT_LT(nerr(gpu->read(dg), cpu->read(dc)), 2e-3) << "wgrad " << fp8_granularity_name(act);
  }
}

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

}  // namespace
}  // namespace moelab
