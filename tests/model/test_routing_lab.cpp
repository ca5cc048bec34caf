// The routing lab in the model: the routing keys written out at their defaults give the same
// step bit for bit as a config that leaves them unset; the aux-loss-free bias is model state
// that end_step moves by the sign of each expert's load gap; the routing statistics are what
// their definitions say.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>

#include "backend/cpu/cpu_backend.hpp"
#include "core/rng.hpp"
#include "model/gpt.hpp"

namespace moelab {
namespace {

Config small_config() {
  Config c;
  c.model.d_model = 32;
  c.model.layers = 2;
  c.model.head_dim = 16;
  c.model.vocab = 64;
  c.model.max_seq = 16;
  c.moe.experts = 4;
  c.moe.top_k = 2;
  c.moe.expert_hidden = 24;
  c.train.batch_size = 2;
  c.train.seq_len = 8;
  return c;
}

struct Batch2 {
  Tensor tokens, targets;
};
Batch2 random_batch(CpuBackend& be, const Config& c, uint64_t seed) {
  Rng rng(seed);
  const int64_t n = c.train.batch_size * c.train.seq_len;
  std::vector<int32_t> tok, tgt;
  for (int64_t i = 0; i < n; ++i) {
    tok.push_back(int32_t(rng.below(uint64_t(c.model.vocab))));
    tgt.push_back(int32_t(rng.below(uint64_t(c.model.vocab))));
  }
  Batch2 b{be.alloc({n}, DType::i32), be.alloc({n}, DType::i32)};
  be.write_i32(b.tokens, tok);
  be.write_i32(b.targets, tgt);
  return b;
}

// Two micro-batches of forward/backward and their statistics; the gradients' bytes.
struct StepOut {
  StepStats stats;
  std::vector<std::vector<char>> grads;
};
StepOut run_step(const Config& cfg, uint64_t seed) {
  CpuBackend be(DType::f32, 2);
  GptMoE model(be, cfg, cfg.train.batch_size, cfg.train.seq_len);
  model.init_weights(seed, /*all_random=*/true);  // nonzero projections: the experts reach the loss
  model.begin_step();
  for (uint64_t m = 0; m < 2; ++m) {
    Batch2 b = random_batch(be, cfg, seed + 10 + m);
    model.forward_backward(b.tokens, b.targets, 1.0f / 32.0f, 0.5f);
  }
  model.end_step();
  StepOut out;
  out.stats = model.read_stats(2);
  for (const Param& p : model.params().params) {
    const char* d = static_cast<const char*>(p.grad.data);
    out.grads.emplace_back(d, d + p.grad.bytes());
  }
  return out;
}

TEST(RoutingLab, ExplicitDefaultsAreTheDefaultPathBitForBit) {
  const uint64_t seed = 1234 + uint64_t(std::time(nullptr) % 1000);
  SCOPED_TRACE("seed " + std::to_string(seed));
  Config implicit = small_config();
  Config explicit_ = small_config();
  for (const char* set : {"moe.score=softmax", "moe.norm_topk=true", "moe.route_scale=1.0", "moe.balance=aux_loss",
                          "moe.bias_update_rate=0.001", "moe.balance_scope=micro_batch", "moe.z_loss_coef=0.0",
                          "moe.shared_experts=0", "moe.groups=1", "moe.topk_groups=1"})
    apply_override(explicit_, set);
  validate_config(explicit_);
  const StepOut a = run_step(implicit, seed), b = run_step(explicit_, seed);
  EXPECT_EQ(a.stats.loss_sum, b.stats.loss_sum);
  EXPECT_EQ(a.stats.bal, b.stats.bal);
  EXPECT_GT(a.stats.bal, 0.0);
  EXPECT_EQ(a.grads, b.grads);
  // A non-default key changes the step (the comparison above can see a difference).
  Config sig = small_config();
  sig.moe.score = "sigmoid";
  const StepOut c = run_step(sig, seed);
  EXPECT_NE(c.stats.loss_sum, a.stats.loss_sum);
  EXPECT_NE(c.grads, a.grads);
}

TEST(RoutingLab, StatisticsFollowTheirDefinitions) {
  Config c = small_config();
  const StepOut o = run_step(c, 77);
  ASSERT_EQ(o.stats.max_vio.size(), 2u);
  ASSERT_EQ(o.stats.router_entropy.size(), 2u);
  EXPECT_TRUE(o.stats.bias_range.empty());  // only with aux_free
  for (size_t l = 0; l < 2; ++l) {
    // MaxVio from the loads as fractions: max / mean - 1 with mean = 1 / E.
    const auto& f = o.stats.expert_load[l];
    const double top = *std::max_element(f.begin(), f.end());
    EXPECT_NEAR(o.stats.max_vio[l], top * 4.0 - 1.0, 1e-6);
    EXPECT_GT(o.stats.router_entropy[l], 0.0);
    EXPECT_LE(o.stats.router_entropy[l], std::log(4.0) + 1e-6);
  }
  EXPECT_GT(o.stats.z_loss, 0.0);
}

TEST(RoutingLab, AuxFreeBiasIsStateMovedBySignOfLoadGap) {
  Config c = small_config();
  c.moe.balance = "aux_free";
  c.moe.bias_update_rate = 0.25;
  CpuBackend be(DType::f32, 2);
  GptMoE model(be, c, c.train.batch_size, c.train.seq_len);
  model.init_weights(5);
  std::vector<Param*> biases;
  for (Param& p : model.params().params)
    if (p.name.ends_with("mlp.router.score_bias")) {
      EXPECT_EQ(p.group, ParamGroup::buffer);
      biases.push_back(&p);
    }
  ASSERT_EQ(biases.size(), 2u);  // one per MoE layer, saved with the weights
  for (Param* p : biases)
    for (float v : be.read(p->value)) EXPECT_EQ(v, 0.0f);
  model.begin_step();
  Batch2 b = random_batch(be, c, 9);
  model.forward_backward(b.tokens, b.targets, 1.0f / 16.0f, 1.0f);
  model.end_step();
  const StepStats s = model.read_stats(1);
  EXPECT_EQ(s.bal, 0.0);  // aux_free carries no aux loss
  ASSERT_EQ(s.bias_range.size(), 2u);
  for (size_t l = 0; l < 2; ++l) {
    const auto& f = s.expert_load[l];
    const auto bias = be.read(biases[l]->value);
    double lo = 1e9, hi = -1e9;
    for (size_t e = 0; e < 4; ++e) {
      const double gap = 0.25 - f[e];  // mean fraction - fraction: the sign of mean load - load
      const double want = gap > 0 ? 0.25 : (gap < 0 ? -0.25 : 0.0);
      EXPECT_EQ(double(bias[e]), want) << "layer " << l << " expert " << e;
      lo = std::min(lo, double(bias[e]));
      hi = std::max(hi, double(bias[e]));
    }
    EXPECT_EQ(s.bias_range[l], hi - lo);
  }
  // The gradient never reaches the bias.
  for (Param* p : biases)
    for (float v : be.read(p->grad)) EXPECT_EQ(v, 0.0f);
}

TEST(RoutingLab, AuxFreeWithSequenceScopeAddsTheSequenceWiseLoss) {
  // DeepSeek-V3's pairing: the bias balances, and the complementary sequence-wise loss (at
  // balance_coef) keeps any one sequence from crowding an expert. Plain aux_free carries no loss.
  Config plain = small_config();
  plain.moe.balance = "aux_free";
  Config seq = plain;
  seq.moe.balance_scope = "sequence";
  seq.moe.balance_coef = 0.5;
  const StepOut a = run_step(plain, 31), b = run_step(seq, 31);
  EXPECT_EQ(a.stats.bal, 0.0);
  EXPECT_GT(b.stats.bal, 0.0);
  EXPECT_NE(a.grads, b.grads) << "the sequence-wise loss must reach the router's gradient";
  Config global = plain;
  global.moe.balance_scope = "global_batch";
  EXPECT_THROW(validate_config(global), Error);
}

}  // namespace
}  // namespace moelab
