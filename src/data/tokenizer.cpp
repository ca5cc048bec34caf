// Tokenizer: encoding (pre-split, then per-chunk BPE with a per-thread chunk cache), decoding,
// and the versioned text file. Training lives in tokenizer_train.cpp.
#include "data/tokenizer.hpp"

#include <algorithm>
#include <atomic>
#include <charconv>
#include <climits>
#include <fstream>
#include <queue>
#include <unordered_map>

#include "core/atomic_file.hpp"
#include "core/error.hpp"
#include "data/text_input.hpp"

namespace moelab {

const std::vector<std::string> kSpecialTokens = {
    "<|bos|>",          "<|user_start|>", "<|user_end|>",    "<|assistant_start|>", "<|assistant_end|>",
    "<|python_start|>", "<|python_end|>", "<|output_start|>", "<|output_end|>"};

namespace {

std::atomic<uint64_t> next_serial{1};

struct StringHash {
  using is_transparent = void;
  size_t operator()(std::string_view s) const { return std::hash<std::string_view>{}(s); }
};

// Chunk -> token ids seen lately by this thread. Natural text repeats its words, so most chunks
// are answered here without running BPE.
struct ChunkCache {
  uint64_t serial = 0;
  std::unordered_map<std::string, std::pair<uint32_t, uint32_t>, StringHash, std::equal_to<>> spans;
  std::vector<int32_t> pool;

  void reset(uint64_t s) {
    serial = s;
    spans.clear();
    pool.clear();
  }
};
constexpr size_t kCacheMaxEntries = 1 << 18;
constexpr size_t kCacheMaxChunk = 64;

}  // namespace

Tokenizer::Tokenizer(std::string pattern, std::vector<std::pair<int32_t, int32_t>> merges, std::vector<std::string> specials)
    : pretokenizer_(std::make_shared<PreTokenizer>(pattern)), merges_(std::move(merges)), specials_(std::move(specials)),
      merge_ids_(merges_.size() * 2), serial_(next_serial++) {
  token_bytes_.reserve(256 + merges_.size() + specials_.size());
  for (int b = 0; b < 256; ++b) token_bytes_.emplace_back(1, char(b));
  for (size_t i = 0; i < merges_.size(); ++i) {
    auto [a, b] = merges_[i];
    int32_t id = int32_t(256 + i);
    if (a < 0 || b < 0 || a >= id || b >= id)
      throw Error("tokenizer merge " + std::to_string(i) + " (" + std::to_string(a) + " " + std::to_string(b) +
                  ") uses an id not defined before it");
    if (merge_ids_.find(pair_key(a, b)))
      throw Error("tokenizer merge " + std::to_string(i) + " (" + std::to_string(a) + " " + std::to_string(b) +
                  ") repeats an earlier merge");
    merge_ids_[pair_key(a, b)] = id;
    token_bytes_.push_back(token_bytes_[size_t(a)] + token_bytes_[size_t(b)]);
  }
  for (const auto& s : specials_) token_bytes_.push_back(s);
}

int32_t Tokenizer::special_id(const std::string& name) const {
  for (size_t i = 0; i < specials_.size(); ++i)
    if (specials_[i] == name) return int32_t(256 + merges_.size() + i);
  throw Error("tokenizer has no special token " + name);
}

std::vector<int32_t> Tokenizer::token_byte_lengths() const {
  std::vector<int32_t> out(token_bytes_.size());
  for (size_t i = 0; i < out.size(); ++i) out[i] = is_special(int32_t(i)) ? 0 : int32_t(token_bytes_[i].size());
  return out;
}

void Tokenizer::encode_chunk(std::string_view chunk, std::vector<int32_t>& out) const {
  const size_t n = chunk.size();
  if (n == 1) {
    out.push_back(static_cast<unsigned char>(chunk[0]));
    return;
  }
  thread_local std::vector<int32_t> sym;
  sym.resize(n);
  for (size_t i = 0; i < n; ++i) sym[i] = static_cast<unsigned char>(chunk[i]);
  if (n <= 64) {
    // Short chunks: repeatedly merge every occurrence of the lowest-id mergeable pair.
    size_t len = n;
    for (;;) {
      int32_t best = INT32_MAX;
      for (size_t i = 0; i + 1 < len; ++i)
        if (const int32_t* id = merge_ids_.find(pair_key(sym[i], sym[i + 1])); id && *id < best) best = *id;
      if (best == INT32_MAX) break;
      auto [a, b] = merges_[size_t(best - 256)];
      size_t w = 0;
      for (size_t i = 0; i < len;) {
        if (i + 1 < len && sym[i] == a && sym[i + 1] == b) {
          sym[w++] = best;
          i += 2;
        } else {
          sym[w++] = sym[i++];
        }
      }
      len = w;
    }
    out.insert(out.end(), sym.begin(), sym.begin() + ptrdiff_t(len));
    return;
  }
  // Long chunks: a linked list and a min-heap of (merged id, position) keep this O(n log n);
  // equal ids pop left to right, which merges the same pairs as the short-chunk loop.
  std::vector<int32_t> next(n), prev(n);
  for (size_t i = 0; i < n; ++i) {
    next[i] = i + 1 < n ? int32_t(i + 1) : -1;
    prev[i] = int32_t(i) - 1;
  }
  using Item = std::pair<int32_t, int32_t>;
  std::priority_queue<Item, std::vector<Item>, std::greater<>> heap;
  auto push = [&](int32_t pos) {
    if (pos < 0 || next[size_t(pos)] < 0) return;
    if (const int32_t* id = merge_ids_.find(pair_key(sym[size_t(pos)], sym[size_t(next[size_t(pos)])]))) heap.push({*id, pos});
  };
  for (size_t i = 0; i + 1 < n; ++i) push(int32_t(i));
  std::vector<char> alive(n, 1);
  while (!heap.empty()) {
    auto [id, pos] = heap.top();
    heap.pop();
    size_t p = size_t(pos);
    if (!alive[p] || next[p] < 0) continue;
    size_t q = size_t(next[p]);
    const int32_t* cur = merge_ids_.find(pair_key(sym[p], sym[q]));
    if (!cur || *cur != id) continue;  // stale: one side was merged since this was pushed
    sym[p] = id;
    alive[q] = 0;
    next[p] = next[q];
    if (next[q] >= 0) prev[size_t(next[q])] = int32_t(p);
    push(prev[p]);
    push(int32_t(p));
  }
  for (int32_t i = 0; i >= 0; i = next[size_t(i)]) out.push_back(sym[size_t(i)]);
}

void Tokenizer::encode_append(std::string_view text, std::vector<int32_t>& out) const {
  thread_local ChunkCache cache;
  if (cache.serial != serial_) cache.reset(serial_);
  pretokenizer_->split(text, [&](std::string_view chunk) {
    if (chunk.size() > kCacheMaxChunk) {
      encode_chunk(chunk, out);
      return;
    }
    if (auto it = cache.spans.find(chunk); it != cache.spans.end()) {
      out.insert(out.end(), cache.pool.begin() + it->second.first,
                 cache.pool.begin() + it->second.first + it->second.second);
      return;
    }
    size_t before = out.size();
    encode_chunk(chunk, out);
    if (cache.spans.size() >= kCacheMaxEntries) cache.reset(serial_);
    cache.spans.emplace(std::string(chunk), std::pair<uint32_t, uint32_t>(uint32_t(cache.pool.size()), uint32_t(out.size() - before)));
    cache.pool.insert(cache.pool.end(), out.begin() + ptrdiff_t(before), out.end());
  });
}

std::vector<int32_t> Tokenizer::encode(std::string_view text) const {
  std::vector<int32_t> out;
  out.reserve(text.size() / 3 + 16);
  encode_append(text, out);
  return out;
}

std::string Tokenizer::decode(const std::vector<int32_t>& ids) const {
  std::string out;
  for (size_t i = 0; i < ids.size(); ++i) {
    int32_t id = ids[i];
    if (id < 0 || id >= vocab_size())
      throw Error("token id " + std::to_string(id) + " (position " + std::to_string(i) + ") is outside the vocabulary of " +
                  std::to_string(vocab_size()) + " ids; was it made with another tokenizer?");
    out += token_bytes_[size_t(id)];
  }
  return out;
}

// ---- file format ----

std::string Tokenizer::serialize() const {
  std::string s = "moelab-tokenizer " + std::to_string(kTokenizerFormatVersion) + "\n";
  s += "pattern " + pattern() + "\n";
  s += "merges " + std::to_string(merges_.size()) + "\n";
  for (auto [a, b] : merges_) s += std::to_string(a) + " " + std::to_string(b) + "\n";
  s += "specials " + std::to_string(specials_.size()) + "\n";
  for (const auto& sp : specials_) s += sp + "\n";
  return s;
}

Tokenizer Tokenizer::parse(std::string_view text, const std::string& origin) {
  size_t pos = 0, line_no = 0;
  auto fail = [&](const std::string& why) -> Error {
    return Error(origin + ": line " + std::to_string(line_no) + ": " + why +
                 "; this is not a moelab tokenizer file (make one with `moelab tokenizer train`)");
  };
  auto next_line = [&]() -> std::string_view {
    if (pos >= text.size()) {
      ++line_no;
      throw fail("the file ends early");
    }
    size_t end = text.find('\n', pos);
    if (end == std::string_view::npos) end = text.size();
    std::string_view line = text.substr(pos, end - pos);
    pos = end + 1;
    ++line_no;
    return line;
  };
  auto parse_int = [&](std::string_view s, const char* what) -> int64_t {
    int64_t v = 0;
    auto [p, ec] = std::from_chars(s.data(), s.data() + s.size(), v);
    if (ec != std::errc() || p != s.data() + s.size() || v < 0) throw fail(std::string("bad ") + what + " \"" + std::string(s) + "\"");
    return v;
  };
  auto keyed = [&](std::string_view line, std::string_view key) -> std::string_view {
    if (line.substr(0, key.size() + 1) != std::string(key) + " ") throw fail("expected \"" + std::string(key) + " ...\"");
    return line.substr(key.size() + 1);
  };

  std::string_view head = next_line();
  if (head.substr(0, 17) != "moelab-tokenizer ") throw fail("missing the \"moelab-tokenizer VERSION\" header");
  int64_t version = parse_int(head.substr(17), "version");
  if (version != kTokenizerFormatVersion)
    throw Error(origin + ": tokenizer format version " + std::to_string(version) + ", but this moelab reads version " +
                std::to_string(kTokenizerFormatVersion) + "; use a matching moelab or retrain the tokenizer");
  std::string pattern(keyed(next_line(), "pattern"));
  int64_t n_merges = parse_int(keyed(next_line(), "merges"), "merge count");
  std::vector<std::pair<int32_t, int32_t>> merges;
  merges.reserve(size_t(n_merges));
  for (int64_t i = 0; i < n_merges; ++i) {
    std::string_view line = next_line();
    size_t sp = line.find(' ');
    if (sp == std::string_view::npos) throw fail("expected a merge \"A B\"");
    int64_t a = parse_int(line.substr(0, sp), "token id"), b = parse_int(line.substr(sp + 1), "token id");
    if (a >= 256 + i || b >= 256 + i) throw fail("merge uses an id not defined before it");
    merges.emplace_back(int32_t(a), int32_t(b));
  }
  int64_t n_specials = parse_int(keyed(next_line(), "specials"), "special count");
  std::vector<std::string> specials;
  for (int64_t i = 0; i < n_specials; ++i) {
    std::string_view s = next_line();
    if (s.empty()) throw fail("empty special token");
    specials.emplace_back(s);
  }
  if (pos < text.size()) {
    ++line_no;
    throw fail("unexpected text after the last special token");
  }
  try {
    return Tokenizer(std::move(pattern), std::move(merges), std::move(specials));
  } catch (const Error& e) {
    throw Error(origin + ": " + e.what());
  }
}

void Tokenizer::save(const std::string& path) const {
  write_file_atomic(path, serialize());  // which leaves no .tmp behind when it fails
}

Tokenizer Tokenizer::load(const std::string& path) { return parse(read_input_file(path), path); }

}  // namespace moelab
