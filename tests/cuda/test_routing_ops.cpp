// The routing lab's ops on the GPU against the CPU reference: router_topk for every score, gate
// and group setting with and without the aux-loss-free bias, the dispatch plan (capacity and
// dropless), the balance loss over the micro-batch and per sequence, the router statistics, the
// router backward with the balance and z-loss terms, and the bias update. Each case runs eagerly
// and again inside a captured CUDA graph replayed on freshly written inputs (as a training step
// replays). Inputs are fresh random f32 values given to both backends; index outputs must match
// exactly, float outputs by normalized error. A failure names the case, the output and the seed.
// Skips cleanly without a GPU.
#include <gtest/gtest.h>

#include <chrono>
#include <cmath>
#include <sstream>

#include "backend/cpu/cpu_backend.hpp"
#include "backend/cuda/cuda_backend.hpp"
#include "core/rng.hpp"
#include "gpu_fixture.hpp"

namespace moelab {
namespace {

constexpr double kTol = 1e-4;  // f32 arithmetic on identical inputs, different summation orders

struct Case {
  std::string name;
  RouterSpec spec;
  bool bias = false;
  int64_t E = 16;
};

std::vector<Case> cases() {
  std::vector<Case> out;
  auto add = [&](const std::string& name, RouterScore score, int k, bool norm, float scale, int groups, int topk_groups,
                 bool bias, int64_t E) {
    Case c;
    c.name = name;
    c.spec.score = score;
    c.spec.k = k;
    c.spec.norm_topk = norm;
    c.spec.route_scale = scale;
    c.spec.groups = groups;
    c.spec.topk_groups = topk_groups;
    c.bias = bias;
    c.E = E;
    out.push_back(c);
  };
  add("softmax default", RouterScore::softmax, 2, true, 1.0f, 1, 1, false, 8);
  add("softmax raw scale 2.5 bias", RouterScore::softmax, 2, false, 2.5f, 1, 1, true, 16);
  add("sigmoid norm bias (DeepSeek-V3)", RouterScore::sigmoid, 8, true, 2.5f, 8, 4, true, 64);
  add("sigmoid raw groups", RouterScore::sigmoid, 4, false, 1.0f, 4, 2, false, 16);
  add("softmax norm groups bias", RouterScore::softmax, 3, true, 1.0f, 4, 3, true, 32);
  return out;
}

class CudaRouting : public ::testing::Test {
 protected:
  void SetUp() override {
    if (!CudaBackend::cuda_device_available()) GTEST_SKIP() << "no CUDA GPU on this machine";
    gpu = std::make_unique<CudaBackend>();
    cpu = std::make_unique<CpuBackend>(DType::f32, 2);
    seed = uint64_t(std::chrono::high_resolution_clock::now().time_since_epoch().count());
    rng = std::make_unique<Rng>(seed);
    RecordProperty("seed", std::to_string(seed));
  }
  std::vector<float> randn(int64_t n, float scale) {
    std::vector<float> v(static_cast<size_t>(n));
    for (auto& x : v) x = float(rng->normal()) * scale;
    return v;
  }
  std::unique_ptr<CudaBackend> gpu;
  std::unique_ptr<CpuBackend> cpu;
  std::unique_ptr<Rng> rng;
  uint64_t seed = 0;
};

// Every buffer of the routing chain on one backend.
struct Chain {
  Tensor logits, bias, probs, idx, gates, routed, counts, offsets, slot, row_token, bal, acc, dgates, dlogits, load;
  Chain(Backend& be, int64_t T, int64_t E, int k) {
    logits = be.alloc({T, E}, DType::f32);
    bias = be.alloc({E}, DType::f32);
    probs = be.alloc({T, E}, DType::f32);
    idx = be.alloc({T, k}, DType::i32);
    gates = be.alloc({T, k}, DType::f32);
    routed = be.alloc({E}, DType::i32);
    counts = be.alloc({E}, DType::i32);
    offsets = be.alloc({E + 1}, DType::i32);
    slot = be.alloc({T * k}, DType::i32);
    row_token = be.alloc({T * k}, DType::i32);
    bal = be.alloc({1}, DType::f32);
    acc = be.alloc({2}, DType::f32);
    dgates = be.alloc({T, k}, DType::f32);
    dlogits = be.alloc({T, E}, DType::f32);
    load = be.alloc({E}, DType::f32);
    // The GPU's outputs start poisoned, so an element a kernel never writes fails the comparison.
    if (be.device() == Device::cuda) {
      for (Tensor* t : {&probs, &gates, &bal, &dlogits}) be.fill(*t, NAN);
      for (Tensor* t : {&idx, &routed, &counts, &offsets, &slot}) be.fill(*t, -7777);
    }
  }
  void write_inputs(Backend& be, const std::vector<float>& lg, const std::vector<float>& b, const std::vector<float>& dg) {
    be.write(logits, lg);
    be.write(bias, b);
    be.write(dgates, dg);
  }
  // The step's routing work in order: route, plan, balance loss, statistics, backward, then the
  // bias update from the plan's loads (after the forward read the bias, as in a step).
  void run(Backend& be, const Case& c, int capacity, const BalanceSpec& bs) {
    be.router_topk(logits, c.spec, c.bias ? &bias : nullptr, probs, idx, gates);
    be.moe_plan(idx, int(c.E), capacity, routed, counts, offsets, slot, row_token);
    be.balance_loss(probs, idx, routed, bs, bal);
    be.fill(acc, 0.0f);
    be.router_stats(logits, probs, c.spec.score, acc);
    be.router_bwd(logits, probs, idx, gates, dgates, routed, c.spec, bs, dlogits);
    be.copy(routed, load);
    be.router_bias_update(load, 0.01f, bias);
  }
};

// Where two index outputs first differ, with the token's logits, for a readable failure.
std::string first_index_mismatch(const std::vector<int32_t>& g, const std::vector<int32_t>& c, int64_t k,
                                 const std::vector<float>& logits, int64_t E) {
  size_t bad = 0;
  int64_t first = -1;
  for (size_t i = 0; i < g.size() && i < c.size(); ++i)
    if (g[i] != c[i]) {
      ++bad;
      if (first < 0) first = int64_t(i);
    }
  if (g.size() != c.size()) return "sizes differ";
  if (bad == 0) return "";
  std::ostringstream os;
  const int64_t t = first / k;
  os << bad << " of " << g.size() << " differ; first at token " << t << ": gpu [";
  for (int64_t j = 0; j < k; ++j) os << (j ? " " : "") << g[size_t(t * k + j)];
  os << "] cpu [";
  for (int64_t j = 0; j < k; ++j) os << (j ? " " : "") << c[size_t(t * k + j)];
  os << "] logits [";
  for (int64_t e = 0; e < E; ++e) os << (e ? " " : "") << logits[size_t(t * E + e)];
  os << "] (a near tie of two scores can flip between f32 and the CPU's f64 math)";
  return os.str();
}

void compare(CudaBackend& gpu, CpuBackend& cpu, Chain& g, Chain& c, const Case& cs, int64_t E, int k,
             const std::vector<float>& logits, const std::string& tag) {
  gpu.synchronize();
  const std::string idx_msg = first_index_mismatch(gpu.read_i32(g.idx), cpu.read_i32(c.idx), k, logits, E);
  EXPECT_TRUE(idx_msg.empty()) << tag << ": topk_idx: " << idx_msg;
  if (!idx_msg.empty()) return;  // everything downstream follows the choice
  auto close = [&](const Tensor& a, const Tensor& b, const char* what, size_t row) {
    const std::vector<float> out = gpu.read(a), ref = cpu.read(b);
    EXPECT_LT(nerr(out, ref), kTol) << tag << ": " << what;
    EXPECT_LT(worst_row_nerr(out, ref, row), kRowTolFactor * kTol) << tag << ": " << what << " (worst row)";
  };
  close(g.probs, c.probs, "scores (probs)", size_t(E));
  close(g.gates, c.gates, "gates", size_t(k));
  struct IndexOut {
    const Tensor *a, *b;
    const char* what;
  };
  for (const IndexOut& o : {IndexOut{&g.routed, &c.routed, "plan routed"}, IndexOut{&g.counts, &c.counts, "plan counts"},
                            IndexOut{&g.offsets, &c.offsets, "plan offsets"}, IndexOut{&g.slot, &c.slot, "plan slot"}})
    EXPECT_EQ(gpu.read_i32(*o.a), cpu.read_i32(*o.b)) << tag << ": " << o.what;
  const int32_t kept = cpu.read_i32(c.offsets)[size_t(E)];
  const auto rg = gpu.read_i32(g.row_token), rc = cpu.read_i32(c.row_token);
  EXPECT_TRUE(std::equal(rc.begin(), rc.begin() + kept, rg.begin())) << tag << ": plan row_token";
  const float bal_g = gpu.read(g.bal)[0], bal_c = cpu.read(c.bal)[0];
  EXPECT_GT(bal_c, 0.f) << tag;
  EXPECT_NEAR(bal_g, bal_c, 1e-5 * std::fabs(bal_c)) << tag << ": balance loss";
  close(g.acc, c.acc, "router stats (entropy, z)", 1);
  close(g.dlogits, c.dlogits, "router_bwd dlogits", size_t(E));
  EXPECT_EQ(gpu.read(g.bias), cpu.read(c.bias)) << tag << ": bias after the update";
  (void)cs;
}

TEST_F(CudaRouting, ChainMatchesCpuEagerAndInGraph) {
  const int64_t L = 256, sequences = 4, T = L * sequences;
  for (const Case& cs : cases())
    for (int capacity_mode : {0, 1})
      for (int64_t seq_len : {int64_t(0), L}) {
        const int64_t E = cs.E;
        const int k = cs.spec.k;
        // Capacity at factor 1.0 drops assignments of the busier experts; 0 is dropless.
        const int capacity = capacity_mode ? int((T * k + E - 1) / E) : 0;
        BalanceSpec bs;
        bs.score = cs.spec.score;
        bs.coef = 0.01f;
        bs.grad_scale = 0.5f;
        bs.seq_len = seq_len;
        bs.z_coef = 0.001f;
        const std::string base = cs.name + (capacity ? ", capacity" : ", dropless") +
                                 (seq_len ? ", sequence scope" : ", micro-batch scope") + " (seed " +
                                 std::to_string(seed) + ")";
        Chain g(*gpu, T, E, k), c(*cpu, T, E, k);
        // Eager.
        auto lg = randn(T * E, 2.0f), b = randn(E, 0.05f), dg = randn(T * k, 1.0f);
        g.write_inputs(*gpu, lg, b, dg);
        c.write_inputs(*cpu, lg, b, dg);
        g.run(*gpu, cs, capacity, bs);
        c.run(*cpu, cs, capacity, bs);
        compare(*gpu, *cpu, g, c, cs, E, k, lg, "eager, " + base);
        // Captured once, replayed twice on new inputs.
        CudaGraph graph(*gpu);
        graph.capture([&] { g.run(*gpu, cs, capacity, bs); });
        for (int round = 0; round < 2; ++round) {
          lg = randn(T * E, 2.0f), b = randn(E, 0.05f), dg = randn(T * k, 1.0f);
          g.write_inputs(*gpu, lg, b, dg);
          c.write_inputs(*cpu, lg, b, dg);
          graph.replay();
          c.run(*cpu, cs, capacity, bs);
          compare(*gpu, *cpu, g, c, cs, E, k, lg, "graph replay " + std::to_string(round) + ", " + base);
        }
      }
}

// The bias update on its own, by hand: +rate below the mean load, -rate above, 0 at it.
TEST_F(CudaRouting, BiasUpdateBySign) {
  Tensor load = gpu->alloc({4}, DType::f32), bias = gpu->alloc({4}, DType::f32);
  gpu->write(load, {10.0f, 30.0f, 20.0f, 20.0f});
  gpu->write(bias, {0.5f, 0.5f, -0.25f, 0.0f});
  gpu->router_bias_update(load, 0.125f, bias);
  EXPECT_EQ(gpu->read(bias), (std::vector<float>{0.625f, 0.375f, -0.25f, 0.0f}));
}

// Float-to-i32 copy (the global-batch scope's running counts): rounds to nearest.
TEST_F(CudaRouting, CopyFloatToI32) {
  Tensor f = gpu->alloc({4}, DType::f32), i = gpu->alloc({4}, DType::i32);
  gpu->write(f, {3.0f, 1024.0f, 7.4f, 65536.0f});
  gpu->copy(f, i);
  EXPECT_EQ(gpu->read_i32(i), (std::vector<int32_t>{3, 1024, 7, 65536}));
}

}  // namespace
}  // namespace moelab
