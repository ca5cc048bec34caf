// Byte-level BPE tokenizer in the GPT-4 / nanochat style: text is pre-split by a regex, each
// chunk's bytes are merged by a learned list of pair merges, and nanochat's special tokens take
// the last ids. Ids 0..255 are the bytes, 256 + i is merge i, then the specials. Because every
// byte has an id and the pre-split covers every byte, decode(encode(x)) == x for any bytes x.
// The file format (text, versioned) is documented in docs/FORMATS.md.
#pragma once
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "data/pair_map.hpp"
#include "data/pretokenizer.hpp"

namespace moelab {

// nanochat's special tokens, in id order; <|bos|> starts every document.
extern const std::vector<std::string> kSpecialTokens;
inline constexpr int kTokenizerFormatVersion = 1;

class Tokenizer {
 public:
  // merges[i] = (a, b) creates id 256 + i; specials follow the merges.
  Tokenizer(std::string pattern, std::vector<std::pair<int32_t, int32_t>> merges,
            std::vector<std::string> specials = kSpecialTokens);

  // Encodes text as ordinary text (a special token's spelling in the text is not special).
  // Thread-safe; each thread keeps its own cache of recently seen chunks.
  std::vector<int32_t> encode(std::string_view text) const;
  void encode_append(std::string_view text, std::vector<int32_t>& out) const;
  // Throws on an id outside the vocabulary, naming it.
  std::string decode(const std::vector<int32_t>& ids) const;

  int64_t vocab_size() const { return int64_t(token_bytes_.size()); }
  int64_t merge_count() const { return int64_t(merges_.size()); }
  int32_t bos_id() const { return special_id("<|bos|>"); }
  // Throws if `name` is not one of this tokenizer's special tokens.
  int32_t special_id(const std::string& name) const;
  bool is_special(int32_t id) const { return id >= 256 + int32_t(merges_.size()); }
  // Bytes of a token (a special token's spelling for specials).
  const std::string& token_text(int32_t id) const { return token_bytes_.at(size_t(id)); }
  // Byte length of each token's text, 0 for specials: the denominator of bits per byte.
  std::vector<int32_t> token_byte_lengths() const;
  const std::string& pattern() const { return pretokenizer_->pattern(); }
  const std::vector<std::pair<int32_t, int32_t>>& merges() const { return merges_; }
  const std::vector<std::string>& specials() const { return specials_; }

  // The tokenizer file: text() writes it, parse() reads it (`origin` names it in errors).
  std::string serialize() const;
  static Tokenizer parse(std::string_view file_text, const std::string& origin);
  void save(const std::string& path) const;
  static Tokenizer load(const std::string& path);

 private:
  void encode_chunk(std::string_view chunk, std::vector<int32_t>& out) const;

  std::shared_ptr<const PreTokenizer> pretokenizer_;
  std::vector<std::pair<int32_t, int32_t>> merges_;
  std::vector<std::string> specials_;
  std::vector<std::string> token_bytes_;
  PairMap<int32_t> merge_ids_;  // pair -> merged id (its rank: a lower id merges first)
  uint64_t serial_;             // tells per-thread chunk caches which tokenizer filled them
};

struct TrainProgress {
  int64_t merges_done = 0, merges_total = 0;
};

// Learns merges from `texts` until the vocabulary (specials included) has vocab_size ids, or
// no pair of adjacent tokens is left to merge (then the vocabulary is smaller; see
// Tokenizer::vocab_size()). Throws if vocab_size < 256 + the number of specials. Counting the
// chunks uses `threads` threads (0: all cores).
Tokenizer train_tokenizer(const std::vector<std::string_view>& texts, int64_t vocab_size, int threads = 0,
                          const std::function<void(const TrainProgress&)>& progress = {});

}  // namespace moelab
