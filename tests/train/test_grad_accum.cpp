// Gradient accumulation: k micro-batches of b rows make the same optimizer step as one batch of
// k * b rows over the same tokens (the loss is the mean over all of the step's tokens, so each
// micro-batch's gradient is scaled by the step's token count, not its own). Checked on the CPU in
// f32 for AdamW and for Muon on the matrices: every step's loss and the final weights agree
// within f32 summation-order rounding.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <filesystem>
#include <string>
#include <vector>

#include "config/config.hpp"
#include "train/safetensors.hpp"
#include "train/trainer.hpp"
#include "run_test_support.hpp"

namespace moelab {
namespace {
namespace fs = std::filesystem;

// Dropless routing and no balance loss: capacity and the balance term are taken per micro-batch
// by design (a different objective from the large batch's), so they are left out of the identity.
Config accumulation_config(const std::string& text, const std::string& matrix_optimizer) {
  Config c = test::tiny_byte_config(text);
  c.moe.dispatch = "dropless";
  c.moe.balance_coef = 0.0;
  c.optim.matrix_optimizer = matrix_optimizer;
  c.train.steps = 6;
  c.train.threads = 2;
  c.train.eval_every = 0;
  c.train.save_final = true;
  return c;
}

// Every f32 weight of a run's model.safetensors, in file order.
std::vector<float> final_weights(const fs::path& run) {
  SafetensorsFile f = read_safetensors((run / "model.safetensors").string());
  std::vector<float> w;
  for (const SafetensorsEntry& e : f.entries) {
    if (e.dtype != SafeDType::f32) continue;
    const size_t n = e.bytes / sizeof(float);
    const size_t at = w.size();
    w.resize(at + n);
    std::memcpy(w.data() + at, f.bytes(e), e.bytes);
  }
  return w;
}

double normalized_error(const std::vector<float>& a, const std::vector<float>& ref) {
  if (a.size() != ref.size()) return INFINITY;
  double num = 0, den = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    if (!std::isfinite(a[i])) return INFINITY;
    num += (double(a[i]) - ref[i]) * (double(a[i]) - ref[i]);
    den += double(ref[i]) * ref[i];
  }
  return std::sqrt(num / std::max(den, 1e-300));
}

// weight_tolerance: the final weights' normalized difference allowed. Measured on the tree:
// AdamW 3e-8, Muon 3e-7 (Newton-Schulz amplifies the rounding); with each micro-batch's loss
// left unscaled by the step's token count (k times the gradient, which Adam's and Muon's
// normalizations nearly hide): 1.4e-5 to 2.1e-5.
void accumulation_matches_one_large_batch(const std::string& matrix_optimizer, double weight_tolerance) {
  const fs::path dir = test::fresh_dir("accum_" + matrix_optimizer);
  const std::string text = test::write_words(
      dir, {"every", "micro", "batch", "adds", "its", "share", "of", "the", "step", "gradient", "."}, 6000, 21);
  struct Split {
    int64_t rows, micro;
  };
  const std::vector<Split> splits = {{8, 1}, {4, 2}, {2, 4}};
  std::vector<std::vector<double>> losses;
  std::vector<std::vector<float>> weights;
  for (const Split& s : splits) {
    Config c = accumulation_config(text, matrix_optimizer);
    c.train.batch_size = s.rows;
    c.train.grad_accum = s.micro;
    validate_config(c);
    const fs::path run = dir / ("b" + std::to_string(s.rows) + "x" + std::to_string(s.micro));
    run_training(c, run.string());
    losses.push_back(test::raw_losses(run));
    weights.push_back(final_weights(run));
    ASSERT_EQ(losses.back().size(), 6u);
    ASSERT_FALSE(weights.back().empty());
  }
  // The steps move the weights (five more steps take them far from the first step's), so the
  // identity below is not a few untouched weights agreeing.
  Config one_step = accumulation_config(text, matrix_optimizer);
  one_step.train.steps = 1;
  one_step.train.batch_size = 8;
  run_training(one_step, (dir / "one_step").string());
  const double moved = normalized_error(final_weights(dir / "one_step"), weights[0]);
  EXPECT_GT(moved, 1e-3) << "five more steps did not move the weights";

  for (size_t i = 1; i < splits.size(); ++i) {
    const std::string what = matrix_optimizer + ": " + std::to_string(splits[i].micro) + " micro-batches of " +
                             std::to_string(splits[i].rows) + " rows against one of 8";
    for (size_t step = 0; step < losses[0].size(); ++step)
      EXPECT_NEAR(losses[i][step], losses[0][step], 2e-6 * std::fabs(losses[0][step])) << what << ", step " << step;
    const double e = normalized_error(weights[i], weights[0]);
    std::printf("%s: final weights' normalized difference %.3g (steps 2-6 moved them by %.3g)\n", what.c_str(), e,
                moved);
    EXPECT_LT(e, weight_tolerance) << what << ": final weights differ";
  }
  fs::remove_all(dir);
}

TEST(GradAccumulation, AdamWMicroBatchesGiveTheLargeBatchStep) { accumulation_matches_one_large_batch("adamw", 1e-6); }

TEST(GradAccumulation, MuonMicroBatchesGiveTheLargeBatchStep) { accumulation_matches_one_large_batch("muon", 3e-6); }

}  // namespace
}  // namespace moelab
