// Every op of the CUDA backend against the CPU reference, forward and backward, on fresh random
// inputs (in the style of ggml's test-backend-ops). Inputs are drawn once, rounded to bf16 where
// the GPU stores bf16, and given to both backends, so a difference measures only the GPU op's own
// arithmetic. Outputs are compared by normalized error ||gpu - cpu|| / ||cpu||; NaN never passes.
// Index outputs (top-k, dispatch plan) must match exactly. Skips cleanly when there is no GPU.
#include <gtest/gtest.h>

#include <chrono>
#include <cmath>
#include <cstring>
#include <numeric>
#include <functional>
#include <random>

#include "backend/cpu/cpu_backend.hpp"
#include "backend/cuda/cuda_backend.hpp"
#include "backend/cuda/grouped_gemm.cuh"
#include "core/rng.hpp"
#include "optim/newton_schulz.hpp"
#include "normalized_error.hpp"

namespace moelab {
namespace {

constexpr double kBf16Tol = 1e-2;   // outputs stored in bf16, or computed from bf16 operands
constexpr double kF32Tol = 1e-4;    // f32 math on identical inputs

uint64_t fresh_seed() {
  return uint64_t(std::chrono::high_resolution_clock::now().time_since_epoch().count());
}

class CudaOps : public ::testing::Test {
 protected:
  void SetUp() override {
    if (!CudaBackend::cuda_device_available()) GTEST_SKIP() << "no CUDA GPU on this machine";
    gpu = std::make_unique<CudaBackend>();
    cpu = std::make_unique<CpuBackend>(DType::f32, 2);
    seed = fresh_seed();
    rng = std::make_unique<Rng>(seed);
    RecordProperty("seed", std::to_string(seed));
  }

  // A tensor on both backends with the same values: f32 on the CPU, `dt` on the GPU (values
  // rounded to bf16 first when dt is bf16).
  struct Pair {
    Tensor c, g;
  };
  std::vector<float> randn(int64_t n, float scale = 1.f) {
    std::vector<float> v(static_cast<size_t>(n));
    for (auto& x : v) x = float(rng->normal()) * scale;
    return v;
  }
  Pair pair_from(const Shape& s, DType dt, std::vector<float> v) {
    if (dt == DType::bf16)
      for (auto& x : v) x = round_to_bf16(x);
    Pair p{cpu->alloc(s, DType::f32), gpu->alloc(s, dt)};
    cpu->write(p.c, v);
    gpu->write(p.g, v);
    return p;
  }
  // A dense producer given a tensor amax (f32 [1], zeroed) must raise it to exactly the largest
  // |value| it wrote, as read back, and write what it wrote without one (`plain`).
  void expect_producer_amax(const std::function<void(const AmaxSink*)>& op, const Tensor& out,
                            const std::vector<float>& plain, const std::string& what) {
    Tensor amax = gpu->alloc({1}, DType::f32);
    gpu->fill(amax, 0.f);
    const AmaxSink sink{amax, {}};
    op(&sink);
    const std::vector<float> v = gpu->read(out);
    float want = 0.f;
    for (float f : v) want = std::max(want, std::fabs(f));
    EXPECT_EQ(gpu->read(amax)[0], want) << what << ": amax";
    EXPECT_GT(want, 0.f) << what;
    EXPECT_EQ(v, plain) << what << ": the output with an amax differs";
  }
  Pair rand_pair(const Shape& s, DType dt, float scale = 1.f) {
    int64_t n = 1;
    for (auto d : s) n *= d;
    return pair_from(s, dt, randn(n, scale));
  }
  Pair i32_pair(const Shape& s, const std::vector<int32_t>& v) {
    Pair p{cpu->alloc(s, DType::i32), gpu->alloc(s, DType::i32)};
    cpu->write_i32(p.c, v);
    gpu->write_i32(p.g, v);
    return p;
  }
  // Output buffers: CPU f32, GPU `dt`, the GPU one poisoned with NaN so unwritten elements fail.
  Pair out_pair(const Shape& s, DType dt) {
    Pair p{cpu->alloc(s, dt == DType::i32 ? DType::i32 : DType::f32), gpu->alloc(s, dt)};
    if (dt != DType::i32) gpu->fill(p.g, NAN);
    else gpu->fill(p.g, -7777);
    return p;
  }
  double err(const Pair& p) { return nerr(gpu->read(p.g), cpu->read(p.c)); }
  // The global normalized error within tol, and every row (the last dimension; elements of a
  // vector) within kRowTolFactor x tol of its own norm, so a few bad rows cannot hide in a
  // large output.
  void expect_close(const Pair& p, double tol, const std::string& what) {
    const std::vector<float> out = gpu->read(p.g), ref = cpu->read(p.c);
    EXPECT_LT(nerr(out, ref), tol) << what << " (seed " << seed << ")";
    const size_t row_len = p.c.ndim() >= 2 ? size_t(p.c.shape.back()) : 1;
    EXPECT_LT(worst_row_nerr(out, ref, row_len), kRowTolFactor * tol)
        << what << ": a row is off by more than " << kRowTolFactor << " x the tolerance (seed " << seed << ")";
  }
  void expect_equal_i32(const Pair& p, const std::string& what) {
    auto a = gpu->read_i32(p.g), b = cpu->read_i32(p.c);
    EXPECT_EQ(a, b) << what << " (seed " << seed << ")";
  }

  std::unique_ptr<CudaBackend> gpu;
  std::unique_ptr<CpuBackend> cpu;
  std::unique_ptr<Rng> rng;
  uint64_t seed = 0;
};

TEST(CudaDevice, NoGpuIsAClearError) {
  if (CudaBackend::cuda_device_available()) {
    CudaBackend b;
    EXPECT_FALSE(b.name().empty());
    EXPECT_EQ(b.act_dtype(), DType::bf16);
  } else {
    try {
      CudaBackend b;
      FAIL() << "constructing a CUDA backend without a GPU must throw";
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find("no CUDA GPU"), std::string::npos) << e.what();
    }
  }
}

TEST_F(CudaOps, ElementwiseAndReductions) {
  // 37 x 129 takes the scalar kernels; 64 x 136 (a multiple of 8) the 16-byte vector ones.
  for (const Shape& s : {Shape{37, 129}, Shape{64, 136}}) {
  SCOPED_TRACE("shape " + std::to_string(s[0]) + " x " + std::to_string(s[1]));
  auto x = rand_pair(s, DType::bf16), y = rand_pair(s, DType::f32);
  // copy bf16 -> f32 and f32 -> bf16
  auto c1 = out_pair(s, DType::f32);
  cpu->copy(x.c, c1.c);
  gpu->copy(x.g, c1.g);
  expect_close(c1, 1e-7, "copy bf16->f32");
  auto c2 = out_pair(s, DType::bf16);
  cpu->copy(y.c, c2.c);
  gpu->copy(y.g, c2.g);
  expect_close(c2, 5e-3, "copy f32->bf16");
  // copy i32 -> f32 (expert counts into float statistics)
  {
    std::vector<int32_t> counts(300);
    for (auto& v : counts) v = int32_t(rng->below(1 << 20)) - (1 << 19);
    Tensor ic = cpu->alloc({300}, DType::i32), ig = gpu->alloc({300}, DType::i32);
    cpu->write_i32(ic, counts);
    gpu->write_i32(ig, counts);
    auto c3 = out_pair({300}, DType::f32);
    cpu->copy(ic, c3.c);
    gpu->copy(ig, c3.g);
    expect_close(c3, 1e-12, "copy i32->f32");
  }
  // axpby into f32
  cpu->axpby(0.7f, x.c, -1.3f, y.c);
  gpu->axpby(0.7f, x.g, -1.3f, y.g);
  expect_close(y, kF32Tol, "axpby");
  // fill
  auto f = out_pair(s, DType::bf16);
  cpu->fill(f.c, 2.5f);
  gpu->fill(f.g, 2.5f);
  expect_close(f, 1e-12, "fill");
  // sum / sum_squares, with and without accumulation
  auto o = out_pair({1}, DType::f32);
  cpu->sum(x.c, o.c, false);
  gpu->sum(x.g, o.g, false);
  EXPECT_NEAR(gpu->read(o.g)[0], cpu->read(o.c)[0], 1e-3 * std::sqrt(double(x.c.numel())));
  cpu->sum_squares(x.c, o.c, true);
  gpu->sum_squares(x.g, o.g, true);
  expect_close(o, 1e-5, "sum_squares accumulate");
  // relu^2
  auto h = rand_pair(s, DType::bf16), a = out_pair(s, DType::bf16);
  cpu->relu2_fwd(h.c, a.c);
  gpu->relu2_fwd(h.g, a.g);
  expect_close(a, kBf16Tol, "relu2_fwd");
  auto da = rand_pair(s, DType::bf16), dh = out_pair(s, DType::bf16);
  cpu->relu2_bwd(h.c, da.c, dh.c);
  gpu->relu2_bwd(h.g, da.g, dh.g);
  expect_close(dh, kBf16Tol, "relu2_bwd");
  }
}

TEST_F(CudaOps, MatmulAllTransposesAndTypes) {
  const int64_t M = 96, N = 136, K = 200;
  for (int ta = 0; ta < 2; ++ta)
    for (int tb = 0; tb < 2; ++tb) {
      Shape sa = ta ? Shape{K, M} : Shape{M, K};
      Shape sb = tb ? Shape{N, K} : Shape{K, N};
      auto A = rand_pair(sa, DType::bf16), B = rand_pair(sb, DType::bf16);
      // bf16 out
      auto C = out_pair({M, N}, DType::bf16);
      cpu->matmul(A.c, ta, B.c, tb, C.c, 1.f, 0.f);
      gpu->matmul(A.g, ta, B.g, tb, C.g, 1.f, 0.f);
      expect_close(C, kBf16Tol, "matmul bf16 ta=" + std::to_string(ta) + " tb=" + std::to_string(tb));
      // f32 out with beta accumulation (weight-gradient style)
      auto D = rand_pair({M, N}, DType::f32);
      cpu->matmul(A.c, ta, B.c, tb, D.c, 0.5f, 1.f);
      gpu->matmul(A.g, ta, B.g, tb, D.g, 0.5f, 1.f);
      expect_close(D, 1e-4, "matmul f32 += ta=" + std::to_string(ta) + " tb=" + std::to_string(tb));
    }
  // f32 x f32 (TF32) and mixed f32 x bf16
  auto A = rand_pair({M, K}, DType::f32), B = rand_pair({N, K}, DType::f32), Bb = rand_pair({N, K}, DType::bf16);
  auto C = out_pair({M, N}, DType::f32);
  cpu->matmul(A.c, false, B.c, true, C.c);
  gpu->matmul(A.g, false, B.g, true, C.g);
  expect_close(C, 3e-3, "matmul f32 (tf32)");
  cpu->matmul(A.c, false, Bb.c, true, C.c);
  gpu->matmul(A.g, false, Bb.g, true, C.g);
  expect_close(C, kBf16Tol, "matmul f32 x bf16");
}

TEST_F(CudaOps, Embedding) {
  // Uniform over a few ids (runs shorter than a chunk), then skewed: one id takes ~40% of the
  // positions so its run crosses many chunk edges, as a space does in byte-level text.
  for (const bool skewed : {false, true}) {
    SCOPED_TRACE(skewed ? "skewed" : "uniform");
    const int64_t V = 300, D = 72, N = skewed ? 4099 : 517;
    std::vector<int32_t> tok(N);
    for (auto& t : tok) t = skewed && rng->uniform() < 0.4 ? 7 : int32_t(rng->below(40));
    tok[3] = V - 1;
    auto tokens = i32_pair({N}, tok);
    auto wte = rand_pair({V, D}, DType::f32);
    auto out = out_pair({N, D}, DType::bf16);
    cpu->embedding_fwd(tokens.c, wte.c, out.c);
    gpu->embedding_fwd(tokens.g, wte.g, out.g);
    expect_close(out, 5e-3, "embedding_fwd");
    auto dout = rand_pair({N, D}, DType::bf16);
    auto dwte = rand_pair({V, D}, DType::f32);
    cpu->embedding_bwd(tokens.c, dout.c, dwte.c);
    gpu->embedding_bwd(tokens.g, dout.g, dwte.g);
    expect_close(dwte, 1e-5, "embedding_bwd");
  }
}

TEST_F(CudaOps, RmsNormAndRopeNorm) {
  const int64_t B = 2, T = 45, H = 3;
  // 192, 768, 1032, 1280 and 2048 keep their rows in registers (1, 3, 5, 5 and 8 chunks per lane);
  // 2064 (over 2048) takes the streamed kernels, 100 (not a multiple of 8) the scalar ones.
  for (const int64_t D : {192, 768, 1032, 1280, 2048, 2064, 100}) {
    SCOPED_TRACE("D = " + std::to_string(D));
    auto x = rand_pair({B, T, D}, DType::bf16, 3.f);
    auto y = out_pair({B, T, D}, DType::bf16), r = out_pair({B, T}, DType::f32);
    cpu->rmsnorm_fwd(x.c, y.c, r.c);
    gpu->rmsnorm_fwd(x.g, y.g, r.g);
    expect_close(y, kBf16Tol, "rmsnorm_fwd y");
    expect_producer_amax([&](const AmaxSink* a) { gpu->rmsnorm_fwd(x.g, y.g, r.g, a); }, y.g, gpu->read(y.g),
                         "rmsnorm_fwd");
    expect_close(r, 1e-5, "rmsnorm_fwd rstd");
    auto dy = rand_pair({B, T, D}, DType::bf16);
    for (bool acc : {false, true})
      for (DType dxt : {DType::f32, DType::bf16}) {
        auto dx = rand_pair({B, T, D}, dxt);
        auto dx_again = pair_from({B, T, D}, dxt, gpu->read(dx.g));  // for the run with an amax
        cpu->rmsnorm_bwd(x.c, r.c, dy.c, dx.c, acc);
        gpu->rmsnorm_bwd(x.g, r.g, dy.g, dx.g, acc);
        expect_producer_amax([&](const AmaxSink* a) { gpu->rmsnorm_bwd(x.g, r.g, dy.g, dx_again.g, acc, a); },
                             dx_again.g, gpu->read(dx.g), std::string("rmsnorm_bwd ") + dtype_name(dxt));
        expect_close(dx, dxt == DType::f32 ? 1e-4 : kBf16Tol,
                     std::string("rmsnorm_bwd accumulate=") + (acc ? "1 " : "0 ") + dtype_name(dxt));
      }
  }
  // rope + qk norm: head_dim 64 and 128 take the lane-group kernels, 48 the one-warp-a-row ones.
  for (const int64_t hd : {64, 128, 48}) {
    SCOPED_TRACE("head_dim = " + std::to_string(hd));
    const int64_t S = 64;
    std::vector<float> cs(S * hd / 2), sn(S * hd / 2);
    for (int64_t t = 0; t < S; ++t)
      for (int64_t i = 0; i < hd / 2; ++i) {
        double f = double(t) / std::pow(10000.0, 2.0 * double(i) / double(hd));
        cs[t * hd / 2 + i] = float(std::cos(f));
        sn[t * hd / 2 + i] = float(std::sin(f));
      }
    auto cosp = pair_from({S, hd / 2}, DType::f32, cs), sinp = pair_from({S, hd / 2}, DType::f32, sn);
    auto q = rand_pair({B, T, H, hd}, DType::bf16, 2.f);
    auto qy = out_pair({B, T, H, hd}, DType::bf16), qr = out_pair({B, T, H}, DType::f32);
    cpu->rope_norm_fwd(q.c, cosp.c, sinp.c, qy.c, qr.c);
    gpu->rope_norm_fwd(q.g, cosp.g, sinp.g, qy.g, qr.g);
    expect_close(qy, kBf16Tol, "rope_norm_fwd y");
    expect_close(qr, 1e-5, "rope_norm_fwd rstd");
    auto dqy = rand_pair({B, T, H, hd}, DType::bf16), dq = out_pair({B, T, H, hd}, DType::bf16);
    cpu->rope_norm_bwd(q.c, cosp.c, sinp.c, qr.c, dqy.c, dq.c);
    gpu->rope_norm_bwd(q.g, cosp.g, sinp.g, qr.g, dqy.g, dq.g);
    expect_close(dq, kBf16Tol, "rope_norm_bwd");
    expect_producer_amax([&](const AmaxSink* a) { gpu->rope_norm_bwd(q.g, cosp.g, sinp.g, qr.g, dqy.g, dq.g, a); },
                         dq.g, gpu->read(dq.g), "rope_norm_bwd");
  }
}

TEST_F(CudaOps, Attention) {
  // hd 64 and 128 with bf16 run cuDNN or the own tensor-core kernels; the others the generic ones. The odd
  // shapes cover T not a multiple of the 64/128-row tiles, one head, kv_heads = 1, and windows
  // smaller than a tile, crossing tiles, and past T.
  struct Case {
    int64_t B, T, Hq, Hkv, hd;
    DType grad;
    int window;
  };
  const Case cases[] = {
      {2, 77, 4, 4, 64, DType::bf16, 0},    {1, 200, 6, 2, 64, DType::f32, 0},
      {1, 130, 6, 2, 32, DType::bf16, 0},   {1, 40, 2, 1, 128, DType::bf16, 0},
      {2, 333, 4, 2, 128, DType::bf16, 0},  {1, 257, 1, 1, 128, DType::f32, 0},
      {1, 300, 4, 1, 64, DType::bf16, 100}, {2, 333, 4, 2, 128, DType::bf16, 150},
      {1, 200, 2, 2, 128, DType::bf16, 7},  {1, 190, 3, 1, 64, DType::f32, 64},
      {1, 100, 2, 1, 128, DType::bf16, 500}, {1, 96, 2, 2, 96, DType::bf16, 30},
      {1, 70, 2, 1, 256, DType::bf16, 20},
  };
  // Each case on both tensor-core paths: automatic (cuDNN's fused engine where it plans the shape)
  // and the own kernels forced.
  using AK = CudaBackend::AttentionKernels;
  for (const AK path : {AK::automatic, AK::flash})
  for (const Case& cs : cases) {
    gpu->set_attention_kernels(path);
    const std::string tag = std::string(path == AK::flash ? "own kernels" : "automatic") + " T=" +
                            std::to_string(cs.T) + " Hq=" + std::to_string(cs.Hq) + " Hkv=" +
                            std::to_string(cs.Hkv) + " hd=" + std::to_string(cs.hd) + " window=" +
                            std::to_string(cs.window) + " grad " + dtype_name(cs.grad);
    auto q = rand_pair({cs.B, cs.T, cs.Hq, cs.hd}, DType::bf16);
    auto k = rand_pair({cs.B, cs.T, cs.Hkv, cs.hd}, DType::bf16);
    auto v = rand_pair({cs.B, cs.T, cs.Hkv, cs.hd}, DType::bf16);
    auto o = out_pair({cs.B, cs.T, cs.Hq, cs.hd}, DType::bf16), lse = out_pair({cs.B, cs.Hq, cs.T}, DType::f32);
    cpu->attention_fwd(q.c, k.c, v.c, o.c, lse.c, cs.window);
    gpu->attention_fwd(q.g, k.g, v.g, o.g, lse.g, cs.window);
    expect_close(o, kBf16Tol, "attention_fwd out " + tag);
    expect_close(lse, 1e-4, "attention_fwd lse " + tag);
    // Backward from the CPU's forward outputs (rounded to bf16 as the GPU stores them).
    auto oc = cpu->read(o.c);
    auto ob = pair_from(o.c.shape, DType::bf16, oc);
    auto lc = pair_from(lse.c.shape, DType::f32, cpu->read(lse.c));
    auto dout = rand_pair(o.c.shape, DType::bf16);
    auto dq = out_pair(q.c.shape, cs.grad), dk = out_pair(k.c.shape, cs.grad), dv = out_pair(v.c.shape, cs.grad);
    cpu->attention_bwd(q.c, k.c, v.c, ob.c, lc.c, dout.c, dq.c, dk.c, dv.c, cs.window);
    gpu->attention_bwd(q.g, k.g, v.g, ob.g, lc.g, dout.g, dq.g, dk.g, dv.g, cs.window);
    expect_close(dq, kBf16Tol, "attention_bwd dq " + tag);
    expect_close(dk, kBf16Tol, "attention_bwd dk " + tag);
    expect_close(dv, kBf16Tol, "attention_bwd dv " + tag);
  }
  gpu->set_attention_kernels(AK::automatic);
}

TEST_F(CudaOps, AttentionOverKvCache) {
  // Decoding's attention: Tq new queries (the last Tq of S positions) against a cache's keys and
  // values, as the CPU computes it. Tq = 1 is a decode step, Tq > 1 a prompt; S == Tq is the
  // whole sequence at once. Windows shorter than, equal to and past the span; grouped kv heads;
  // head dims the model serves (64, 128) and the generic ones; S beyond one pass of the block's
  // warps (8 x 4 keys) and not a multiple of it.
  struct Case {
    int64_t B, Tq, S, Hq, Hkv, hd;
    int window;
    DType dt;
  };
  const Case cases[] = {
      {1, 1, 1, 6, 6, 128, 0, DType::bf16},     {1, 1, 37, 6, 6, 128, 0, DType::bf16},
      {1, 1, 1000, 6, 2, 128, 0, DType::bf16},  {1, 1, 1000, 6, 2, 128, 255, DType::bf16},
      {1, 1, 300, 4, 1, 64, 7, DType::bf16},    {1, 17, 17, 4, 2, 64, 0, DType::bf16},
      {1, 40, 290, 4, 4, 64, 33, DType::bf16},  {2, 3, 129, 8, 2, 32, 0, DType::bf16},
      {1, 5, 70, 2, 1, 96, 4000, DType::bf16},  {1, 2, 90, 2, 2, 256, 20, DType::bf16},
      {1, 1, 64, 2, 1, 16, 0, DType::bf16},     {2, 4, 200, 4, 2, 64, 50, DType::f32},
  };
  for (const Case& cs : cases) {
    const std::string tag = "B=" + std::to_string(cs.B) + " Tq=" + std::to_string(cs.Tq) + " S=" +
                            std::to_string(cs.S) + " Hq=" + std::to_string(cs.Hq) + " Hkv=" + std::to_string(cs.Hkv) +
                            " hd=" + std::to_string(cs.hd) + " window=" + std::to_string(cs.window) + " " +
                            dtype_name(cs.dt);
    auto q = rand_pair({cs.B, cs.Tq, cs.Hq, cs.hd}, cs.dt);
    auto k = rand_pair({cs.B, cs.S, cs.Hkv, cs.hd}, cs.dt);
    auto v = rand_pair({cs.B, cs.S, cs.Hkv, cs.hd}, cs.dt);
    auto o = out_pair({cs.B, cs.Tq, cs.Hq, cs.hd}, cs.dt);
    cpu->attention_cached_fwd(q.c, k.c, v.c, o.c, cs.window);
    gpu->attention_cached_fwd(q.g, k.g, v.g, o.g, cs.window);
    expect_close(o, cs.dt == DType::bf16 ? kBf16Tol : kF32Tol, "attention_cached_fwd " + tag);
  }
  // Sharp scores (q scaled up): one key dominates each row, which an unshifted softmax would
  // overflow on; the online maxima must keep it finite and right.
  {
    auto q = rand_pair({1, 2, 4, 64}, DType::bf16, 40.f);
    auto k = rand_pair({1, 500, 2, 64}, DType::bf16, 4.f);
    auto v = rand_pair({1, 500, 2, 64}, DType::bf16);
    auto o = out_pair({1, 2, 4, 64}, DType::bf16);
    cpu->attention_cached_fwd(q.c, k.c, v.c, o.c, 0);
    gpu->attention_cached_fwd(q.g, k.g, v.g, o.g, 0);
    expect_close(o, kBf16Tol, "attention_cached_fwd with large scores");
  }
  // The model passes the first S rows of a longer cache (a view), and S == Tq equals attention_fwd.
  {
    const int64_t cap = 256, S = 100, Hkv = 2, hd = 128;
    auto kc = rand_pair({1, cap, Hkv, hd}, DType::bf16), vc = rand_pair({1, cap, Hkv, hd}, DType::bf16);
    auto upto = [&](const Tensor& t) { return t.view({cap, Hkv * hd}).rows_slice(0, S).view({1, S, Hkv, hd}); };
    auto q = rand_pair({1, S, 4, hd}, DType::bf16);
    auto o = out_pair({1, S, 4, hd}, DType::bf16), lse = out_pair({1, 4, S}, DType::f32);
    cpu->attention_fwd(q.c, upto(kc.c), upto(vc.c), o.c, lse.c, 30);
    gpu->attention_cached_fwd(q.g, upto(kc.g), upto(vc.g), o.g, 30);
    expect_close(o, kBf16Tol, "attention_cached_fwd on a cache view against attention_fwd");
  }
}

TEST_F(CudaOps, SoftcapCrossEntropy) {
  // The register-resident kernel: 1000 logits a row in one block, 32768 over a cluster of 4,
  // 50304 of 7 (the last block part-filled), 65536 of 8, 100000 of 7 at 8 chunks a thread; 1001
  // takes the scalar kernel.
  for (const int64_t V : {1000, 1001, 32768, 50304, 65536, 100000}) {
    SCOPED_TRACE("V = " + std::to_string(V));
    const int64_t N = 29;
    std::vector<int32_t> tg(N);
    for (auto& t : tg) t = int32_t(rng->below(uint64_t(V)));
    tg[4] = -1;
    tg[11] = -1;
    tg[12] = int32_t(V - 1);
    auto targets = i32_pair({N}, tg);
    // cap 15 shifts the log-sum-exp by cap; 0 (no cap) and 50 trade the row's maximum.
    for (const float cap : {15.f, 0.f, 50.f}) {
      SCOPED_TRACE("cap " + std::to_string(cap));
      for (DType dt : {DType::f32, DType::bf16}) {
        auto logits = rand_pair({N, V}, dt, 8.f);
        auto losses = out_pair({N}, DType::f32), dl = out_pair({N, V}, dt);
        cpu->softcap_xent(logits.c, targets.c, cap, 0.25f, losses.c, dl.c);
        gpu->softcap_xent(logits.g, targets.g, cap, 0.25f, losses.g, dl.g);
        expect_close(losses, 1e-4, std::string("softcap_xent losses ") + dtype_name(dt));
        expect_close(dl, dt == DType::f32 ? 1e-4 : kBf16Tol, std::string("softcap_xent dlogits ") + dtype_name(dt));
        expect_producer_amax([&](const AmaxSink* a) { gpu->softcap_xent(logits.g, targets.g, cap, 0.25f, losses.g, dl.g, a); },
                             dl.g, gpu->read(dl.g), std::string("softcap_xent ") + dtype_name(dt));
        // In place: dlogits aliases logits.
        auto alias_losses = out_pair({N}, DType::f32);
        gpu->softcap_xent(logits.g, targets.g, cap, 0.25f, alias_losses.g, logits.g);
        EXPECT_LT(nerr(gpu->read(logits.g), cpu->read(dl.c)), dt == DType::f32 ? 1e-4 : kBf16Tol) << "aliased";
        EXPECT_LT(nerr(gpu->read(alias_losses.g), cpu->read(losses.c)), 1e-4) << "aliased losses";
      }
    }
  }
}

// Router, plan (dropless and capacity), balance loss, permute, combine, grouped GEMMs, router bwd:
// the whole MoE layer path op by op.
TEST_F(CudaOps, MoeRoutingDispatchAndGroupedGemm) {
  const int64_t E = 6, k = 2, D = 64, Hd = 96;
  // 3000 tokens: more assignments than the combine backward's amax grid has warps, so they stride.
  // starved: no token picks expert 2, so every op below meets an expert with zero rows.
  for (bool starved : {false, true})
  for (int64_t T : {int64_t(300), int64_t(3000)})
  for (int capacity : {0, 70}) {
    const std::string tag = (capacity ? " (capacity 70, T " : " (dropless, T ") + std::to_string(T) +
                            (starved ? ", expert 2 starved)" : ")");
    std::vector<float> logit_values = randn(T * E, 2.f);
    if (starved)
      for (int64_t t = 0; t < T; ++t) logit_values[size_t(t * E + 2)] = -30.f;
    auto logits = pair_from({T, E}, DType::f32, logit_values);
    auto probs = out_pair({T, E}, DType::f32), gates = out_pair({T, k}, DType::f32);
    auto idx = out_pair({T, k}, DType::i32);
    cpu->router_topk(logits.c, int(k), probs.c, idx.c, gates.c);
    gpu->router_topk(logits.g, int(k), probs.g, idx.g, gates.g);
    expect_close(probs, 1e-5, "router probs" + tag);
    expect_equal_i32(idx, "router topk" + tag);
    expect_close(gates, 1e-5, "router gates" + tag);

    auto routed = out_pair({E}, DType::i32), counts = out_pair({E}, DType::i32),
         offsets = out_pair({E + 1}, DType::i32), slot = out_pair({T * k}, DType::i32),
         row_token = out_pair({T * k}, DType::i32);
    cpu->moe_plan(idx.c, int(E), capacity, routed.c, counts.c, offsets.c, slot.c, row_token.c);
    gpu->moe_plan(idx.g, int(E), capacity, routed.g, counts.g, offsets.g, slot.g, row_token.g);
    expect_equal_i32(routed, "plan routed" + tag);
    expect_equal_i32(counts, "plan counts" + tag);
    expect_equal_i32(offsets, "plan offsets" + tag);
    if (starved) EXPECT_EQ(cpu->read_i32(counts.c)[2], 0) << "expert 2 must receive no rows" << tag;
    expect_equal_i32(slot, "plan slot" + tag);
    const int32_t kept = cpu->read_i32(offsets.c)[size_t(E)];
    auto rt_g = gpu->read_i32(row_token.g), rt_c = cpu->read_i32(row_token.c);
    EXPECT_TRUE(std::equal(rt_c.begin(), rt_c.begin() + kept, rt_g.begin())) << "plan row_token" << tag;
    if (capacity) {
      EXPECT_LT(kept, T * k) << "capacity case must drop something to test the rule";
    }

    // A producer's AmaxSink on the GPU: exactly each expert's max |value| of the bf16 rows it
    // wrote, read back (the tail rows past offsets[E] excluded), raised from zero.
    const std::vector<int32_t> off_host = cpu->read_i32(offsets.c);
    auto check_amax = [&](const std::function<void(const AmaxSink*)>& op, const Tensor& out, const std::string& what) {
      AmaxSink a{gpu->alloc({E}, DType::f32), offsets.g};
      gpu->fill(a.amax, 0.0f);
      op(&a);
      const std::vector<float> v = gpu->read(out), got = gpu->read(a.amax);
      const int64_t C = out.cols();
      int64_t nonzero = 0;
      for (int64_t e = 0; e < E; ++e) {
        float want = 0.0f;
        for (int64_t i = int64_t(off_host[size_t(e)]) * C; i < int64_t(off_host[size_t(e) + 1]) * C; ++i)
          want = std::max(want, std::fabs(v[size_t(i)]));
        EXPECT_EQ(got[size_t(e)], want) << what << " expert " << e;
        nonzero += want > 0.0f;
      }
      EXPECT_GT(nonzero, 0) << what;
    };

    auto bal = out_pair({1}, DType::f32);
    cpu->balance_loss(probs.c, routed.c, 0.01f, bal.c);
    gpu->balance_loss(probs.g, routed.g, 0.01f, bal.g);
    expect_close(bal, 1e-5, "balance_loss" + tag);

    // permute -> expert GEMM up (trans_w) -> relu2 -> GEMM down (no trans) -> combine
    auto x = rand_pair({T, D}, DType::bf16);
    auto xp = out_pair({T * k, D}, DType::bf16);
    cpu->moe_permute(x.c, row_token.c, offsets.c, xp.c);
    gpu->moe_permute(x.g, row_token.g, offsets.g, xp.g);
    auto xpc = cpu->read(xp.c), xpg = gpu->read(xp.g);
    xpc.resize(size_t(kept) * D);
    xpg.resize(size_t(kept) * D);
    EXPECT_LT(nerr(xpg, xpc), 1e-7) << "moe_permute" << tag;
    gpu->fill(xp.g, 1e30f);  // the tail rows keep this
    check_amax([&](const AmaxSink* a) { gpu->moe_permute(x.g, row_token.g, offsets.g, xp.g, a); }, xp.g,
               "moe_permute amax" + tag);

    auto w1 = rand_pair({E, Hd, D}, DType::bf16, 0.2f);  // [E, N, K]
    auto w2 = rand_pair({E, Hd, D}, DType::bf16, 0.2f);  // [E, K, N] for the down projection
    auto h = out_pair({T * k, Hd}, DType::bf16);
    cpu->fill(h.c, 0.f);
    gpu->fill(h.g, 0.f);
    cpu->grouped_matmul(xp.c, w1.c, true, h.c, offsets.c);
    gpu->grouped_matmul(xp.g, w1.g, true, h.g, offsets.g);
    auto hc = cpu->read(h.c), hg = gpu->read(h.g);
    hc.resize(size_t(kept) * Hd);
    hg.resize(size_t(kept) * Hd);
    EXPECT_LT(nerr(hg, hc), kBf16Tol) << "grouped_matmul trans_w" << tag;
    EXPECT_LT(worst_row_nerr(hg, hc, size_t(Hd)), kRowTolFactor * kBf16Tol) << "grouped_matmul trans_w, worst row" << tag;
    // Continue from the CPU's values so each op is judged alone.
    auto hb = pair_from(h.c.shape, DType::bf16, cpu->read(h.c));
    auto yp = out_pair({T * k, D}, DType::f32);
    cpu->fill(yp.c, 0.f);
    gpu->fill(yp.g, 0.f);
    cpu->grouped_matmul(hb.c, w2.c, false, yp.c, offsets.c);
    gpu->grouped_matmul(hb.g, w2.g, false, yp.g, offsets.g);
    auto ypc = cpu->read(yp.c), ypg = gpu->read(yp.g);
    ypc.resize(size_t(kept) * D);
    ypg.resize(size_t(kept) * D);
    EXPECT_LT(nerr(ypg, ypc), kBf16Tol) << "grouped_matmul no trans, f32 out" << tag;
    EXPECT_LT(worst_row_nerr(ypg, ypc, size_t(D)), kRowTolFactor * kBf16Tol) << "grouped_matmul no trans, worst row" << tag;

    {  // ReLU² and its backward over the experts' rows, with their amax
      auto act = out_pair({T * k, Hd}, DType::bf16), dact = rand_pair({T * k, Hd}, DType::bf16);
      auto dhh = out_pair({T * k, Hd}, DType::bf16);
      check_amax([&](const AmaxSink* a) { gpu->relu2_fwd(hb.g, act.g, a); }, act.g, "relu2_fwd amax" + tag);
      cpu->relu2_fwd(hb.c, act.c);
      expect_close(act, kBf16Tol, "relu2_fwd with amax" + tag);
      check_amax([&](const AmaxSink* a) { gpu->relu2_bwd(hb.g, dact.g, dhh.g, a); }, dhh.g, "relu2_bwd amax" + tag);
      cpu->relu2_bwd(hb.c, dact.c, dhh.c);
      expect_close(dhh, kBf16Tol, "relu2_bwd with amax" + tag);
    }
    auto ypb = pair_from(yp.c.shape, DType::bf16, cpu->read(yp.c));
    for (bool acc : {false, true}) {
      auto y = rand_pair({T, D}, DType::bf16);
      cpu->moe_combine(ypb.c, slot.c, gates.c, y.c, acc);
      gpu->moe_combine(ypb.g, slot.g, gates.g, y.g, acc);
      expect_close(y, kBf16Tol, std::string("moe_combine accumulate=") + (acc ? "1" : "0") + tag);
    }
    auto dy = rand_pair({T, D}, DType::bf16);
    auto dyp = out_pair({T * k, D}, DType::bf16), dgates = out_pair({T, k}, DType::f32);
    cpu->moe_combine_bwd(dy.c, ypb.c, slot.c, gates.c, dyp.c, dgates.c);
    gpu->moe_combine_bwd(dy.g, ypb.g, slot.g, gates.g, dyp.g, dgates.g);
    expect_close(dgates, 1e-3, "moe_combine_bwd dgates" + tag);
    auto dypc = cpu->read(dyp.c), dypg = gpu->read(dyp.g);
    dypc.resize(size_t(kept) * D);
    dypg.resize(size_t(kept) * D);
    EXPECT_LT(nerr(dypg, dypc), kBf16Tol) << "moe_combine_bwd dyp" << tag;
    EXPECT_LT(worst_row_nerr(dypg, dypc, size_t(D)), kRowTolFactor * kBf16Tol) << "moe_combine_bwd dyp, worst row" << tag;
    gpu->fill(dyp.g, 1e30f);
    const std::vector<float> dgates_plain = gpu->read(dgates.g);
    gpu->fill(dgates.g, 1e30f);
    check_amax([&](const AmaxSink* a) { gpu->moe_combine_bwd(dy.g, ypb.g, slot.g, gates.g, dyp.g, dgates.g, a); },
               dyp.g, "moe_combine_bwd amax" + tag);
    EXPECT_EQ(gpu->read(dgates.g), dgates_plain) << "moe_combine_bwd with amax: dgates" << tag;
    const std::vector<float> dyp_amax = gpu->read(dyp.g);
    EXPECT_EQ(std::vector<float>(dyp_amax.begin(), dyp_amax.begin() + kept * D),
              std::vector<float>(dypg.begin(), dypg.begin() + kept * D))
        << "moe_combine_bwd with amax: dyp" << tag;

    // weight gradients: dW [E, N, K] = dY^T X per expert, f32 with beta 0 and 1, and bf16
    auto dh = rand_pair({T * k, Hd}, DType::bf16);
    for (float beta : {0.f, 1.f}) {
      auto dw = rand_pair({E, Hd, D}, DType::f32);
      cpu->grouped_matmul_wgrad(dh.c, xp.c, dw.c, offsets.c, beta);
      gpu->grouped_matmul_wgrad(dh.g, xp.g, dw.g, offsets.g, beta);
      expect_close(dw, 1e-4, "grouped_matmul_wgrad f32 beta=" + std::to_string(beta) + tag);
    }
    auto dwb = out_pair({E, Hd, D}, DType::bf16);
    cpu->grouped_matmul_wgrad(dh.c, xp.c, dwb.c, offsets.c, 0.f);
    gpu->grouped_matmul_wgrad(dh.g, xp.g, dwb.g, offsets.g, 0.f);
    expect_close(dwb, kBf16Tol, "grouped_matmul_wgrad bf16" + tag);

    // permute backward
    auto dxp = rand_pair({T * k, D}, DType::bf16);
    auto dx = rand_pair({T, D}, DType::f32);
    cpu->moe_permute_bwd(dxp.c, slot.c, dx.c);
    gpu->moe_permute_bwd(dxp.g, slot.g, dx.g);
    expect_close(dx, 1e-5, "moe_permute_bwd" + tag);

    // router backward
    auto dg = rand_pair({T, k}, DType::f32);
    auto dl = out_pair({T, E}, DType::f32);
    cpu->router_bwd(probs.c, idx.c, gates.c, dg.c, routed.c, 0.01f, 2.f, dl.c);
    gpu->router_bwd(probs.g, idx.g, gates.g, dg.g, routed.g, 0.01f, 2.f, dl.g);
    expect_close(dl, 1e-4, "router_bwd" + tag);
  }
}

// The seed's token-major drop order: the same plan on both backends, and it differs from the
// rank order (so the flag reaches the kernel).
TEST_F(CudaOps, MoePlanTokenMajorDropOrder) {
  const int64_t T = 300, E = 6, k = 2;
  auto logits = rand_pair({T, E}, DType::f32, 2.f);
  auto probs = out_pair({T, E}, DType::f32), gates = out_pair({T, k}, DType::f32);
  auto idx = out_pair({T, k}, DType::i32);
  cpu->router_topk(logits.c, int(k), probs.c, idx.c, gates.c);
  gpu->router_topk(logits.g, int(k), probs.g, idx.g, gates.g);
  std::vector<int32_t> rank_slots;
  for (DropOrder order : {DropOrder::rank, DropOrder::token}) {
    auto routed = out_pair({E}, DType::i32), counts = out_pair({E}, DType::i32),
         offsets = out_pair({E + 1}, DType::i32), slot = out_pair({T * k}, DType::i32),
         row_token = out_pair({T * k}, DType::i32);
    cpu->moe_plan(idx.c, int(E), 70, routed.c, counts.c, offsets.c, slot.c, row_token.c, order);
    gpu->moe_plan(idx.g, int(E), 70, routed.g, counts.g, offsets.g, slot.g, row_token.g, order);
    expect_equal_i32(counts, "plan counts");
    expect_equal_i32(offsets, "plan offsets");
    expect_equal_i32(slot, "plan slot");
    const int32_t kept = cpu->read_i32(offsets.c)[size_t(E)];
    auto rt_g = gpu->read_i32(row_token.g), rt_c = cpu->read_i32(row_token.c);
    EXPECT_TRUE(std::equal(rt_c.begin(), rt_c.begin() + kept, rt_g.begin())) << "plan row_token";
    if (order == DropOrder::rank) rank_slots = cpu->read_i32(slot.c);
    else EXPECT_NE(rank_slots, cpu->read_i32(slot.c)) << "token-major order must differ from rank order here";
  }
}

// A fine-grained MoE's routing: 10,000 assignments span ten plan chunks and 40 experts two
// column blocks of the balance loss, so the cross-chunk ranks and the partial sums are exercised.
TEST_F(CudaOps, MoePlanAndBalanceLossOverManyChunks) {
  const int64_t T = 2500, E = 40, k = 4;
  auto logits = rand_pair({T, E}, DType::f32, 2.f);
  auto probs = out_pair({T, E}, DType::f32), gates = out_pair({T, k}, DType::f32);
  auto idx = out_pair({T, k}, DType::i32);
  cpu->router_topk(logits.c, int(k), probs.c, idx.c, gates.c);
  gpu->router_topk(logits.g, int(k), probs.g, idx.g, gates.g);
  expect_equal_i32(idx, "router topk");
  for (int capacity : {0, 200})
    for (DropOrder order : {DropOrder::rank, DropOrder::token}) {
      const std::string tag = " capacity " + std::to_string(capacity) + (order == DropOrder::token ? " token" : " rank");
      auto routed = out_pair({E}, DType::i32), counts = out_pair({E}, DType::i32),
           offsets = out_pair({E + 1}, DType::i32), slot = out_pair({T * k}, DType::i32),
           row_token = out_pair({T * k}, DType::i32);
      cpu->moe_plan(idx.c, int(E), capacity, routed.c, counts.c, offsets.c, slot.c, row_token.c, order);
      gpu->moe_plan(idx.g, int(E), capacity, routed.g, counts.g, offsets.g, slot.g, row_token.g, order);
      expect_equal_i32(routed, "plan routed" + tag);
      expect_equal_i32(counts, "plan counts" + tag);
      expect_equal_i32(offsets, "plan offsets" + tag);
      expect_equal_i32(slot, "plan slot" + tag);
      const int32_t kept = cpu->read_i32(offsets.c)[size_t(E)];
      if (capacity) {
        EXPECT_LT(kept, T * k) << "capacity 200 must drop something" << tag;
      }
      auto rt_g = gpu->read_i32(row_token.g), rt_c = cpu->read_i32(row_token.c);
      EXPECT_TRUE(std::equal(rt_c.begin(), rt_c.begin() + kept, rt_g.begin())) << "plan row_token" << tag;
      auto bal = out_pair({1}, DType::f32);
      cpu->balance_loss(probs.c, routed.c, 0.01f, bal.c);
      gpu->balance_loss(probs.g, routed.g, 0.01f, bal.g);
      expect_close(bal, 1e-5, "balance_loss" + tag);
    }
}

// The per-layer scalar mix and the gated value embedding, forward and backward, bf16 activations.
TEST_F(CudaOps, LambdaMixAndValueGate) {
  const int64_t N = 203, D = 96, H = 3, hd = 32, C = 32;
  auto a = rand_pair({1}, DType::f32), b = rand_pair({1}, DType::f32);
  auto x = rand_pair({N, D}, DType::bf16), x0 = rand_pair({N, D}, DType::bf16);
  auto y = out_pair({N, D}, DType::bf16);
  cpu->lambda_mix_fwd(a.c, x.c, b.c, x0.c, y.c);
  gpu->lambda_mix_fwd(a.g, x.g, b.g, x0.g, y.g);
  expect_close(y, kBf16Tol, "lambda_mix_fwd");
  auto dy = rand_pair({N, D}, DType::bf16), dx0 = rand_pair({N, D}, DType::bf16);
  auto da = rand_pair({1}, DType::f32), db = rand_pair({1}, DType::f32);
  // dx aliases dy, as the model calls it.
  cpu->lambda_mix_bwd(a.c, x.c, b.c, x0.c, dy.c, dy.c, dx0.c, da.c, db.c);
  gpu->lambda_mix_bwd(a.g, x.g, b.g, x0.g, dy.g, dy.g, dx0.g, da.g, db.g);
  expect_close(dy, kBf16Tol, "lambda_mix_bwd dx");
  expect_close(dx0, kBf16Tol, "lambda_mix_bwd dx0");
  expect_close(da, 1e-4, "lambda_mix_bwd da");
  expect_close(db, 1e-4, "lambda_mix_bwd db");

  auto w = rand_pair({H, C}, DType::bf16, 0.3f);
  auto ve = rand_pair({N, H * hd}, DType::bf16), v = rand_pair({N, H * hd}, DType::bf16);
  auto gate = out_pair({N, H}, DType::f32);
  cpu->value_gate_fwd(x.c, w.c, ve.c, v.c, gate.c);
  gpu->value_gate_fwd(x.g, w.g, ve.g, v.g, gate.g);
  expect_close(gate, 1e-4, "value_gate_fwd gate");
  expect_close(v, kBf16Tol, "value_gate_fwd v");
  auto dv = rand_pair({N, H * hd}, DType::bf16);
  auto dve = out_pair({N, H * hd}, DType::bf16);
  auto dw = rand_pair({H, C}, DType::f32);
  auto dx = rand_pair({N, D}, DType::bf16);
  cpu->value_gate_bwd(x.c, w.c, ve.c, gate.c, dv.c, dve.c, dw.c, dx.c);
  gpu->value_gate_bwd(x.g, w.g, ve.g, gate.g, dv.g, dve.g, dw.g, dx.g);
  expect_close(dve, kBf16Tol, "value_gate_bwd dve");
  expect_close(dw, 1e-3, "value_gate_bwd dw");
  expect_close(dx, kBf16Tol, "value_gate_bwd dx");
}

// NorMuon's tail on a tall and a wide stack (per-row and per-column statistics), cautious and not.
TEST_F(CudaOps, NorMuonUpdate) {
  for (const Shape& s : {Shape{3, 48, 24}, Shape{2, 16, 40}}) {
    for (bool cautious : {true, false}) {
      SCOPED_TRACE(std::string(s[1] >= s[2] ? "tall" : "wide") + (cautious ? ", cautious" : ""));
      auto x = rand_pair(s, DType::bf16, 0.1f);
      auto p = rand_pair(s, DType::f32);
      const int64_t kept = s[1] >= s[2] ? s[1] : s[2];
      std::vector<float> v0(size_t(s[0] * kept));
      for (auto& e : v0) e = float(std::fabs(rng->normal())) * 1e-2f;
      auto v2 = pair_from({s[0] * kept}, DType::f32, v0);
      NorMuonStep st;
      st.lr = 0.05f;
      st.weight_decay = 0.3f;
      st.cautious = cautious;
      for (int step = 0; step < 2; ++step) {
        cpu->normuon_update(x.c, v2.c, p.c, st);
        gpu->normuon_update(x.g, v2.g, p.g, st);
      }
      expect_close(v2, 1e-4, "normuon second moment");
      expect_close(p, 1e-4, "normuon params");
    }
  }
}

// The ReLU² epilogues of the grouped GEMM give the bits of the unfolded ops on the GPU (and the
// CPU's values): the up projection's forward storing h and relu²(h), and the down projection's
// data gradient storing relu2_bwd(h, dA) for W read in place (K a multiple of 64) and
// transposed first. Uneven experts, one empty; N = 136 leaves a partial column tile.
TEST_F(CudaOps, GroupedGemmRelu2EpiloguesAreTheUnfoldedOps) {
  const int64_t E = 5, R = 700, K = 192, N = 136;
  const std::vector<int32_t> off = {0, 0, 1, 250, 251, 640};
  auto offsets = i32_pair({E + 1}, off);
  auto bits_equal = [&](const Tensor& a, const Tensor& b, int64_t rows, const std::string& what) {
    std::vector<float> x = gpu->read(a), y = gpu->read(b);
    x.resize(size_t(rows * a.cols()));
    y.resize(size_t(rows * b.cols()));
    int64_t differ = 0;
    for (size_t i = 0; i < x.size(); ++i) differ += std::memcmp(&x[i], &y[i], sizeof(float)) != 0;
    EXPECT_EQ(differ, 0) << what << ": elements that differ from the unfolded ops";
  };
  auto close_to_cpu = [&](const Pair& p, int64_t rows, const std::string& what) {
    std::vector<float> c = cpu->read(p.c), g = gpu->read(p.g);
    c.resize(size_t(rows * p.c.cols()));
    g.resize(size_t(rows * p.c.cols()));
    EXPECT_LT(nerr(g, c), kBf16Tol) << what;
  };
  {  // up projection: C = A W^T with W [E, N, K], relu²(C) stored beside it
    auto A = rand_pair({R, K}, DType::bf16), W = rand_pair({E, N, K}, DType::bf16, 0.1f);
    auto h = out_pair({R, N}, DType::bf16), a = out_pair({R, N}, DType::bf16);
    Tensor h_ref = gpu->alloc({R, N}, DType::bf16), a_ref = gpu->alloc({R, N}, DType::bf16);
    ExpertRelu2Fold fold_c, fold_g;
    fold_c.relu2_output = &a.c;
    fold_g.relu2_output = &a.g;
    cpu->grouped_matmul_relu2(A.c, W.c, true, h.c, offsets.c, fold_c);
    gpu->grouped_matmul_relu2(A.g, W.g, true, h.g, offsets.g, fold_g);
    gpu->grouped_matmul(A.g, W.g, true, h_ref, offsets.g);
    gpu->relu2_fwd(h_ref, a_ref);
    bits_equal(h.g, h_ref, 640, "up projection h");
    bits_equal(a.g, a_ref, 640, "up projection relu2(h)");
    close_to_cpu(a, 640, "up projection relu2(h) against the CPU");
  }
  for (int64_t Kd : {256, 264}) {  // down projection's data gradient: dA = dY W[e], W [E, Kd, N]
    SCOPED_TRACE("K " + std::to_string(Kd));
    auto dY = rand_pair({R, Kd}, DType::bf16), W = rand_pair({E, Kd, N}, DType::bf16, 0.1f);
    auto h = rand_pair({R, N}, DType::bf16);
    auto dh = out_pair({R, N}, DType::bf16);
    Tensor da_ref = gpu->alloc({R, N}, DType::bf16), dh_ref = gpu->alloc({R, N}, DType::bf16);
    ExpertRelu2Fold fold_c, fold_g;
    fold_c.relu2_input = &h.c;
    fold_g.relu2_input = &h.g;
    cpu->grouped_matmul_relu2(dY.c, W.c, false, dh.c, offsets.c, fold_c);
    gpu->grouped_matmul_relu2(dY.g, W.g, false, dh.g, offsets.g, fold_g);
    gpu->grouped_matmul(dY.g, W.g, false, da_ref, offsets.g);
    gpu->relu2_bwd(h.g, da_ref, dh_ref);
    bits_equal(dh.g, dh_ref, 640, "down projection dh");
    close_to_cpu(dh, 640, "down projection dh against the CPU");
  }
  {  // the FP8 fields are refused here
    auto A = rand_pair({R, K}, DType::bf16), W = rand_pair({E, N, K}, DType::bf16, 0.1f);
    auto h = out_pair({R, N}, DType::bf16);
    ExpertRelu2Fold fp8_only;
    fp8_only.relu2_operand = true;
    EXPECT_THROW(gpu->grouped_matmul_relu2(A.g, W.g, true, h.g, offsets.g, fp8_only), Error);
  }
}

TEST_F(CudaOps, GroupedGemmUnevenAndEmptyExperts) {
  const int64_t E = 5, R = 700, N = 264, K = 136;
  // offsets with an empty expert, a one-row expert and spare rows past offsets[E]
  std::vector<int32_t> off = {0, 0, 1, 250, 251, 640};
  auto offsets = i32_pair({E + 1}, off);
  auto A = rand_pair({R, K}, DType::bf16), W = rand_pair({E, N, K}, DType::bf16, 0.1f);
  auto C = out_pair({R, N}, DType::bf16);
  cpu->fill(C.c, 0.f);
  cpu->grouped_matmul(A.c, W.c, true, C.c, offsets.c);
  gpu->grouped_matmul(A.g, W.g, true, C.g, offsets.g);
  auto cc = cpu->read(C.c), cg = gpu->read(C.g);
  cc.resize(size_t(640) * N);
  cg.resize(size_t(640) * N);
  EXPECT_LT(nerr(cg, cc), kBf16Tol) << "grouped uneven (seed " << seed << ")";
  EXPECT_LT(worst_row_nerr(cg, cc, size_t(N)), kRowTolFactor * kBf16Tol) << "grouped uneven, worst row (seed " << seed << ")";
  // The data gradient's product A W[e] with W [E, Kd, N]: Kd a multiple of 64 reads W in place
  // (MN-major), 264 takes the per-expert transpose. N = 136 leaves a partial column tile.
  for (int64_t Kd : {256, 264}) {
    auto Ad = rand_pair({R, Kd}, DType::bf16), Wd = rand_pair({E, Kd, K}, DType::bf16, 0.1f);
    auto Cd = out_pair({R, K}, DType::f32);
    cpu->fill(Cd.c, 0.f);
    gpu->fill(Cd.g, 0.f);
    cpu->grouped_matmul(Ad.c, Wd.c, false, Cd.c, offsets.c);
    gpu->grouped_matmul(Ad.g, Wd.g, false, Cd.g, offsets.g);
    auto dc = cpu->read(Cd.c), dg = gpu->read(Cd.g);
    dc.resize(size_t(640) * K);
    dg.resize(size_t(640) * K);
    EXPECT_LT(nerr(dg, dc), 1e-4) << "grouped uneven, W not transposed, K " << Kd << " (seed " << seed << ")";
    EXPECT_LT(worst_row_nerr(dg, dc, size_t(K)), kRowTolFactor * 1e-4) << "grouped uneven, W not transposed, worst row, K " << Kd;
  }
  auto dW = rand_pair({E, N, K}, DType::f32);
  auto dY = rand_pair({R, N}, DType::bf16);
  cpu->grouped_matmul_wgrad(dY.c, A.c, dW.c, offsets.c, 1.f);
  gpu->grouped_matmul_wgrad(dY.g, A.g, dW.g, offsets.g, 1.f);
  expect_close(dW, 1e-4, "grouped wgrad uneven");
}

TEST_F(CudaOps, Optimizers) {
  const Shape s{123, 77};
  AdamWStep st;
  st.lr = 0.01f;
  st.beta1 = 0.8f;
  st.weight_decay = 0.1f;
  st.eps = 1e-10f;
  st.step = 3;
  // 123 x 77 takes the one-element kernel, 64 x 136 the 8-wide one.
  for (const Shape& as : {s, Shape{64, 136}}) {
    SCOPED_TRACE(std::to_string(as[1]) + " columns");
    auto p = rand_pair(as, DType::f32), g = rand_pair(as, DType::f32), m = rand_pair(as, DType::f32, 0.1f);
    std::vector<float> vv = randn(p.c.numel(), 0.1f);
    for (auto& x : vv) x = x * x;
    auto v = pair_from(as, DType::f32, vv);
    cpu->adamw_update(p.c, g.c, m.c, v.c, st);
    gpu->adamw_update(p.g, g.g, m.g, v.g, st);
    expect_close(p, 1e-6, "adamw param");
    expect_close(m, 1e-6, "adamw m");
    expect_close(v, 1e-6, "adamw v");
  }
  // With an AmaxSink of parts: the same update, and each part's amax of the new weights as they are (3
  // parts, one with a large weight; and 300 parts, past the kernel's shared array).
  for (auto [parts, per] : {std::pair<int64_t, int64_t>{3, 120}, {300, 120}, {5, 77}}) {  // 77: the fallback
    const Shape gs{parts, per};
    auto gp = rand_pair(gs, DType::f32), gg = rand_pair(gs, DType::f32), gm = rand_pair(gs, DType::f32, 0.1f);
    auto gv = pair_from(gs, DType::f32, std::vector<float>(size_t(parts * per), 0.01f));
    std::vector<float> big = gpu->read(gp.g);
    big[size_t(per + 5)] = 30.0f;
    gpu->write(gp.g, big);
    Tensor amax = gpu->alloc({parts}, DType::f32);
    gpu->fill(amax, 0.0f);
    const AmaxSink sink{amax, {}};
    gpu->adamw_update(gp.g, gg.g, gm.g, gv.g, st, &sink);
    const std::vector<float> pw = gpu->read(gp.g), am = gpu->read(amax);
    int64_t wrong = 0;
    for (int64_t e = 0; e < parts; ++e) {
      float want = 0.0f;
      for (int64_t i = e * per; i < (e + 1) * per; ++i) want = std::max(want, std::fabs(pw[size_t(i)]));
      wrong += am[size_t(e)] != want;
    }
    EXPECT_EQ(wrong, 0) << parts << " parts of " << per;
    EXPECT_GT(am[1], 29.0f);
  }
  // Muon momentum: 123 x 77 takes the scalar kernel, 64 x 136 the 8-wide one.
  for (const Shape& ms : {s, Shape{64, 136}})
    for (bool nesterov : {true, false}) {
      auto mg = rand_pair(ms, DType::f32), mb = rand_pair(ms, DType::f32);
      auto mu_out = out_pair(ms, DType::bf16);
      cpu->muon_momentum(mg.c, mb.c, mu_out.c, 0.9f, nesterov);
      gpu->muon_momentum(mg.g, mb.g, mu_out.g, 0.9f, nesterov);
      expect_close(mb, 1e-6, std::string("muon_momentum buffer nesterov=") + (nesterov ? "1" : "0"));
      expect_close(mu_out, kBf16Tol, std::string("muon_momentum update nesterov=") + (nesterov ? "1" : "0"));
    }
  auto x = rand_pair(s, DType::bf16), y = out_pair(s, DType::bf16);
  cpu->frobenius_normalize(x.c, y.c, 1e-7f);
  gpu->frobenius_normalize(x.g, y.g, 1e-7f);
  expect_close(y, kBf16Tol, "frobenius_normalize");
  // Batched: each slice by its own norm; slice scales differ by 10^4 so a joint norm would fail.
  std::vector<float> sv = randn(5 * 24 * 40);
  for (size_t i = 0; i < sv.size(); ++i) sv[i] *= std::pow(10.f, float(i / (24 * 40)) - 2.f);
  auto xs = pair_from({5, 24, 40}, DType::bf16, sv), ys = out_pair({5, 24, 40}, DType::bf16);
  cpu->frobenius_normalize_batched(xs.c, ys.c, 1e-7f);
  gpu->frobenius_normalize_batched(xs.g, ys.g, 1e-7f);
  auto got = gpu->read(ys.g), want = cpu->read(ys.c);
  for (int64_t e = 0; e < 5; ++e) {
    const size_t per = 24 * 40;
    std::vector<float> a(got.begin() + e * per, got.begin() + (e + 1) * per),
        b(want.begin() + e * per, want.begin() + (e + 1) * per);
    EXPECT_LT(nerr(a, b), kBf16Tol) << "frobenius_normalize_batched slice " << e;
  }
}

// Every weight-gradient tile width (the backend picks one per shape) against the CPU, with
// uneven groups (one empty) and output columns that are not a multiple of the tile.
TEST_F(CudaOps, GroupedWgradEveryTileWidth) {
  const int E = 4, N = 200, K = 328;
  const std::vector<int32_t> off = {0, 70, 70, 301, 333};
  auto offsets = i32_pair({E + 1}, off);
  auto dy = rand_pair({333, N}, DType::bf16), x = rand_pair({333, K}, DType::bf16);
  for (int tile : {128, 192, 256})
    for (float beta : {0.f, 1.f}) {
      auto dw = rand_pair({E, N, K}, DType::f32);
      cpu->grouped_matmul_wgrad(dy.c, x.c, dw.c, offsets.c, beta);
      grouped_gemm::wgrad_sm90_tma(dy.g.as<__nv_bfloat16>(), x.g.as<__nv_bfloat16>(), dw.g.data, dw.g.dtype, offsets.g.as<int32_t>(), E,
                                   333, N, K, beta, gpu->stream(), tile);
      expect_close(dw, 1e-4, "wgrad tile " + std::to_string(tile) + " beta " + std::to_string(beta));
    }
  EXPECT_EQ(grouped_gemm::wgrad_tile_n(8, 1536, 768, 132), 192);  // the seed's w_fc gradient
}

// A weight gradient over no rows at all (every expert empty, e.g. a rank that received no
// tokens): the output is beta dW (or the addend), from the one kernel that path launches
// (grouped_wgrad_kernel), in f32 and bf16, as the CPU gives it.
TEST_F(CudaOps, GroupedWgradOverNoRowsIsBetaTimesTheOld) {
  const int E = 3, N = 64, K = 96;
  auto offsets = i32_pair({E + 1}, {0, 0, 0, 0});
  auto dy = rand_pair({0, N}, DType::bf16), x = rand_pair({0, K}, DType::bf16);
  for (DType dt : {DType::f32, DType::bf16})
    for (float beta : {0.f, 0.5f, 1.f}) {
      const std::string what = std::string("no rows, ") + dtype_name(dt) + ", beta " + std::to_string(beta);
      auto dw = rand_pair({E, N, K}, dt);
      const std::vector<float> before = cpu->read(dw.c);
      cpu->grouped_matmul_wgrad(dy.c, x.c, dw.c, offsets.c, beta);
      gpu->grouped_matmul_wgrad(dy.g, x.g, dw.g, offsets.g, beta);
      const std::vector<float> got = gpu->read(dw.g);
      ASSERT_EQ(got.size(), before.size());
      size_t wrong = 0;
      for (size_t i = 0; i < got.size(); ++i) wrong += got[i] != beta * before[i];  // exact: beta is a power of 2 or 0
      EXPECT_EQ(wrong, 0u) << what;
      expect_close(dw, 1e-7, what + " against the CPU");
    }
  // beta 1 with an addend elsewhere: dW = addend.
  auto dw = rand_pair({E, N, K}, DType::f32), addend = rand_pair({E, N, K}, DType::f32);
  gpu->grouped_matmul_wgrad(dy.g, x.g, dw.g, offsets.g, 1.f, &addend.g);
  EXPECT_EQ(gpu->read(dw.g), gpu->read(addend.g)) << "no rows with an addend";
}

// The fused sums Newton-Schulz uses: C = alpha A W^T + beta addend (bf16, separate and in place)
// and dW = dY^T X + beta addend.
TEST_F(CudaOps, GroupedMatmulAlphaBetaAddend) {
  const int E = 3, N = 64, K = 96;
  const std::vector<int32_t> off = {0, 40, 40, 150};
  auto offsets = i32_pair({E + 1}, off);
  auto a = rand_pair({150, K}, DType::bf16), w = rand_pair({E, N, K}, DType::bf16);
  auto addend = rand_pair({150, N}, DType::bf16), c = out_pair({150, N}, DType::bf16);
  cpu->grouped_matmul(a.c, w.c, true, c.c, offsets.c, 0.5f, -2.0f, &addend.c);
  gpu->grouped_matmul(a.g, w.g, true, c.g, offsets.g, 0.5f, -2.0f, &addend.g);
  expect_close(c, kBf16Tol, "grouped_matmul alpha/beta/addend");
  cpu->grouped_matmul(a.c, w.c, true, addend.c, offsets.c, 1.0f, 3.4445f, &addend.c);
  gpu->grouped_matmul(a.g, w.g, true, addend.g, offsets.g, 1.0f, 3.4445f, &addend.g);
  expect_close(addend, kBf16Tol, "grouped_matmul addend in place");
  auto dy = rand_pair({150, N}, DType::bf16), x = rand_pair({150, K}, DType::bf16);
  auto base = rand_pair({E, N, K}, DType::bf16), dw = out_pair({E, N, K}, DType::bf16);
  cpu->grouped_matmul_wgrad(dy.c, x.c, dw.c, offsets.c, 3.4445f, &base.c);
  gpu->grouped_matmul_wgrad(dy.g, x.g, dw.g, offsets.g, 3.4445f, &base.g);
  expect_close(dw, kBf16Tol, "grouped_matmul_wgrad addend");
}

// Muon's batched Newton-Schulz through the grouped GEMMs, against the CPU backend running the
// same ops in f32: router-like stacks (8 rows, inner products of size 8), wide and tall stacks.
TEST_F(CudaOps, BatchedNewtonSchulzMatchesCpu) {
  const std::vector<NewtonSchulz::StackShape> stacks = {{12, 8, 768}, {6, 64, 64}, {4, 40, 96}, {4, 96, 40}};
  NewtonSchulz ns_cpu(*cpu, stacks), ns_gpu(*gpu, stacks);
  for (const auto& st : stacks) {
    SCOPED_TRACE(std::to_string(st.count) + " x " + std::to_string(st.m) + " x " + std::to_string(st.n));
    ns_cpu.prepare_batched(st.count, st.m, st.n);
    ns_gpu.prepare_batched(st.count, st.m, st.n);
    auto g = rand_pair({st.count, st.m, st.n}, DType::f32);
    const Tensor xc = ns_cpu.run_batched(g.c, 5), xg = ns_gpu.run_batched(g.g, 5);
    // bf16 iterates on the GPU drift from the f32 ones over five steps; the result is still the
    // same near-orthogonal matrix to a few percent.
    EXPECT_LT(nerr(gpu->read(xg), cpu->read(xc)), 3e-2);
  }
}

// A captured sequence (plan -> permute -> grouped GEMM) replayed on new inputs written into the
// same buffers must match the CPU on those new inputs: the graph reads offsets on the device.
// A graph re-recorded every step with new launch arguments (the optimizer's learning rate) and
// updated in place, recorded while the stream is still busy with earlier work.
TEST_F(CudaOps, GraphRecaptureTakesNewScalars) {
  const Shape s{512, 384};
  auto x = rand_pair(s, DType::f32), y = rand_pair(s, DType::f32);
  auto a = rand_pair({1024, 1024}, DType::bf16), c = out_pair({1024, 1024}, DType::f32);
  CudaGraph graph(*gpu);
  for (int round = 0; round < 4; ++round) {
    const float alpha = 0.5f + 0.25f * float(round), beta = 1.0f - 0.1f * float(round);
    gpu->matmul(a.g, false, a.g, true, c.g);  // keeps the stream busy while the host records
    graph.recapture([&] { gpu->axpby(alpha, x.g, beta, y.g); });
    graph.replay();
    cpu->axpby(alpha, x.c, beta, y.c);
    gpu->synchronize();
    expect_close(y, kF32Tol, ("axpby round " + std::to_string(round)).c_str());
  }
}

TEST_F(CudaOps, GraphCaptureReplaysWithDeviceOffsets) {
  const int64_t T = 256, E = 4, k = 2, D = 64, Hd = 128;
  Tensor idx = gpu->alloc({T, k}, DType::i32), x = gpu->alloc({T, D}, DType::bf16);
  Tensor w = gpu->alloc({E, Hd, D}, DType::bf16);
  Tensor routed = gpu->alloc({E}, DType::i32), counts = gpu->alloc({E}, DType::i32),
         offsets = gpu->alloc({E + 1}, DType::i32), slot = gpu->alloc({T * k}, DType::i32),
         row_token = gpu->alloc({T * k}, DType::i32), xp = gpu->alloc({T * k, D}, DType::bf16),
         h = gpu->alloc({T * k, Hd}, DType::f32);
  auto body = [&] {
    gpu->moe_plan(idx, int(E), 0, routed, counts, offsets, slot, row_token);
    gpu->moe_permute(x, row_token, offsets, xp);
    gpu->grouped_matmul(xp, w, true, h, offsets);
  };
  CudaGraph graph(*gpu);
  for (int round = 0; round < 3; ++round) {
    std::vector<int32_t> iv(size_t(T * k));
    for (int64_t t = 0; t < T; ++t) {
      int32_t a = int32_t(rng->below(E)), b = int32_t((a + 1 + rng->below(E - 1)) % E);
      if (round == 2) a = 0, b = 1 + int32_t(t % 2);  // very skewed routing
      iv[size_t(t * k)] = a;
      iv[size_t(t * k + 1)] = b;
    }
    auto xv = randn(T * D), wv = randn(E * Hd * D, 0.1f);
    for (auto& f : xv) f = round_to_bf16(f);
    for (auto& f : wv) f = round_to_bf16(f);
    gpu->write_i32(idx, iv);
    gpu->write(x, xv);
    gpu->write(w, wv);
    if (round == 0) {
      body();  // warm-up: grows scratch buffers before capture
      graph.capture(body);
    }
    graph.replay();
    gpu->synchronize();
    // CPU reference
    Tensor ci = cpu->alloc({T, k}, DType::i32), cx = cpu->alloc({T, D}, DType::f32),
           cw = cpu->alloc({E, Hd, D}, DType::f32);
    cpu->write_i32(ci, iv);
    cpu->write(cx, xv);
    cpu->write(cw, wv);
    Tensor cr = cpu->alloc({E}, DType::i32), cc = cpu->alloc({E}, DType::i32), co = cpu->alloc({E + 1}, DType::i32),
           cs = cpu->alloc({T * k}, DType::i32), ct = cpu->alloc({T * k}, DType::i32),
           cxp = cpu->alloc({T * k, D}, DType::f32), chh = cpu->alloc({T * k, Hd}, DType::f32);
    cpu->moe_plan(ci, int(E), 0, cr, cc, co, cs, ct);
    cpu->moe_permute(cx, ct, co, cxp);
    cpu->grouped_matmul(cxp, cw, true, chh, co);
    EXPECT_EQ(gpu->read_i32(offsets), cpu->read_i32(co)) << "round " << round;
    EXPECT_LT(nerr(gpu->read(h), cpu->read(chh)), 1e-2) << "round " << round << " (seed " << seed << ")";
  }
}

TEST_F(CudaOps, PeakMemoryIsTracked) {
  gpu->synchronize();
  gpu->reset_peak_memory();
  size_t before = gpu->peak_memory_bytes();
  {
    Tensor big = gpu->alloc({64, 1 << 20}, DType::f32);  // 256 MiB
    EXPECT_GE(gpu->peak_memory_bytes(), before + (size_t(256) << 20));
  }
  EXPECT_LT(gpu->current_memory_bytes(), before + (size_t(1) << 20));
  EXPECT_GE(gpu->peak_memory_bytes(), before + (size_t(256) << 20));
}

}  // namespace
}  // namespace moelab
