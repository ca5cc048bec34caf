// BPE training. The text is pre-split and its distinct chunks counted (in parallel); then merges
// are learned over the distinct chunks weighted by count. Pair counts are updated incrementally:
// a merge touches only the chunks that contain its pair (an index from pair to chunks), and the
// most frequent pair comes from a max-heap with lazy deletion (an entry whose count is stale is
// re-pushed with the current count when it surfaces). This is what makes 10 MB to 32768 ids a
// matter of seconds rather than the hours of recounting every pair after each merge.
#include <algorithm>
#include <atomic>
#include <queue>
#include <thread>
#include <unordered_map>

#include "core/error.hpp"
#include "data/tokenizer.hpp"

namespace moelab {
namespace {

struct StringHash {
  using is_transparent = void;
  size_t operator()(std::string_view s) const { return std::hash<std::string_view>{}(s); }
};
using ChunkCounts = std::unordered_map<std::string, int64_t, StringHash, std::equal_to<>>;

ChunkCounts count_chunks(const PreTokenizer& pre, const std::vector<std::string_view>& texts, int threads) {
  // Split the work into pieces of about equal bytes, cutting big texts at line ends, so two
  // threads help even when all the text is one file.
  std::vector<std::string_view> pieces;
  const size_t piece_bytes = 1 << 20;
  for (std::string_view t : texts) {
    while (t.size() > piece_bytes) {
      size_t cut = t.find('\n', piece_bytes);
      if (cut == std::string_view::npos) break;
      pieces.push_back(t.substr(0, cut + 1));
      t.remove_prefix(cut + 1);
    }
    if (!t.empty()) pieces.push_back(t);
  }
  std::vector<ChunkCounts> partial(static_cast<size_t>(threads));
  std::atomic<size_t> next{0};
  auto work = [&](int k) {
    auto& counts = partial[size_t(k)];
    for (size_t i; (i = next++) < pieces.size();)
      pre.split(pieces[i], [&](std::string_view chunk) {
        if (auto it = counts.find(chunk); it != counts.end())
          ++it->second;
        else
          counts.emplace(std::string(chunk), 1);
      });
  };
  std::vector<std::thread> pool;
  for (int k = 1; k < threads; ++k) pool.emplace_back(work, k);
  work(0);
  for (auto& t : pool) t.join();
  for (size_t k = 1; k < partial.size(); ++k)
    for (auto& [chunk, c] : partial[k]) partial[0][chunk] += c;
  return std::move(partial[0]);
}

struct HeapItem {
  int64_t count;
  uint64_t pair;
  // Max-heap by count; among equal counts the smaller pair wins, so training is deterministic.
  bool operator<(const HeapItem& o) const { return count != o.count ? count < o.count : pair > o.pair; }
};

}  // namespace

Tokenizer train_tokenizer(const std::vector<std::string_view>& texts, int64_t vocab_size, int threads,
                          const std::function<void(const TrainProgress&)>& progress) {
  const int64_t min_vocab = 256 + int64_t(kSpecialTokens.size());
  if (vocab_size < min_vocab)
    throw Error("--vocab-size " + std::to_string(vocab_size) + " is below " + std::to_string(min_vocab) +
                " (256 byte tokens + " + std::to_string(kSpecialTokens.size()) +
                " special tokens); choose at least that, e.g. 4096 for tiny models or 32768");
  if (vocab_size > int64_t(INT32_MAX / 2)) throw Error("--vocab-size " + std::to_string(vocab_size) + " is too large");
  if (threads <= 0) threads = int(std::max(1u, std::thread::hardware_concurrency()));
  PreTokenizer pre;
  ChunkCounts counted = count_chunks(pre, texts, threads);

  // Distinct chunks in a fixed (sorted) order so ids of chunks, and hence ties, never depend on
  // hash-table order.
  std::vector<std::pair<std::string_view, int64_t>> sorted;
  sorted.reserve(counted.size());
  for (auto& [chunk, c] : counted) sorted.emplace_back(chunk, c);
  std::sort(sorted.begin(), sorted.end());
  std::vector<std::vector<int32_t>> words(sorted.size());
  std::vector<int64_t> weight(sorted.size());
  for (size_t w = 0; w < sorted.size(); ++w) {
    weight[w] = sorted[w].second;
    for (unsigned char c : sorted[w].first) words[w].push_back(c);
  }

  PairMap<int64_t> pair_count(1 << 16);
  PairMap<uint32_t> pair_slot(1 << 16);           // pair -> index into where
  std::vector<std::vector<uint32_t>> where;      // chunks that contained the pair (may repeat)
  auto where_of = [&](uint64_t key) -> std::vector<uint32_t>& {
    uint32_t& s = pair_slot[key];
    if (s == 0) {
      where.emplace_back();
      s = uint32_t(where.size());  // 1-based: 0 means "none yet"
    }
    return where[s - 1];
  };
  for (size_t w = 0; w < words.size(); ++w)
    for (size_t i = 0; i + 1 < words[w].size(); ++i) {
      uint64_t key = pair_key(words[w][i], words[w][i + 1]);
      pair_count[key] += weight[w];
      where_of(key).push_back(uint32_t(w));
    }
  std::priority_queue<HeapItem> heap;
  pair_count.for_each([&](uint64_t key, int64_t c) { heap.push({c, key}); });

  const int64_t merges_total = vocab_size - min_vocab;
  std::vector<std::pair<int32_t, int32_t>> merges;
  merges.reserve(size_t(merges_total));
  std::vector<uint32_t> touched_words;
  std::vector<uint64_t> new_pairs;
  while (int64_t(merges.size()) < merges_total && !heap.empty()) {
    HeapItem top = heap.top();
    heap.pop();
    int64_t current = pair_count[top.pair];
    if (current != top.count) {
      if (current > 0) heap.push({current, top.pair});
      continue;
    }
    const int32_t a = pair_first(top.pair), b = pair_second(top.pair);
    const int32_t id = int32_t(256 + merges.size());
    merges.emplace_back(a, b);

    touched_words.swap(where_of(top.pair));
    where_of(top.pair).clear();
    std::sort(touched_words.begin(), touched_words.end());
    touched_words.erase(std::unique(touched_words.begin(), touched_words.end()), touched_words.end());
    new_pairs.clear();
    for (uint32_t w : touched_words) {
      auto& word = words[w];
      bool has = false;
      for (size_t i = 0; i + 1 < word.size() && !has; ++i) has = word[i] == a && word[i + 1] == b;
      if (!has) continue;  // an earlier merge already consumed this occurrence
      const int64_t c = weight[w];
      // Retract the word's pairs, merge, then count them again: words are short, and this is
      // exact for every case of overlapping or repeated pairs.
      for (size_t i = 0; i + 1 < word.size(); ++i) pair_count[pair_key(word[i], word[i + 1])] -= c;
      size_t out = 0;
      for (size_t i = 0; i < word.size();) {
        if (i + 1 < word.size() && word[i] == a && word[i + 1] == b) {
          word[out++] = id;
          i += 2;
        } else {
          word[out++] = word[i++];
        }
      }
      word.resize(out);
      for (size_t i = 0; i + 1 < word.size(); ++i) {
        uint64_t key = pair_key(word[i], word[i + 1]);
        pair_count[key] += c;
        if (word[i] == id || word[i + 1] == id) {
          where_of(key).push_back(w);
          new_pairs.push_back(key);
        }
      }
    }
    // Only pairs containing the new id can have grown; every other change is a decrease, which
    // the lazy check above catches.
    std::sort(new_pairs.begin(), new_pairs.end());
    new_pairs.erase(std::unique(new_pairs.begin(), new_pairs.end()), new_pairs.end());
    for (uint64_t key : new_pairs)
      if (int64_t c = pair_count[key]; c > 0) heap.push({c, key});
    touched_words.clear();
    if (progress && (merges.size() % 256 == 0 || int64_t(merges.size()) == merges_total))
      progress({int64_t(merges.size()), merges_total});
  }
  return Tokenizer(kGpt4SplitPattern, std::move(merges));
}

}  // namespace moelab
