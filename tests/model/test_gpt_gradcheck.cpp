// Whole-model gradient checks: the hand-written backward of GptMoE against central finite
// differences of the same forward, in f64 on the CPU backend, for tiny configs that exercise
// every path (dense and MoE layers, GQA, shared expert, router and balance loss, dropless and
// capacity dispatch with drops, and the seed's options: gated value embeddings, resid/x0
// lambdas, its balance loss and token-major drop order).
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>

#include "backend/cpu/cpu_backend.hpp"
#include "core/rng.hpp"
#include "model/gpt.hpp"
#include "common/config_builder.hpp"

namespace moelab {
namespace {

Config tiny_config(const std::string& dispatch, bool shared, const std::string& moe_layers) {
  // kv_heads 1: grouped-query, 2 query heads share one kv head; capacity factor 0.75 forces
  // drops in capacity mode.
  Config c = test::with_keys(Config{}, "model.d_model=16 model.layers=2 model.head_dim=8 model.kv_heads=1 model.vocab=24 "
                                       "model.mlp_hidden=20 model.max_seq=16 moe.experts=4 moe.top_k=2 moe.expert_hidden=12 "
                                       "moe.shared_hidden=10 moe.capacity_factor=0.75 moe.balance_coef=0.05 "
                                       "train.batch_size=2 train.seq_len=6");
  c.moe.layers = moe_layers;
  c.moe.shared_expert = shared;
  c.moe.dispatch = dispatch;
  return c;
}

struct Problem {
  std::vector<int32_t> tokens, targets;
};

Problem random_problem(const Config& c, uint64_t seed) {
  Rng rng(seed);
  Problem p;
  int64_t n = c.train.batch_size * c.train.seq_len;
  for (int64_t i = 0; i < n; ++i) {
    p.tokens.push_back(int32_t(rng.below(uint64_t(c.model.vocab))));
    // One ignored target checks the ignore path.
    p.targets.push_back(i == 3 ? -1 : int32_t(rng.below(uint64_t(c.model.vocab))));
  }
  return p;
}

// The scalar the backward differentiates: mean CE over valid targets + balance loss.
double total_loss(CpuBackend& be, GptMoE& model, const Tensor& tokens, const Tensor& targets, int64_t valid) {
  model.begin_step();
  model.forward_eval(tokens, targets);
  const double* l = model.losses().as<double>();
  double sum = 0;
  for (int64_t i = 0; i < model.losses().numel(); ++i) sum += l[i];
  StepStats s = model.read_stats(1);
  // The z-loss as differentiated: coef * sum over MoE layers of the mean logsumexp^2.
  const double z_term = model.config().moe.z_loss_coef * s.z_loss * double(s.router_entropy.size());
  return sum / double(valid) + s.bal_term + z_term;
}

void check_model_gradients(const Config& cfg, uint64_t seed, bool expect_drops) {
  CpuBackend be(DType::f64, 2);
  GptMoE model(be, cfg, cfg.train.batch_size, cfg.train.seq_len);
  model.init_weights(seed, /*all_random=*/true);
  // Buffers (the aux-loss-free router bias) start at zero; spread them so the biased choice differs
  // from the plain one.
  Rng bias_rng(seed + 3);
  for (auto& param : model.params().params)
    if (param.group == ParamGroup::buffer)
      for (int64_t i = 0; i < param.value.numel(); ++i) param.value.as<double>()[i] = 0.2 * bias_rng.normal();
  Problem p = random_problem(cfg, seed + 1);
  int64_t valid = 0;
  for (auto t : p.targets) valid += t >= 0;
  Tensor tokens = be.alloc({int64_t(p.tokens.size())}, DType::i32);
  Tensor targets = be.alloc({int64_t(p.targets.size())}, DType::i32);
  be.write_i32(tokens, p.tokens);
  be.write_i32(targets, p.targets);

  model.begin_step();
  model.forward_backward(tokens, targets, float(1.0 / double(valid)), 1.0f);
  StepStats stats = model.read_stats(1);
  ASSERT_TRUE(std::isfinite(stats.loss_sum));
  if (expect_drops) EXPECT_GT(stats.drop_rate, 0.0);
  else EXPECT_EQ(stats.drop_rate, 0.0);

  // Snapshot every analytic gradient: the probes below re-run the forward, which zeroes grads.
  std::vector<std::vector<double>> grads;
  for (auto& param : model.params().params)
    grads.emplace_back(param.grad.as<double>(), param.grad.as<double>() + param.grad.numel());

  // Probes drawn at random until six of them see a nonzero gradient (numeric or analytic): a
  // parameter whose probes all land where the gradient is zero (rows of tokens absent from the
  // batch, dropped assignments) would pass whatever its backward does. A parameter with no
  // nonzero probe in 200 draws fails: it is not being checked.
  Rng pick(seed + 2);
  const double h = 1e-6;
  const int wanted = 6, max_draws = 200;
  for (size_t pi = 0; pi < model.params().params.size(); ++pi) {
    Param& param = model.params().params[pi];
    if (param.group == ParamGroup::buffer) continue;  // state no gradient reaches
    const std::vector<double>& analytic = grads[pi];
    double err2 = 0, ref2 = 0;
    int nonzero = 0;
    for (int draw = 0; draw < max_draws && nonzero < wanted; ++draw) {
      int64_t i = int64_t(pick.below(uint64_t(param.value.numel())));
      double* w = param.value.as<double>() + i;
      const double saved = *w;
      *w = saved + h;
      double lp = total_loss(be, model, tokens, targets, valid);
      *w = saved - h;
      double lm = total_loss(be, model, tokens, targets, valid);
      *w = saved;
      double numeric = (lp - lm) / (2 * h);
      ASSERT_TRUE(std::isfinite(numeric)) << param.name;
      const double a = analytic[size_t(i)];
      // Entries the loss does not reach give exact zeros both ways; count only the others.
      if (std::fabs(numeric) > 1e-9 || a != 0.0) ++nonzero;
      err2 += (numeric - a) * (numeric - a);
      ref2 += numeric * numeric + a * a;
    }
    ASSERT_GT(nonzero, 0) << param.name << ": every probe landed on a zero gradient; the check saw nothing";
    double rel = std::sqrt(err2) / std::max(std::sqrt(ref2), 1e-12);
    EXPECT_LT(rel, 1e-5) << param.name << ": normalized gradient error " << rel << " over " << nonzero
                         << " nonzero probes";
  }
}

TEST(GptGradcheck, DroplessMixedDenseAndMoE) { check_model_gradients(tiny_config("dropless", false, "1"), 11, false); }

TEST(GptGradcheck, DroplessAllMoEWithSharedExpert) {
  check_model_gradients(tiny_config("dropless", true, "all"), 12, false);
}

TEST(GptGradcheck, CapacityWithDrops) { check_model_gradients(tiny_config("capacity", true, "all"), 13, true); }

// The routing lab's differentiable paths: sigmoid scores with raw or normalized gates and a
// route scale, the aux-loss-free bias on the choice, group-limited routing, N shared experts,
// the z-loss, and the balance loss per sequence and over the step.
Config lab_config(const std::string& score, bool norm_topk, const std::string& scope) {
  Config c = tiny_config("dropless", false, "all");
  c.moe.score = score;
  c.moe.norm_topk = norm_topk;
  c.moe.route_scale = 2.5;
  c.moe.balance_scope = scope;
  c.moe.z_loss_coef = 0.03;
  c.moe.shared_experts = 2;
  c.moe.groups = 2;
  c.moe.topk_groups = 1;
  return c;
}

TEST(GptGradcheck, RoutingLabSigmoidNormalizedPerSequence) {
  check_model_gradients(lab_config("sigmoid", true, "sequence"), 21, false);
}

TEST(GptGradcheck, RoutingLabSigmoidRawGlobalBatch) {
  check_model_gradients(lab_config("sigmoid", false, "global_batch"), 22, false);
}

TEST(GptGradcheck, RoutingLabSoftmaxRawAuxFreeBiasCapacity) {
  Config c = lab_config("softmax", false, "micro_batch");
  c.moe.balance = "aux_free";  // no aux loss; the bias moves the choice
  c.moe.dispatch = "capacity";
  c.moe.groups = 1;
  c.moe.topk_groups = 1;
  check_model_gradients(c, 23, true);
}

TEST(GptGradcheck, RoutingLabSigmoidAuxFreeGroups) {
  Config c = lab_config("sigmoid", true, "micro_batch");
  c.moe.balance = "aux_free";
  c.moe.z_loss_coef = 0.0;
  check_model_gradients(c, 24, false);
}

TEST(GptGradcheck, SlidingWindowLayers) {
  Config c = tiny_config("dropless", false, "all");
  c.model.window_pattern = "S";  // layer 0 sees seq_len / 2 = 3 keys back, layer 1 everything
  check_model_gradients(c, 15, false);
}

TEST(GptGradcheck, DenseModel) {
  Config c = tiny_config("dropless", false, "all");
  c.moe.experts = 0;
  check_model_gradients(c, 14, false);
}

// Every seed option at once: value embeddings (layers 0 and 2 of 3, the gate reading 8 of 16
// channels), the lambdas, the seed's balance loss and capacity with token-major drops.
Config seed_config() {
  Config c = tiny_config("capacity", false, "all");
  c.model.layers = 3;
  c.model.value_embeddings = true;
  c.model.ve_gate_channels = 8;
  c.model.scalar_lambdas = true;
  c.moe.balance_rule = "seed";
  c.moe.drop_order = "token";
  c.moe.router_init = "zero";
  return c;
}

TEST(GptGradcheck, SeedOptionsWithCapacityDrops) { check_model_gradients(seed_config(), 15, true); }

TEST(GptGradcheck, SeedOptionsDroplessMixedDense) {
  Config c = seed_config();
  c.moe.dispatch = "dropless";
  c.moe.layers = "1";
  check_model_gradients(c, 16, false);
}

TEST(Gpt, SeedParamsNamesShapesAndInit) {
  Config c = seed_config();
  CpuBackend be(DType::f32, 1);
  GptMoE model(be, c, 2, 6);
  model.init_weights(3);
  auto& t = model.params();
  // Alternating layers with the last included: 0 and 2 of 3.
  EXPECT_NE(t.find("value_embeds.0.weight"), nullptr);
  EXPECT_EQ(t.find("value_embeds.1.weight"), nullptr);
  ASSERT_NE(t.find("value_embeds.2.weight"), nullptr);
  EXPECT_EQ(t.get("value_embeds.2.weight").value.shape, (Shape{24, 8}));  // [vocab, kv_heads * head_dim]
  EXPECT_EQ(t.get("transformer.h.2.attn.ve_gate.weight").value.shape, (Shape{1, 8}));
  EXPECT_EQ(t.find("transformer.h.1.attn.ve_gate.weight"), nullptr);
  EXPECT_EQ(t.get("value_embeds.0.weight").group, ParamGroup::value_embedding);
  EXPECT_EQ(t.get("resid_lambdas").group, ParamGroup::scalar);
  for (float x : be.read(t.get("resid_lambdas").value)) EXPECT_EQ(x, 1.0f);
  for (float x : be.read(t.get("x0_lambdas").value)) EXPECT_EQ(x, 0.1f);
  for (float x : be.read(t.get("transformer.h.0.attn.ve_gate.weight").value)) EXPECT_EQ(x, 0.0f);
  for (float x : be.read(t.get("transformer.h.1.mlp.router.weight").value)) EXPECT_EQ(x, 0.0f);
  // Experts as the seed: w_fc uniform within sqrt(3 / d_model) (not all zero), w_proj zero.
  const double bound = std::sqrt(3.0 / 16.0);
  double max_abs = 0;
  for (float x : be.read(t.get("transformer.h.1.mlp.experts.w_fc").value)) max_abs = std::max(max_abs, double(std::fabs(x)));
  EXPECT_GT(max_abs, 0.5 * bound);
  EXPECT_LE(max_abs, bound);
  for (float x : be.read(t.get("transformer.h.1.mlp.experts.w_proj").value)) EXPECT_EQ(x, 0.0f);
}

TEST(Gpt, SeedBalanceLossIsKTimesSwitchAndLoggedWithoutCoefficient) {
  Config sw = tiny_config("dropless", false, "all");
  Config seed = sw;
  seed.moe.balance_rule = "seed";
  StepStats st[2];
  for (int i = 0; i < 2; ++i) {
    CpuBackend be(DType::f64, 1);
    GptMoE model(be, i ? seed : sw, 2, 6);
    model.init_weights(9, true);
    Problem p = random_problem(sw, 10);
    Tensor tokens = be.alloc({12}, DType::i32), targets = be.alloc({12}, DType::i32);
    be.write_i32(tokens, p.tokens);
    be.write_i32(targets, p.targets);
    model.begin_step();
    model.forward_eval(tokens, targets);
    st[i] = model.read_stats(1);
  }
  ASSERT_GT(st[0].bal, 0.0);
  const double k = double(sw.moe.top_k), coef = sw.moe.balance_coef;
  EXPECT_NEAR(st[0].bal_term, st[0].bal, 1e-15);               // switch: logged with coef
  EXPECT_NEAR(st[1].bal_term, k * st[0].bal_term, 1e-12);        // f sums to k instead of 1
  EXPECT_NEAR(st[1].bal, st[1].bal_term / coef, 1e-6 * st[1].bal);  // logged without the coefficient (coef is a float)
}

TEST(Gpt, NanochatNamesAndActiveParams) {
  Config c = tiny_config("dropless", false, "1");
  CpuBackend be(DType::f32, 1);
  GptMoE model(be, c, 2, 6);
  auto& t = model.params();
  EXPECT_NE(t.find("transformer.wte.weight"), nullptr);
  EXPECT_NE(t.find("lm_head.weight"), nullptr);
  EXPECT_NE(t.find("transformer.h.0.mlp.c_fc.weight"), nullptr);
  const Param* w_fc = t.find("transformer.h.1.mlp.experts.w_fc");
  ASSERT_NE(w_fc, nullptr);
  EXPECT_EQ(w_fc->value.shape, (Shape{4, 12, 16}));
  // Active: everything but the embedding, with 2 of 4 experts.
  int64_t total_nonembed = t.numel() - 24 * 16;
  int64_t inactive = 2 * (12 * 16) * 2;
  EXPECT_EQ(model.active_matmul_params(), total_nonembed - inactive);
}

TEST(Gpt, SameShapeParamsShareOneAllocationAndBeginStepZeroesAllGrads) {
  Config c = tiny_config("dropless", false, "all");
  c.model.layers = 3;
  CpuBackend be(DType::f32, 1);
  GptMoE model(be, c, 2, 6);
  auto& t = model.params();
  // Same-shape matrices follow each other in table order (c_k, c_v have another shape: GQA).
  const Param& q0 = t.get("transformer.h.0.attn.c_q.weight");
  const Param& proj0 = t.get("transformer.h.0.attn.c_proj.weight");
  const Param& q1 = t.get("transformer.h.1.attn.c_q.weight");
  const Param& fc0 = t.get("transformer.h.0.mlp.experts.w_fc");
  const Param& fc1 = t.get("transformer.h.1.mlp.experts.w_fc");
  ASSERT_EQ(q0.value.shape, proj0.value.shape);
  EXPECT_EQ(proj0.value.as<float>(), q0.value.as<float>() + q0.value.numel());
  EXPECT_EQ(q1.value.as<float>(), proj0.value.as<float>() + proj0.value.numel());
  EXPECT_EQ(q1.grad.as<float>(), proj0.grad.as<float>() + proj0.grad.numel());
  EXPECT_EQ(fc1.value.as<float>(), fc0.value.as<float>() + fc0.value.numel());
  // Every gradient is zero after begin_step, whatever was there.
  Rng rng(7);
  for (Param& p : t.params) {
    std::vector<float> g(size_t(p.grad.numel()));
    for (auto& x : g) x = float(rng.normal());
    be.write(p.grad, g);
  }
  model.begin_step();
  for (const Param& p : t.params)
    for (float x : be.read(p.grad)) ASSERT_EQ(x, 0.0f) << p.name;
}

TEST(Gpt, InitialLossNearLogVocab) {
  Config c = tiny_config("dropless", false, "all");
  c.model.vocab = 64;
  CpuBackend be(DType::f32, 2);
  GptMoE model(be, c, 2, 6);
  model.init_weights(5);
  Problem p = random_problem(c, 6);
  Tensor tokens = be.alloc({12}, DType::i32), targets = be.alloc({12}, DType::i32);
  be.write_i32(tokens, p.tokens);
  be.write_i32(targets, p.targets);
  model.begin_step();
  model.forward_backward(tokens, targets, 1.0f / 11.0f, 1.0f);
  StepStats s = model.read_stats(1);
  // lm_head starts near zero, so the first loss is close to ln(vocab).
  EXPECT_NEAR(s.loss_sum / 11.0, std::log(64.0), 0.05);
  ASSERT_EQ(s.expert_load.size(), 2u);
  double sum = 0;
  for (double f : s.expert_load[0]) sum += f;
  EXPECT_NEAR(sum, 1.0, 1e-6);
}

}  // namespace
}  // namespace moelab
