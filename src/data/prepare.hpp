// `moelab data prepare`: tokenizes text files or JSONL into a shard folder (shard_folder.hpp)
// with a validation split. Documents go to validation at evenly spaced positions (document d
// when floor((d + 1) * f) > floor(d * f)), so both splits sample every part of the input,
// and the split is the same on every run.
#pragma once
#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "data/shard_folder.hpp"

namespace moelab {

struct PrepareOptions {
  std::string tokenizer;            // tokenizer file
  std::vector<std::string> inputs;  // .txt (documents separated by blank lines) or .jsonl ("text")
  bool default_corpus = false;      // also (first) the embedded default corpus
  std::string out;                  // output folder (created)
  double val_fraction = 0.05;
  int64_t shard_tokens = 100'000'000;  // a new shard starts past this many tokens
  bool progress = true;
  bool force = false;  // replace the shard folder already in `out` (its files are removed first)
};

// Writes the folder and returns its index (also in out/meta.json). Refuses a folder that already
// holds shards unless opt.force; a failure leaves no file of its own behind (nor the folder, if it
// made it).
ShardFolderInfo prepare_shards(const PrepareOptions& opt);

}  // namespace moelab
