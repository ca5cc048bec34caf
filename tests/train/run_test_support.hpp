// What the end-to-end training tests share: a fresh temporary folder, a text file of random
// words for the byte loader (so a test needs no tokenizer build), the tiny byte-level MoE they
// train, and readers of a run folder's metrics.jsonl events and status.json.
#pragma once
#include <unistd.h>

#include <atomic>
#include <filesystem>
#include <fstream>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "config/config.hpp"
#include "core/rng.hpp"
#include "common/config_builder.hpp"

namespace moelab::test {

// An empty folder of its own under the temp directory: the process id, a counter and a random
// number keep parallel test processes and repeated calls apart.
inline std::filesystem::path fresh_dir(const std::string& name) {
  static std::atomic<int> counter{0};
  static std::random_device rd;
  namespace fs = std::filesystem;
  fs::path p = fs::temp_directory_path() / ("moelab_test_" + name + "_" + std::to_string(::getpid()) + "_" +
                                            std::to_string(counter++) + "_" + std::to_string(rd()));
  fs::remove_all(p);
  fs::create_directories(p);
  return p;
}

// `count` words drawn from `words` by Rng(seed), a line break every `line_words`, into
// dir/text.txt; returns its path.
inline std::string write_words(const std::filesystem::path& dir, const std::vector<const char*>& words, int count,
                               uint64_t seed, int line_words = 13) {
  std::ostringstream o;
  Rng rng(seed);
  for (int i = 0; i < count; ++i)
    o << words[rng.below(words.size())] << (i % line_words == line_words - 1 ? "\n" : " ");
  const auto f = dir / "text.txt";
  std::ofstream(f) << o.str();
  return f.string();
}

// A 2-layer MoE (width 32, 4 experts top-2) on the raw bytes of `text`, sequences of 32, on the
// CPU; each test sets its steps, batch and threads.
inline Config tiny_byte_config(const std::string& text) {
  Config c = with_keys(Config{}, "device=cpu model.d_model=32 model.layers=2 model.head_dim=16 model.vocab=256 "
                                 "model.max_seq=64 moe.experts=4 moe.top_k=2 moe.expert_hidden=32 train.seq_len=32 "
                                 "train.eval_batches=1 optim.scale_lr_by_dmodel=false data.source=bytes");
  c.data.text = text;  // a path: set as is, whatever characters it holds
  return c;
}

// The metrics.jsonl records of one event ("step", "val", "end", ...), in order.
inline std::vector<nlohmann::json> read_events(const std::filesystem::path& run, const std::string& event) {
  std::vector<nlohmann::json> out;
  std::ifstream in(run / "metrics.jsonl");
  std::string line;
  while (std::getline(in, line)) {
    auto j = nlohmann::json::parse(line);
    if (j["event"] == event) out.push_back(j);
  }
  return out;
}

// A whole file as text ("" if it cannot be read).
inline std::string read_text(const std::filesystem::path& path) {
  std::ifstream in(path, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(in), {});
}

// Every step's raw_loss from a run's metrics.jsonl, in order.
inline std::vector<double> raw_losses(const std::filesystem::path& run) {
  std::vector<double> out;
  for (const auto& j : read_events(run, "step")) out.push_back(j["raw_loss"].get<double>());
  return out;
}

// The mean of the last n values (one step's loss is noisy at the tests' batch sizes).
inline double tail_mean(const std::vector<double>& v, size_t n) {
  double s = 0;
  for (size_t i = v.size() - n; i < v.size(); ++i) s += v[i];
  return s / double(n);
}

inline nlohmann::json read_status(const std::filesystem::path& run) {
  std::ifstream in(run / "status.json");
  return nlohmann::json::parse(in);
}

}  // namespace moelab::test
