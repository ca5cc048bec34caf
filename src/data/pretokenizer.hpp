// The pre-split step of byte-level BPE: a regular expression (GPT-4's, with numbers of at most
// two digits as nanochat uses) cuts text into chunks, and merges never cross a chunk boundary.
// PCRE2 matches it with Unicode properties (\p{L}, \p{N}) and, where available, JIT. Bytes that
// are not valid UTF-8 match nothing; each run of them becomes a chunk of its own, so every byte
// of any input lands in exactly one chunk and encoding round-trips arbitrary bytes.
#pragma once
#include <functional>
#include <memory>
#include <string>
#include <string_view>

namespace moelab {

// nanochat's split pattern (GPT-4's cl100k pattern with \p{N}{1,2} instead of \p{N}{1,3}).
extern const char* const kGpt4SplitPattern;

class PreTokenizer {
 public:
  explicit PreTokenizer(const std::string& pattern = kGpt4SplitPattern);
  ~PreTokenizer();
  PreTokenizer(const PreTokenizer&) = delete;
  PreTokenizer& operator=(const PreTokenizer&) = delete;

  // Calls emit(chunk) for consecutive chunks covering `text` exactly. Safe to call from several
  // threads at once.
  void split(std::string_view text, const std::function<void(std::string_view)>& emit) const;
  const std::string& pattern() const { return pattern_; }

 private:
  struct Compiled;
  std::string pattern_;
  std::unique_ptr<Compiled> compiled_;
};

}  // namespace moelab
