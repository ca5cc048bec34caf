// Config loading, overrides and validation: every bad input names its key and the fix.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdlib>

#include "core/error.hpp"
#include "config/config.hpp"
#include "common/test_support.hpp"

namespace moelab {
namespace {

using test::error_of;

TEST(Config, ParsesSectionsAndTypes) {
  Config c = config_from_toml_text(R"(
device = "cpu"
[model]
d_model = 128
layers = 4
[moe]
experts = 4
top_k = 2
layers = [1, 3]
capacity_factor = 2
[train]
steps = 7
)", "test.toml");
  EXPECT_EQ(c.device, "cpu");
  EXPECT_EQ(c.model.d_model, 128);
  EXPECT_EQ(c.train.steps, 7);
  EXPECT_DOUBLE_EQ(c.moe.capacity_factor, 2.0);  // an integer is accepted for a float key
  EXPECT_EQ(c.moe.layers, "1,3");
  auto mask = c.moe_layer_mask();
  EXPECT_EQ(mask, (std::vector<bool>{false, true, false, true}));
}

TEST(Config, UnknownKeyNamesKeyAndSuggests) {
  auto msg = error_of([] { config_from_toml_text("[moe]\nexperts_count = 3\n", "x.toml"); });
  EXPECT_NE(msg.find("x.toml"), std::string::npos);
  EXPECT_NE(msg.find("moe.experts_count"), std::string::npos);
  EXPECT_NE(msg.find("moe.experts"), std::string::npos);  // suggestion
}

TEST(Config, WrongTypeNamesKey) {
  auto msg = error_of([] { config_from_toml_text("[train]\nsteps = \"ten\"\n", "x.toml"); });
  EXPECT_NE(msg.find("train.steps"), std::string::npos);
  EXPECT_NE(msg.find("integer"), std::string::npos);
}

TEST(Config, SyntaxErrorHasLine) {
  auto msg = error_of([] { config_from_toml_text("[train]\nsteps = = 3\n", "x.toml"); });
  EXPECT_NE(msg.find("x.toml:2"), std::string::npos);
}

TEST(Config, OverridesParseByType) {
  Config c;
  apply_override(c, "train.steps=20");
  apply_override(c, "moe.dispatch=capacity");  // bare word for a string key
  apply_override(c, "moe.capacity_factor=1.5");
  apply_override(c, "moe.shared_expert=true");
  EXPECT_EQ(c.train.steps, 20);
  EXPECT_EQ(c.moe.dispatch, "capacity");
  EXPECT_DOUBLE_EQ(c.moe.capacity_factor, 1.5);
  EXPECT_TRUE(c.moe.shared_expert);
  EXPECT_NE(error_of([&] { apply_override(c, "train.steps=abc"); }).find("train.steps"), std::string::npos);
  EXPECT_NE(error_of([&] { apply_override(c, "train.stepz=1"); }).find("unknown config key"), std::string::npos);
  EXPECT_NE(error_of([&] { apply_override(c, "nonsense"); }).find("section.key=value"), std::string::npos);
}

struct BadCase {
  std::string set, key;
};

TEST(Config, ValidationNamesKeyForEachInconsistency) {
  const std::vector<BadCase> cases = {
      {"model.head_dim=100", "model.d_model"},       // 768 % 100 != 0
      {"moe.top_k=9", "moe.top_k"},                  // > experts
      {"moe.balance_rule=gshard", "moe.balance_rule"},
      {"moe.drop_order=random", "moe.drop_order"},
      {"moe.router_init=normal", "moe.router_init"},
      {"optim.muon_variant=adam", "optim.muon_variant"},
      {"optim.weight_decay_schedule=cosine", "optim.weight_decay_schedule"},
      {"train.total_batch_tokens=100000", "train.total_batch_tokens"},  // not a multiple of 16 * 1024
      {"train.total_batch_tokens=-1", "train.total_batch_tokens"},
      {"train.seq_len=4096", "train.seq_len"},       // over the rotary table
      {"moe.dispatch=sometimes", "moe.dispatch"},
      {"model.kv_heads=5", "model.kv_heads"},
      {"device=tpu", "device"},
      {"moe.layers=0,99", "moe.layers"},
      {"train.steps=0", "train.steps"},
      {"precision=fp4", "precision"},
      {"optim.matrix_optimizer=sgd", "optim.matrix_optimizer"},
      {"optim.matrix_adamw_lr=0", "optim.matrix_adamw_lr"},
      {"model.window_pattern=SSXL", "model.window_pattern"},
      {"model.window_pattern=", "model.window_pattern"},
      {"moe.score=tanh", "moe.score"},
      {"moe.balance=loss", "moe.balance"},
      {"moe.balance_scope=epoch", "moe.balance_scope"},
      {"moe.groups=3", "moe.groups"},                // 8 experts in 3 groups
      {"moe.topk_groups=2", "moe.topk_groups"},      // more than groups = 1
      {"moe.shared_experts=-1", "moe.shared_experts"},
  };
  for (auto& bc : cases) {
    Config c;
    // A key's own range is checked as it is set; cross-key rules when the whole config is validated.
    auto msg = error_of([&] {
      apply_override(c, bc.set);
      validate_config(c);
    });
    EXPECT_NE(msg.find(bc.key), std::string::npos) << bc.set << " gave: " << msg;
  }
  Config ok;
  EXPECT_NO_THROW(validate_config(ok));
}

// Routing-lab rules that span two keys: the message names both, and the fix.
TEST(Config, RoutingLabCrossKeyRules) {
  Config c;
  c.moe.shared_expert = true;
  c.moe.shared_experts = 2;
  std::string msg = error_of([&] { validate_config(c); });
  EXPECT_NE(msg.find("moe.shared_experts"), std::string::npos) << msg;
  EXPECT_NE(msg.find("moe.shared_expert "), std::string::npos) << msg;
  c.moe.shared_experts = 1;  // the alias agrees
  EXPECT_NO_THROW(validate_config(c));
  EXPECT_EQ(c.moe.shared_count(), 1);
  Config g;
  g.moe.experts = 8;
  g.moe.top_k = 4;
  g.moe.groups = 4;
  g.moe.topk_groups = 1;  // 2 experts left for top_k = 4
  msg = error_of([&] { validate_config(g); });
  EXPECT_NE(msg.find("moe.topk_groups"), std::string::npos) << msg;
  EXPECT_NE(msg.find("moe.top_k"), std::string::npos) << msg;
  g.moe.topk_groups = 2;
  EXPECT_NO_THROW(validate_config(g));
}

// Every real key is finite and within the range its line of the key table gives, checked as it
// is loaded (TOML or --set) and again by validate_config for a Config built in code; the error
// names the key and the range, never a later symptom ("loss is NaN ... lower optim.matrix_lr").
TEST(Config, EveryRealKeyIsFiniteAndInItsRange) {
  const std::vector<std::pair<std::string, std::string>> bad = {
      {"optim.adam_beta1", "2"},          {"optim.adam_eps", "-1"},      {"optim.muon_momentum", "5"},
      {"train.final_lr_frac", "2"},       {"model.init_scale", "0"},     {"model.init_scale", "-1"},
      {"moe.capacity_factor", "nan"},     {"model.rope_base", "nan"},    {"optim.adam_beta2", "1.5"},
      {"optim.matrix_lr", "inf"},         {"optim.matrix_lr", "nan"},    {"optim.muon_momentum_start", "1"},
      {"train.peak_flops", "-1"},         {"optim.scalar_lr", "-inf"},   {"data.val_fraction", "1"},
  };
  for (const auto& [key, value] : bad) {
    const auto dot = key.find('.');
    const std::string toml = "[" + key.substr(0, dot) + "]\n" + key.substr(dot + 1) + " = " + value + "\n";
    const std::string from_toml = error_of([&] { config_from_toml_text(toml, "bad.toml"); });
    Config c;
    const std::string from_set = error_of([&] { apply_override(c, key + "=" + value); });
    for (const std::string& msg : {from_toml, from_set}) {
      EXPECT_NE(msg.find("invalid config: " + key + " = "), std::string::npos) << key << "=" << value << " gave: " << msg;
      EXPECT_NE(msg.find("must be finite and in "), std::string::npos) << msg;
      EXPECT_EQ(msg.find("must not be negative"), std::string::npos) << msg;
    }
    EXPECT_NE(from_toml.find("bad.toml"), std::string::npos) << from_toml;
  }
  // The range text itself, for a closed, a half-open and an open-ended key.
  Config c;
  EXPECT_NE(error_of([&] { apply_override(c, "optim.adam_beta1=2"); }).find("[0, 1)"), std::string::npos);
  EXPECT_NE(error_of([&] { apply_override(c, "train.final_lr_frac=2"); }).find("[0, 1]"), std::string::npos);
  EXPECT_NE(error_of([&] { apply_override(c, "model.init_scale=0"); }).find("(0, inf)"), std::string::npos);

  // A Config built in code is held to the same ranges by validate_config.
  Config coded;
  coded.optim.adam_beta2 = 1.5;
  EXPECT_NE(error_of([&] { validate_config(coded); }).find("optim.adam_beta2"), std::string::npos);
  coded = Config{};
  coded.model.rope_base = std::nan("");
  EXPECT_NE(error_of([&] { validate_config(coded); }).find("model.rope_base"), std::string::npos);

  // NaN is refused for every real key (a real key's resolved value is written with a '.' or an
  // exponent), and the boundary values the ranges allow still load.
  int real_keys = 0;
  for (const auto& [key, value] : config_flat(Config{})) {
    char* end = nullptr;
    std::strtod(value.c_str(), &end);
    if (value.empty() || *end != '\0' || value.find_first_of(".e") == std::string::npos) continue;
    ++real_keys;
    Config n;
    EXPECT_NE(error_of([&] { apply_override(n, key + "=nan"); }).find(key), std::string::npos) << key;
  }
  EXPECT_GE(real_keys, 25);
  Config edge;
  EXPECT_NO_THROW(apply_override(edge, "optim.adam_beta1=0"));
  EXPECT_NO_THROW(apply_override(edge, "train.final_lr_frac=1"));
  EXPECT_NO_THROW(apply_override(edge, "moe.capacity_factor=-1"));
  EXPECT_NO_THROW(validate_config(edge));
  // --help-config shows each real key's range beside its doc.
  EXPECT_NE(config_reference().find("AdamW beta1 (in [0, 1))"), std::string::npos);
}

TEST(Config, CapacityFactorAtOrBelowZeroTurnsCapacityOff) {
  for (const char* cf : {"moe.capacity_factor=0", "moe.capacity_factor=-1"}) {
    Config c;
    apply_override(c, "moe.dispatch=capacity");
    apply_override(c, cf);
    EXPECT_NO_THROW(validate_config(c)) << cf;
    EXPECT_EQ(c.expert_capacity(4096), 0) << cf;
  }
}

TEST(Config, TotalBatchTokensSetsGradAccum) {
  Config c;  // 16 x 1024 tokens a micro-batch
  EXPECT_EQ(c.grad_accum_steps(), 1);
  apply_override(c, "train.grad_accum=3");
  EXPECT_EQ(c.grad_accum_steps(), 3);
  apply_override(c, "train.total_batch_tokens=524288");  // the seed's 2^19
  EXPECT_NO_THROW(validate_config(c));
  EXPECT_EQ(c.grad_accum_steps(), 32);
  apply_override(c, "train.total_batch_tokens=524289");
  const std::string msg = error_of([&] { validate_config(c); });
  EXPECT_NE(msg.find("train.total_batch_tokens"), std::string::npos) << msg;
  EXPECT_NE(msg.find("16384"), std::string::npos) << msg;
}

TEST(Config, Fp8RecipeKeysAreValidatedNamingTheKey) {
  const std::vector<std::vector<std::string>> cases = {
      {"fp8.recipe=channelwise", "fp8.recipe", "tensorwise, rowwise or blockwise"},
      {"fp8.layers=attention", "fp8.layers", "dense, experts or all"},
      {"fp8.grad_format=e3m4", "fp8.grad_format", "e5m2 or e4m3"},
  };
  for (auto& bc : cases) {
    Config c;
    apply_override(c, "precision=fp8");
    apply_override(c, bc[0]);
    auto msg = error_of([&] { validate_config(c); });
    EXPECT_NE(msg.find(bc[1]), std::string::npos) << bc[0] << " gave: " << msg;
    EXPECT_NE(msg.find(bc[2]), std::string::npos) << bc[0] << " gave: " << msg;
  }
  // Experts in FP8 on a dense model: refused naming the key and the fix.
  Config dense;
  apply_override(dense, "precision=fp8");
  apply_override(dense, "moe.experts=0");
  apply_override(dense, "fp8.layers=experts");
  auto msg = error_of([&] { validate_config(dense); });
  EXPECT_NE(msg.find("fp8.layers"), std::string::npos) << msg;
  EXPECT_NE(msg.find("fp8.layers = dense"), std::string::npos) << msg;
  // Experts in FP8 run on both devices; the GPU's blockwise expert GEMMs need whole 128-row
  // weight blocks, refused up front naming the width and the fixes.
  Config experts;
  apply_override(experts, "precision=fp8");
  apply_override(experts, "fp8.layers=all");
  apply_override(experts, "device=cpu");
  EXPECT_NO_THROW(validate_config(experts));
  apply_override(experts, "device=cuda");
  EXPECT_NO_THROW(validate_config(experts));
  apply_override(experts, "moe.expert_hidden=1040");
  EXPECT_NO_THROW(validate_config(experts));  // tensorwise: multiples of 16 suffice
  apply_override(experts, "fp8.recipe=blockwise");
  msg = error_of([&] { validate_config(experts); });
  EXPECT_NE(msg.find("moe.expert_hidden"), std::string::npos) << msg;
  EXPECT_NE(msg.find("multiple of 128"), std::string::npos) << msg;
  EXPECT_NE(msg.find("fp8.recipe = tensorwise"), std::string::npos) << msg;
  apply_override(experts, "device=cpu");
  EXPECT_NO_THROW(validate_config(experts));  // the CPU emulation takes any width
  // On the GPU every FP8 GEMM dimension must be a multiple of 16: refused up front, naming the key.
  Config odd;
  apply_override(odd, "precision=fp8");
  apply_override(odd, "device=cuda");
  apply_override(odd, "model.vocab=1000");
  msg = error_of([&] { validate_config(odd); });
  EXPECT_NE(msg.find("model.vocab"), std::string::npos) << msg;
  apply_override(odd, "fp8.head=false");  // the head stays bf16: the vocabulary no longer matters
  EXPECT_NO_THROW(validate_config(odd));
  // Every supported combination validates.
  for (std::string recipe : {"tensorwise", "rowwise", "blockwise"})
    for (std::string head : {"true", "false"})
      for (std::string grad : {"e5m2", "e4m3"}) {
        Config c;
        apply_override(c, "precision=fp8");
        apply_override(c, "fp8.recipe=" + recipe);
        apply_override(c, "fp8.head=" + head);
        apply_override(c, "fp8.grad_format=" + grad);
        EXPECT_NO_THROW(validate_config(c)) << recipe << " head " << head << " " << grad;
      }
  // The [fp8] section loads from TOML and round-trips.
  Config t = config_from_toml_text("precision = \"fp8\"\n[fp8]\nrecipe = \"blockwise\"\nhead = false\n", "t");
  EXPECT_EQ(t.fp8.recipe, "blockwise");
  EXPECT_FALSE(t.fp8.head);
  EXPECT_EQ(config_to_toml(config_from_toml_text(config_to_toml(t), "r")), config_to_toml(t));
}

TEST(Config, ResolvedTomlRoundTrips) {
  Config c;
  apply_override(c, "moe.layers=1,3");
  apply_override(c, "optim.adam_eps=1e-10");
  apply_override(c, "data.text=some \"quoted\" path");
  Config back = config_from_toml_text(config_to_toml(c), "resolved");
  EXPECT_EQ(config_to_toml(back), config_to_toml(c));
  EXPECT_EQ(back.data.text, "some \"quoted\" path");
  EXPECT_DOUBLE_EQ(back.optim.adam_eps, 1e-10);
}

TEST(Config, WindowPatternTilesLayersAndEndsFull) {
  Config c;
  apply_override(c, "model.layers=6");
  apply_override(c, "model.window_pattern=SSSL");
  // S = seq_len / 2; the pattern repeats; the last layer is full context whatever the pattern says.
  EXPECT_EQ(c.layer_windows(1024), (std::vector<int64_t>{512, 512, 512, 0, 512, 0}));
  apply_override(c, "model.window_pattern=S");
  EXPECT_EQ(c.layer_windows(2048), (std::vector<int64_t>{1024, 1024, 1024, 1024, 1024, 0}));
  apply_override(c, "model.window_pattern=L");
  EXPECT_EQ(c.layer_windows(2048), std::vector<int64_t>(6, 0));
}

TEST(Config, CapacityRule) {
  Config c;
  apply_override(c, "moe.dispatch=capacity");
  apply_override(c, "moe.capacity_factor=1.25");
  // ceil(1.25 * 100 * 2 / 8) = ceil(31.25) = 32
  EXPECT_EQ(c.expert_capacity(100), 32);
  apply_override(c, "moe.dispatch=dropless");
  EXPECT_EQ(c.expert_capacity(100), 0);
}

}  // namespace
}  // namespace moelab

namespace moelab {
namespace {

// The configs shipped in configs/ load and validate as they are.
TEST(Config, ShippedConfigsValidate) {
  for (const char* name : {"tiny-cpu.toml", "d12-moe.toml", "tiny-seed-cpu.toml", "d12-seed.toml"}) {
    Config c = load_config(std::string(MOELAB_SOURCE_DIR) + "/configs/" + name);
    EXPECT_NO_THROW(validate_config(c)) << name;
  }
}

}  // namespace
}  // namespace moelab
