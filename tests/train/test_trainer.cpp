// End-to-end trainer behaviour on the CPU: loss falls, the run folder is complete, a resumed run
// reproduces an uninterrupted one exactly, divergence and bad configs fail cleanly.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <sstream>

#include <nlohmann/json.hpp>

#include "core/error.hpp"
#include "core/rng.hpp"
#include "config/config.hpp"
#include "train/trainer.hpp"
#include "ngram_entropy.hpp"
#include "run_test_support.hpp"
#include "common/config_builder.hpp"

namespace moelab {
namespace {
namespace fs = std::filesystem;
using test::fresh_dir;
using test::read_events;
using test::read_status;

// Some English-like text so the byte model has something to learn.
std::string write_text(const fs::path& dir) {
  return test::write_words(dir, {"the", "expert", "router", "sends", "each", "token", "to", "two", "of", "eight",
                                 "experts", "and", "a", "balance", "loss", "keeps", "their", "load", "even", "."},
                           6000, 7);
}

Config small_config(const std::string& text) {
  return test::with_keys(test::tiny_byte_config(text),
                         "train.steps=12 train.batch_size=4 train.grad_accum=2 train.threads=2");
}

// Expects the run's last five steps' mean raw loss below the text's bigram entropy less margin
// (printing the losses and the text's entropies); returns the step records.
std::vector<nlohmann::json> expect_learned_past_bigrams(const fs::path& run, const std::string& text_file,
                                                        size_t steps_expected, double margin) {
  auto steps = read_events(run, "step");
  EXPECT_EQ(steps.size(), steps_expected);
  if (steps.size() < 5) return steps;
  double first = steps.front()["raw_loss"], last = steps.back()["raw_loss"];
  EXPECT_TRUE(std::isfinite(last));
  const std::string text = test::read_text(text_file);
  const double h1 = test::ngram_entropy(text, 1), h2 = test::ngram_entropy(text, 2);
  const double tail = test::tail_mean(test::raw_losses(run), 5);
  std::printf("loss %.4f -> %.4f (last five %.4f); the text's unigram entropy %.4f, bigram %.4f nats\n", first, last,
              tail, h1, h2);
  EXPECT_LT(tail, h2 - margin) << "the model did not learn past the bigram statistics: " << first << " -> " << tail;
  return steps;
}

// The "loss falls" tests bound the mean loss of the last five steps by the text's own bigram
// entropy (ngram_entropy.hpp): a model whose attention is broken stops near that, and the small
// MoE here near 1.8 nats with its experts' output zeroed; the healthy model reaches about 0.8.
TEST(Trainer, LossFallsAndRunFolderIsComplete) {
  fs::path dir = fresh_dir("falls");
  const std::string text_file = write_text(dir);
  Config c = small_config(text_file);
  c.train.steps = 150;
  c.train.grad_accum = 1;
  c.moe.dispatch = "capacity";
  c.moe.capacity_factor = 1.0;
  TrainResult r = run_training(c, (dir / "run").string());
  // Attention zeroed: 1.51; the experts' output zeroed: 1.82; healthy: 0.80 (bigram 1.42).
  auto steps = expect_learned_past_bigrams(dir / "run", text_file, 150, 0.4);
  ASSERT_EQ(steps.size(), 150u);
  EXPECT_EQ(read_status(dir / "run")["status"], "completed");
  EXPECT_TRUE(fs::exists(dir / "run" / "config.toml"));
  EXPECT_EQ(read_events(dir / "run", "val").size(), 1u);
  EXPECT_EQ(read_events(dir / "run", "end").size(), 1u);
  // Per-layer expert load sums to 1; capacity factor 1 drops something early on.
  auto load = steps.front()["expert_load"];
  ASSERT_EQ(load.size(), 2u);
  double sum = 0;
  for (auto& f : load[0]) sum += f.get<double>();
  EXPECT_NEAR(sum, 1.0, 1e-5);
  double drops = 0;
  for (auto& s : steps) drops += s["drop_rate"].get<double>();
  EXPECT_GT(drops, 0.0);
  EXPECT_GT(r.peak_mem_mib, 0.0);
  // The resolved config reloads to the same config.
  Config back = load_config((dir / "run" / "config.toml").string());
  EXPECT_EQ(config_to_toml(back), config_to_toml(c));
}

// nanochat's attention shapes on the CPU: head dim 128, grouped-query (2 kv heads for 4 query
// heads), sliding windows on three of every four layers ("SSSL", last layer full).
TEST(Trainer, LossFallsWithHeadDim128WindowsAndGroupedQuery) {
  fs::path dir = fresh_dir("windows");
  Config c = test::with_keys(small_config(write_text(dir)),
                             "model.d_model=512 model.head_dim=128 model.kv_heads=2 model.layers=4 "
                             "model.window_pattern=SSSL moe.expert_hidden=64 train.steps=40 train.grad_accum=1 "
                             "train.batch_size=2 optim.matrix_lr=0.01");
  run_training(c, (dir / "run").string());
  // Attention zeroed: 1.53; healthy: 1.07 (bigram 1.42).
  expect_learned_past_bigrams(dir / "run", c.data.text, 40, 0.2);
  EXPECT_EQ(read_status(dir / "run")["status"], "completed");
  // The windows reach the MFU estimate: 3 layers over seq_len / 2 keys, one over seq_len.
  EXPECT_EQ(c.layer_windows(c.train.seq_len), (std::vector<int64_t>{16, 16, 16, 0}));
}

TEST(Trainer, ResumeReproducesUninterruptedRunExactly) {
  fs::path dir = fresh_dir("resume");
  std::string text = write_text(dir);
  Config full = small_config(text);
  full.train.checkpoint_every = 5;
  run_training(full, (dir / "full").string());
  auto reference = read_events(dir / "full", "step");
  ASSERT_EQ(reference.size(), 12u);

  // A second run of the same config whose later checkpoints are lost: resuming from the one
  // at step 5 must rewrite steps 5.. exactly as the uninterrupted run logged them.
  Config part = full;
  part.train.save_final = false;
  run_training(part, (dir / "part").string());
  fs::remove(dir / "part" / "checkpoints" / "step_000010.safetensors");
  part.train.resume = "auto";
  run_training(part, (dir / "part").string());
  auto resume_events = read_events(dir / "part", "resume");
  ASSERT_EQ(resume_events.size(), 1u);
  EXPECT_EQ(resume_events[0]["step"], 5);
  auto resumed = read_events(dir / "part", "step");
  ASSERT_EQ(resumed.size(), 12u);
  for (size_t i = 0; i < 12; ++i) {
    EXPECT_EQ(resumed[i]["step"], reference[i]["step"]);
    // Bit-exact: the same doubles, not merely close ones.
    EXPECT_EQ(resumed[i]["raw_loss"].get<double>(), reference[i]["raw_loss"].get<double>()) << "step " << i;
    EXPECT_EQ(resumed[i]["loss"].get<double>(), reference[i]["loss"].get<double>()) << "step " << i;
  }
}

TEST(Trainer, DivergenceFailsNamingTheStep) {
  fs::path dir = fresh_dir("nan");
  Config c = small_config(write_text(dir));
  c.model.init_scale = 1e30;  // overflows the forward at once
  EXPECT_THROW(run_training(c, (dir / "run").string()), Error);
  auto st = read_status(dir / "run");
  EXPECT_EQ(st["status"], "failed");
  EXPECT_EQ(st["step"], 0);
  std::string err = st["error"];
  EXPECT_TRUE(err.find("NaN") != std::string::npos || err.find("Inf") != std::string::npos) << err;
  EXPECT_NE(err.find("step 0"), std::string::npos) << err;
}

TEST(Trainer, MissingDataFileFailsClearly) {
  fs::path dir = fresh_dir("missing");
  Config c = small_config((dir / "does_not_exist.txt").string());
  try {
    run_training(c, (dir / "run").string());
    FAIL() << "expected an error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("does_not_exist.txt"), std::string::npos) << e.what();
  }
  // A start refused before the first step writes nothing: the corrected command runs into the
  // same --out without --force.
  EXPECT_FALSE(fs::exists(dir / "run"));
}

// data.source = corpus: the first run builds tokenizer + shards of the embedded corpus into the
// cache folder, reports bits per byte, and a second run reuses the folder as it is.
TEST(Trainer, CorpusSourceBuildsItsCacheOnce) {
  fs::path dir = fresh_dir("corpus");
  Config c = small_config("");
  c.data.source = "corpus";
  c.data.vocab_size = 512;
  c.data.dir = (dir / "cache").string();
  c.model.vocab = 512;
  c.train.steps = 2;
  c.train.grad_accum = 1;
  run_training(c, (dir / "run1").string());
  ASSERT_TRUE(fs::exists(dir / "cache" / "meta.json"));
  auto built = fs::last_write_time(dir / "cache" / "meta.json");
  auto val = read_events(dir / "run1", "val");
  ASSERT_EQ(val.size(), 1u);
  double bpb = val[0]["val_bpb"], loss = val[0]["val_loss"];
  // BPE tokens cover several bytes each, so bits per byte sit well below loss / ln 2.
  EXPECT_GT(bpb, 0.0);
  EXPECT_LT(bpb, loss / std::log(2.0));
  run_training(c, (dir / "run2").string());
  EXPECT_EQ(fs::last_write_time(dir / "cache" / "meta.json"), built);
  EXPECT_EQ(read_status(dir / "run2")["status"], "completed");
}

// The CLI: a bad config is rejected before any run folder exists.
TEST(TrainCli, BadConfigLeavesNoRunFolder) {
  fs::path dir = fresh_dir("cli");
  fs::path cfg = dir / "bad.toml";
  std::ofstream(cfg) << "[moe]\nexperts = 4\ntop_k = 6\n";
  std::string cmd = std::string(MOELAB_BINARY) + " train --config " + cfg.string() + " --out " +
                    (dir / "run").string() + " > " + (dir / "out.txt").string() + " 2>&1";
  int rc = std::system(cmd.c_str());
  EXPECT_NE(rc, 0);
  std::ifstream in(dir / "out.txt");
  std::string out((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  EXPECT_NE(out.find("moe.top_k"), std::string::npos) << out;
  EXPECT_FALSE(fs::exists(dir / "run"));

  std::ofstream(cfg) << "[moe]\nexpertz = 4\n";
  rc = std::system(cmd.c_str());
  EXPECT_NE(rc, 0);
  std::ifstream in2(dir / "out.txt");
  std::string out2((std::istreambuf_iterator<char>(in2)), std::istreambuf_iterator<char>());
  EXPECT_NE(out2.find("unknown config key 'moe.expertz'"), std::string::npos) << out2;
}

}  // namespace
}  // namespace moelab
