// Tokenizer: pre-split chunks, exact round-trip of arbitrary bytes (invalid UTF-8 included),
// BPE against a plain reference, determinism of training, the file format and its errors.
#include <gtest/gtest.h>

#include <climits>
#include <map>

#include "core/error.hpp"
#include "core/rng.hpp"
#include "data/embedded_corpus.hpp"
#include "data/tokenizer.hpp"

namespace moelab {
namespace {

// A tokenizer trained once on a slice of the default corpus, shared by the tests here.
const Tokenizer& small_tokenizer() {
  static const Tokenizer tok = train_tokenizer({std::string_view(default_corpus_text()).substr(0, 400'000)}, 1024, 2);
  return tok;
}

std::string random_bytes(size_t n, Rng& rng) {
  std::string s(n, '\0');
  for (auto& c : s) c = char(rng.below(256));
  return s;
}

// s with each non-overlapping (a, b), left to right, replaced by id: one BPE merge applied.
std::vector<int32_t> merge_pair(const std::vector<int32_t>& s, int32_t a, int32_t b, int32_t id) {
  std::vector<int32_t> t;
  for (size_t i = 0; i < s.size();)
    if (i + 1 < s.size() && s[i] == a && s[i + 1] == b) {
      t.push_back(id);
      i += 2;
    } else {
      t.push_back(s[i++]);
    }
  return t;
}

// Reference BPE: merge the lowest-id pair everywhere, one id at a time, over the whole chunk.
std::vector<int32_t> reference_bpe(const Tokenizer& tok, std::string_view chunk) {
  std::vector<int32_t> s;
  for (unsigned char c : chunk) s.push_back(c);
  for (;;) {
    int32_t best = INT32_MAX;
    for (size_t i = 0; i + 1 < s.size(); ++i)
      for (size_t m = 0; m < tok.merges().size(); ++m)
        if (tok.merges()[m] == std::make_pair(s[i], s[i + 1]) && int32_t(256 + m) < best) best = int32_t(256 + m);
    if (best == INT32_MAX) return s;
    auto [a, b] = tok.merges()[size_t(best - 256)];
    s = merge_pair(s, a, b, best);
  }
}

}  // namespace

TEST(PreTokenizer, SplitsLikeGpt4WithTwoDigitNumbers) {
  PreTokenizer pre;
  std::vector<std::string> chunks;
  pre.split("Hello world's 12345!!\n\n  x", [&](std::string_view c) { chunks.emplace_back(c); });
  std::vector<std::string> expect = {"Hello", " world", "'s", " ", "12", "34", "5", "!!\n\n", " ", " x"};
  EXPECT_EQ(chunks, expect);
}

TEST(PreTokenizer, CoversInvalidUtf8Exactly) {
  PreTokenizer pre;
  Rng rng(Rng(77).next_u64());
  for (int trial = 0; trial < 50; ++trial) {
    std::string s = random_bytes(1 + rng.below(300), rng);
    std::string joined;
    size_t pieces = 0;
    pre.split(s, [&](std::string_view c) {
      EXPECT_FALSE(c.empty());
      joined += c;
      ++pieces;
    });
    EXPECT_EQ(joined, s);
    EXPECT_GT(pieces, 0u);
  }
}

TEST(Tokenizer, RoundTripsRandomBytesIncludingInvalidUtf8) {
  const Tokenizer& tok = small_tokenizer();
  Rng rng(Rng(1234).next_u64());
  for (int trial = 0; trial < 200; ++trial) {
    std::string s = random_bytes(rng.below(500), rng);
    if (trial % 3 == 1)  // mix in text so merges actually fire next to bad bytes
      s.insert(rng.below(s.size() + 1), default_corpus_text().substr(rng.below(100'000), 200));
    auto ids = tok.encode(s);
    for (int32_t id : ids) ASSERT_TRUE(id >= 0 && id < tok.vocab_size() && !tok.is_special(id));
    ASSERT_EQ(tok.decode(ids), s) << "trial " << trial;
  }
  // Overlong forms, surrogates, lone continuation bytes, and a truncated 4-byte sequence.
  std::string nasty = "\xC0\xAF \xED\xA0\x80 \x80\x80 caf\xC3\xA9 \xF0\x9F\x98";
  EXPECT_EQ(tok.decode(tok.encode(nasty)), nasty);
  EXPECT_TRUE(tok.encode("").empty());
}

TEST(Tokenizer, RoundTripsACorpusSliceAndCompressesIt) {
  const Tokenizer& tok = small_tokenizer();
  EXPECT_EQ(tok.vocab_size(), 1024);
  std::string_view slice = std::string_view(default_corpus_text()).substr(1'000'000, 200'000);
  auto ids = tok.encode(slice);
  EXPECT_EQ(tok.decode(ids), slice);
  double bytes_per_token = double(slice.size()) / double(ids.size());
  EXPECT_GT(bytes_per_token, 2.5) << "a 1024-id BPE should compress English well beyond bytes";
  // Encoding is the same with a warm and a cold chunk cache.
  EXPECT_EQ(tok.encode(slice), ids);
}

TEST(Tokenizer, RoundTripsTheWholeDefaultCorpus) {
  const Tokenizer& tok = small_tokenizer();
  const std::string& corpus = default_corpus_text();
  EXPECT_TRUE(tok.decode(tok.encode(corpus)) == corpus);
}

TEST(Tokenizer, EncodesChunksLikeTheReferenceIncludingLongOnes) {
  const Tokenizer& tok = small_tokenizer();
  Rng rng(Rng(99).next_u64());
  std::string letters = "etaoinshrdlu";
  for (int trial = 0; trial < 20; ++trial) {
    // One long run of letters is a single chunk (it exercises the heap path above 64 bytes).
    size_t n = trial < 10 ? 3 + rng.below(60) : 65 + rng.below(400);
    std::string word;
    for (size_t i = 0; i < n; ++i) word.push_back(letters[rng.below(letters.size())]);
    EXPECT_EQ(tok.encode(word), reference_bpe(tok, word)) << word;
  }
  std::string spaces(1000, ' ');
  EXPECT_EQ(tok.decode(tok.encode(spaces)), spaces);
}

TEST(Tokenizer, SpecialTokensFollowTheMerges) {
  const Tokenizer& tok = small_tokenizer();
  EXPECT_EQ(tok.bos_id(), 256 + tok.merge_count());
  EXPECT_EQ(tok.special_id("<|assistant_end|>"), tok.bos_id() + 4);
  EXPECT_EQ(tok.decode({tok.bos_id()}), "<|bos|>");
  // A special's spelling in text is ordinary text.
  auto ids = tok.encode("<|bos|>");
  for (int32_t id : ids) EXPECT_FALSE(tok.is_special(id));
  auto lengths = tok.token_byte_lengths();
  EXPECT_EQ(lengths[size_t(tok.bos_id())], 0);
  EXPECT_EQ(lengths['a'], 1);
  for (int32_t id = 256; id < tok.bos_id(); ++id) EXPECT_EQ(lengths[size_t(id)], int32_t(tok.token_text(id).size()));
  EXPECT_THROW(tok.decode({int32_t(tok.vocab_size())}), Error);
  EXPECT_THROW(tok.special_id("<|nope|>"), Error);
}

TEST(TokenizerTraining, IsDeterministicAndHonorsTheVocabSize) {
  std::string_view text = std::string_view(default_corpus_text()).substr(2'000'000, 100'000);
  Tokenizer a = train_tokenizer({text}, 600, 1), b = train_tokenizer({text}, 600, 2);
  EXPECT_EQ(a.merges(), b.merges());
  EXPECT_EQ(a.vocab_size(), 600);
  // Training on one repeated word stops when nothing is left to merge.
  Tokenizer tiny = train_tokenizer({"abab abab abab"}, 1000, 1);
  EXPECT_LT(tiny.vocab_size(), 1000);
  EXPECT_EQ(tiny.decode(tiny.encode("abab")), "abab");
  EXPECT_EQ(tiny.encode("abab").size(), 1u);
}

TEST(TokenizerTraining, IncrementalCountsMatchRecountingEveryMerge) {
  // Reference trainer: recount every pair over all distinct chunks before each merge; pick the
  // largest count, ties to the smallest (first id, second id).
  Rng rng(Rng(5).next_u64());
  std::string text = default_corpus_text().substr(rng.below(3'000'000), 30'000);
  PreTokenizer pre;
  std::map<std::string, int64_t> counts;
  pre.split(text, [&](std::string_view c) { counts[std::string(c)]++; });
  std::vector<std::pair<std::vector<int32_t>, int64_t>> words;
  for (auto& [w, c] : counts) words.push_back({std::vector<int32_t>(w.begin(), w.end()), c});
  for (auto& [w, c] : words)
    for (auto& id : w) id = int32_t(static_cast<unsigned char>(char(id)));
  std::vector<std::pair<int32_t, int32_t>> expect;
  for (int m = 0; m < 150; ++m) {
    std::map<std::pair<int32_t, int32_t>, int64_t> pairs;
    for (auto& [w, c] : words)
      for (size_t i = 0; i + 1 < w.size(); ++i) pairs[{w[i], w[i + 1]}] += c;
    if (pairs.empty()) break;
    auto best = pairs.begin();
    for (auto it = pairs.begin(); it != pairs.end(); ++it)
      if (it->second > best->second) best = it;  // map order makes ties go to the smallest pair
    auto [a, b] = best->first;
    int32_t id = 256 + m;
    expect.push_back({a, b});
    for (auto& [w, c] : words) w = merge_pair(w, a, b, id);
  }
  Tokenizer tok = train_tokenizer({text}, int64_t(256 + kSpecialTokens.size() + expect.size()), 2);
  EXPECT_EQ(tok.merges(), expect);
}

TEST(TokenizerTraining, RejectsAVocabBelowBytesPlusSpecials) {
  try {
    train_tokenizer({"some text"}, 260, 1);
    FAIL() << "vocab 260 accepted";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("265"), std::string::npos) << e.what();
  }
  EXPECT_NO_THROW(train_tokenizer({"some text"}, 265, 1));
}

TEST(TokenizerFile, RoundTripsAndRejectsDamage) {
  const Tokenizer& tok = small_tokenizer();
  std::string file = tok.serialize();
  Tokenizer back = Tokenizer::parse(file, "tok.txt");
  EXPECT_EQ(back.merges(), tok.merges());
  EXPECT_EQ(back.specials(), tok.specials());
  EXPECT_EQ(back.pattern(), tok.pattern());
  std::string sample = default_corpus_text().substr(5000, 3000);
  EXPECT_EQ(back.encode(sample), tok.encode(sample));

  auto error_of = [](const std::string& text) {
    try {
      Tokenizer::parse(text, "bad.tok");
    } catch (const Error& e) {
      return std::string(e.what());
    }
    return std::string("(accepted)");
  };
  std::string wrong_version = file;
  wrong_version.replace(0, file.find('\n'), "moelab-tokenizer 7");
  EXPECT_NE(error_of(wrong_version).find("version 7"), std::string::npos) << error_of(wrong_version);
  EXPECT_NE(error_of(file.substr(0, file.size() / 2)).find("bad.tok: line"), std::string::npos);
  EXPECT_NE(error_of("hello\n").find("line 1"), std::string::npos);
  std::string forward_ref = "moelab-tokenizer 1\npattern .\nmerges 1\n300 1\nspecials 0\n";
  EXPECT_NE(error_of(forward_ref).find("line 4"), std::string::npos) << error_of(forward_ref);
  EXPECT_NE(error_of(file + "junk\n").find("after the last special"), std::string::npos);
}

}  // namespace moelab
