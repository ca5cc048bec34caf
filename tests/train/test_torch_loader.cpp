// scripts/moelab_torch.py against moelab, under Debian's /usr/bin/python3 and its python3-torch
// (1.13 on Debian 12; scripts/install-deps.sh --tests installs it): the loader knows every model.* and
// moe.* key `moelab train --help-config` lists, rebuilds four kinds of trained model (dense,
// MoE dropless, MoE capacity with drops, and configs/tiny-seed-cpu.toml with every seed option)
// so that its f64 loss on the run's check batch is within 1e-6 relative of moelab's, and its
// greedy continuation equals `moelab sample --temperature 0`'s token for token.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <set>
#include <sstream>
#include <string>

#include "config/config.hpp"
#include "core/regex.hpp"
#include "train/run_test_support.hpp"

namespace moelab {
namespace {

namespace fs = std::filesystem;
using test::fresh_dir;

const char* kPython = "/usr/bin/python3";
const std::string kLoader = std::string(MOELAB_SOURCE_DIR) + "/scripts/moelab_torch.py";

struct Output {
  int status = -1;
  std::string text;
};

// Runs a shell command, stdout and stderr together.
Output run(const std::string& cmd) {
  Output o;
  FILE* p = popen((cmd + " 2>&1").c_str(), "r");
  if (!p) return o;
  char buf[4096];
  size_t n;
  while ((n = fread(buf, 1, sizeof buf, p)) > 0) o.text.append(buf, n);
  const int st = pclose(p);
  o.status = WIFEXITED(st) ? WEXITSTATUS(st) : -1;
  return o;
}

void require_torch() {
  const Output o = run(std::string(kPython) + " -c 'import torch; print(torch.__version__)'");
  ASSERT_EQ(o.status, 0) << kPython << " cannot import torch (install Debian's python3-torch: scripts/install-deps.sh --tests):\n"
                         << o.text;
}

std::string words_text(const fs::path& dir) {
  return test::write_words(dir, {"the", "jury", "said", "it", "did", "find", "that", "many", "of", "election",
                                 "laws", "are", "outmoded", "and", "should", "be", "revised", "."},
                           6000, 5, 9);
}

// Trains cfg into dir/name with the moelab binary; returns the run folder.
fs::path train(const fs::path& dir, const std::string& name, const Config& cfg) {
  const fs::path toml = dir / (name + ".toml");
  std::ofstream(toml) << config_to_toml(cfg);
  const fs::path out = dir / name;
  const Output o = run(std::string(MOELAB_BINARY) + " train --config " + toml.string() + " --out " + out.string());
  EXPECT_EQ(o.status, 0) << o.text;
  EXPECT_TRUE(fs::exists(out / "check_batch.json")) << o.text;
  return out;
}

// The loader's check of the run at 1e-6: its printed relative difference (NaN if not printed).
double loader_relative_difference(const fs::path& run_dir) {
  const Output o = run(std::string(kPython) + " " + kLoader + " " + run_dir.string() + " --tolerance 1e-6");
  static const Regex re(R"(relative difference ([0-9.eE+-]+))");
  EXPECT_EQ(o.status, 0) << o.text;
  const auto m = re.search(o.text);
  if (!m) {
    ADD_FAILURE() << "no relative difference in the loader's output:\n" << o.text;
    return NAN;
  }
  std::printf("  %s: %s", run_dir.filename().c_str(), o.text.c_str());
  return std::stod(m->str(1));
}

// Greedy continuations of the same prompt ids by moelab sample and by the loader.
void expect_same_greedy(const fs::path& run_dir, int tokens) {
  const std::string prompt = "116,104,101,32,106,117,114,121";  // "the jury"
  const Output ours = run(std::string(MOELAB_BINARY) + " sample --run " + run_dir.string() + " --prompt-ids " + prompt +
                          " --max-tokens " + std::to_string(tokens) + " --temperature 0 --print-ids --quiet");
  const Output theirs = run(std::string(kPython) + " " + kLoader + " " + run_dir.string() + " --prompt-ids " + prompt +
                            " --max-tokens " + std::to_string(tokens));
  ASSERT_EQ(ours.status, 0) << ours.text;
  ASSERT_EQ(theirs.status, 0) << theirs.text;
  std::istringstream a(ours.text), b(theirs.text);
  std::vector<int> x, y;
  for (int v; a >> v;) x.push_back(v);
  for (int v; b >> v;) y.push_back(v);
  ASSERT_EQ(int(x.size()), tokens) << ours.text;
  EXPECT_EQ(x, y) << "moelab: " << ours.text << "torch: " << theirs.text;
  // A continuation of one repeated token would say little about the two decoders.
  EXPECT_GE(std::set<int>(x.begin(), x.end()).size(), 3u) << ours.text;
}

Config tiny(const std::string& text) {
  // Grouped-query (2 query heads share one kv head); layer 0 slides a window of seq_len / 2.
  return test::with_keys(test::tiny_byte_config(text),
                         "model.kv_heads=1 model.window_pattern=SL train.steps=60 train.batch_size=4 train.threads=2 "
                         "optim.matrix_lr=0.04 optim.embedding_lr=0.3 optim.unembedding_lr=0.02");
}

TEST(TorchLoader, KnowsEveryModelAndMoeKeyMoelabWrites) {
  require_torch();
  const Output help = run(std::string(MOELAB_BINARY) + " train --help-config");
  ASSERT_EQ(help.status, 0) << help.text;
  // Each key is listed on its own line as "  section.key = default".
  std::set<std::string> keys;
  const Regex key_re(R"(^\s+((model|moe)\.[a-z_0-9]+) = )");
  std::istringstream lines(help.text);
  for (std::string line; std::getline(lines, line);) {
    if (const auto m = key_re.search(line)) keys.insert(m->str(1));
  }
  ASSERT_GE(keys.size(), 20u) << "too few model/moe keys found in --help-config:\n" << help.text;
  const Output listed = run(std::string(kPython) + " " + kLoader + " --list-keys");
  ASSERT_EQ(listed.status, 0) << listed.text;
  std::set<std::string> known;
  std::istringstream in(listed.text);
  for (std::string k; in >> k;) known.insert(k);
  for (const std::string& k : keys) EXPECT_TRUE(known.count(k)) << "the loader does not know " << k;
  for (const std::string& k : known) EXPECT_TRUE(keys.count(k)) << "the loader knows " << k << ", which moelab no longer has";
}

TEST(TorchLoader, LossMatchesMoelabForEveryModelKind) {
  require_torch();
  const fs::path dir = fresh_dir("torch_loader");
  const std::string text = words_text(dir);

  Config dense = tiny(text);
  dense.moe.experts = 0;
  dense.model.mlp_hidden = 64;

  Config dropless = tiny(text);
  dropless.moe.shared_expert = true;
  dropless.moe.shared_hidden = 24;

  Config capacity = tiny(text);
  capacity.moe.dispatch = "capacity";
  capacity.moe.capacity_factor = 0.75;  // drops on every step
  capacity.moe.drop_order = "rank";

  // The shipped seed config as it is, on raw bytes (its vocab covers them) for CI's two cores.
  Config seed = load_config(std::string(MOELAB_SOURCE_DIR) + "/configs/tiny-seed-cpu.toml");
  seed.data.source = "bytes";
  seed.data.text = text;
  seed.train.steps = 30;
  seed.train.eval_every = 0;
  seed.train.threads = 2;

  for (const auto& [name, cfg] : std::vector<std::pair<std::string, Config>>{
           {"dense", dense}, {"dropless", dropless}, {"capacity", capacity}, {"seed", seed}}) {
    SCOPED_TRACE(name);
    const fs::path run_dir = train(dir, name, cfg);
    if (name == "capacity" || name == "seed") {  // the keep order is exercised: assignments were dropped
      double dropped = 0;
      for (const auto& s : test::read_events(run_dir, "step")) dropped += s["drop_rate"].get<double>();
      EXPECT_GT(dropped, 0.0);
    }
    const double rel = loader_relative_difference(run_dir);
    EXPECT_TRUE(std::isfinite(rel));
    EXPECT_LE(rel, 1e-6);
    expect_same_greedy(run_dir, 24);
  }
  fs::remove_all(dir);
}

}  // namespace
}  // namespace moelab
