// data.source = "corpus": BPE tokens of the embedded default corpus, with nothing to prepare by
// hand. The first run trains a tokenizer of data.vocab_size ids on the corpus, writes the shard
// folder into a cache, and every later run (and every process of a sweep) reuses it.
#pragma once
#include <string>

#include "config/config.hpp"

namespace moelab {

// The folder the corpus shards for cfg live in: data.dir if set, else
// $MOELAB_CACHE (or ~/.cache/moelab, or ./.moelab-cache) / brown-bpe<vocab>-val<fraction>.
std::string corpus_shards_dir(const DataConfig& cfg);

// Makes sure that folder holds a complete shard folder (meta.json present), building it if
// missing. Concurrent callers are safe: each builds in a private folder and the first rename wins.
std::string ensure_corpus_shards(const DataConfig& cfg);

}  // namespace moelab
