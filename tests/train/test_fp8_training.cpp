// precision = fp8 on the CPU: a tiny MoE GPT (one dense-MLP layer, one MoE layer) trains with
// each FP8 recipe, on the dense linears and head (fp8.layers = dense) and on the experts too
// (fp8.layers = all), its GEMMs emulated exactly, and its loss stays within 2% of the f32 run's;
// the first step's loss differs from f32, so the recipe's rounding really ran.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <sstream>

#include <nlohmann/json.hpp>

#include "config/config.hpp"
#include "core/rng.hpp"
#include "train/trainer.hpp"

namespace moelab {
namespace {
namespace fs = std::filesystem;

std::vector<double> step_losses(const fs::path& run) {
  std::vector<double> out;
  std::ifstream in(run / "metrics.jsonl");
  std::string line;
  while (std::getline(in, line)) {
    auto j = nlohmann::json::parse(line);
    if (j["event"] == "step") out.push_back(j["raw_loss"].get<double>());
  }
  return out;
}

double tail_mean(const std::vector<double>& v, size_t n) {
  double s = 0;
  for (size_t i = v.size() - n; i < v.size(); ++i) s += v[i];
  return s / double(n);
}

TEST(Fp8Training, EachRecipeTrainsWithinTwoPercentOfF32) {
  fs::path dir = fs::temp_directory_path() / ("moelab_test_fp8_" + std::to_string(::getpid()));
  fs::remove_all(dir);
  fs::create_directories(dir);
  std::ostringstream text;
  Rng rng(3);
  const char* words[] = {"the", "expert", "router", "sends", "each", "token", "to", "two", "of", "eight",
                         "experts", "and", "a", "balance", "loss", "keeps", "their", "load", "even", "."};
  for (int i = 0; i < 8000; ++i) text << words[rng.below(20)] << (i % 11 == 10 ? "\n" : " ");
  std::ofstream(dir / "text.txt") << text.str();

  Config c;
  c.device = "cpu";
  c.model.d_model = 64;
  c.model.layers = 2;
  c.model.head_dim = 16;
  c.model.vocab = 256;
  c.model.max_seq = 64;
  c.moe.experts = 4;
  c.moe.top_k = 2;
  c.moe.expert_hidden = 64;
  c.moe.layers = "1";  // layer 0 keeps a dense MLP, so its FP8 path is trained too
  c.train.steps = 40;
  c.train.batch_size = 4;
  c.train.seq_len = 64;
  c.train.threads = 2;
  c.train.eval_batches = 1;
  c.train.save_final = false;
  c.optim.scale_lr_by_dmodel = false;
  c.data.source = "bytes";
  c.data.text = (dir / "text.txt").string();
  validate_config(c);
  run_training(c, (dir / "f32").string());
  const std::vector<double> ref = step_losses(dir / "f32");
  ASSERT_EQ(ref.size(), 40u);
  const double ref_tail = tail_mean(ref, 5);
  EXPECT_LT(ref_tail, ref.front() - 1.0) << "the f32 run did not learn";

  for (std::string layers : {"dense", "all"})
  for (std::string recipe : {"tensorwise", "rowwise", "blockwise"}) {
    Config f = c;
    f.precision = "fp8";
    f.fp8.recipe = recipe;
    f.fp8.layers = layers;
    validate_config(f);
    recipe += "_" + layers;
    run_training(f, (dir / recipe).string());
    const std::vector<double> l = step_losses(dir / recipe);
    ASSERT_EQ(l.size(), 40u) << recipe;
    for (double v : l) ASSERT_TRUE(std::isfinite(v)) << recipe;
    EXPECT_NE(l.front(), ref.front()) << recipe << ": the first loss is f32's bit for bit; FP8 did not run";
    const double tail = tail_mean(l, 5);
    std::printf("%-16s first loss %.4f (f32 %.4f), tail loss %.4f (f32 %.4f)\n", recipe.c_str(), l.front(), ref.front(), tail, ref_tail);
    EXPECT_LT(std::fabs(tail - ref_tail) / ref_tail, 0.02)
        << recipe << ": tail loss " << tail << " vs f32 " << ref_tail;
  }
  fs::remove_all(dir);
}

}  // namespace
}  // namespace moelab
