// Raw-bytes loader: rows are slices of the text, targets are inputs shifted by one, order is
// fixed by the seed, ranks read disjoint bytes and resume continues exactly.
#include <gtest/gtest.h>

#include <set>

#include "core/error.hpp"
#include "core/rng.hpp"
#include "data/byte_loader.hpp"
#include "data/embedded_corpus.hpp"

namespace moelab {
namespace {

std::string random_text(size_t n, uint64_t seed) {
  Rng rng(seed);
  std::string s(n, ' ');
  for (auto& c : s) c = char('a' + rng.below(26));
  return s;
}

ByteLoader make(const std::string& text, uint64_t seed, int rank = 0, int world = 1) {
  return ByteLoader(text, std::string(), "test text", 0.1, seed, rank, world);
}

}  // namespace

TEST(ByteLoader, RowsAreTextSlicesWithShiftedTargets) {
  std::string text = random_text(10'000, Rng(1).next_u64());
  auto loader = make(text, 7);
  EXPECT_EQ(loader.vocab(), 256);
  ASSERT_EQ(loader.token_bytes().size(), 256u);
  for (int32_t b : loader.token_bytes()) EXPECT_EQ(b, 1);
  Batch b = loader.next_train(4, 32);
  ASSERT_EQ(b.inputs.size(), 128u);
  for (int r = 0; r < 4; ++r) {
    std::string row;
    for (int t = 0; t < 32; ++t) row.push_back(char(b.inputs[r * 32 + t]));
    row.push_back(char(b.targets[r * 32 + 31]));
    // Training rows come from the first 90% (rows may wrap from its end to its start).
    std::string train = text.substr(0, 9000);
    EXPECT_NE((train + train).find(row), std::string::npos) << "row " << r;
    for (int t = 0; t + 1 < 32; ++t) EXPECT_EQ(b.targets[r * 32 + t], b.inputs[r * 32 + t + 1]);
  }
}

TEST(ByteLoader, ValidationReadsOnlyTheTailAndRestarts) {
  std::string text = random_text(2000, Rng(2).next_u64());
  for (size_t i = 1800; i < 2000; ++i) text[i] = char('A' + (i % 26));  // uppercase tail
  auto loader = make(text, 3);
  Batch v1 = loader.next_val(2, 16);
  for (int32_t x : v1.inputs) EXPECT_TRUE(x >= 'A' && x <= 'Z');
  loader.next_val(2, 16);
  loader.reset_val();
  Batch v2 = loader.next_val(2, 16);
  EXPECT_EQ(v1.inputs, v2.inputs);
  Batch t = loader.next_train(8, 16);
  for (int32_t x : t.inputs) EXPECT_TRUE(x >= 'a' && x <= 'z');
}

TEST(ByteLoader, DeterministicForASeedAndDifferentAcrossSeeds) {
  const std::string& text = default_corpus_text();
  auto a = ByteLoader(text, {}, "corpus", 0.05, 11, 0, 1);
  auto b = ByteLoader(text, {}, "corpus", 0.05, 11, 0, 1);
  auto c = ByteLoader(text, {}, "corpus", 0.05, 12, 0, 1);
  Batch ba = a.next_train(2, 64), bb = b.next_train(2, 64), bc = c.next_train(2, 64);
  EXPECT_EQ(ba.inputs, bb.inputs);
  EXPECT_NE(ba.inputs, bc.inputs);
}

TEST(ByteLoader, ResumeContinuesExactlyAcrossEpochs) {
  std::string text = random_text(3000, Rng(4).next_u64());
  auto a = make(text, 5);
  for (int i = 0; i < 13; ++i) a.next_train(3, 50);  // 13 * 150 bytes: past one epoch of 2700
  auto saved = a.state();
  std::vector<Batch> expect;
  for (int i = 0; i < 20; ++i) expect.push_back(a.next_train(3, 50));
  auto b = make(text, 5);
  b.restore(saved);
  for (int i = 0; i < 20; ++i) EXPECT_EQ(b.next_train(3, 50).inputs, expect[size_t(i)].inputs) << "batch " << i;
  EXPECT_THROW(b.restore({1, 2}), Error);
}

TEST(ByteLoader, RanksReadDisjointBytes) {
  std::string text(40'000, ' ');
  // Unique 4-byte words so a window's position in the text is identifiable.
  for (size_t i = 0; i < text.size(); i += 4) {
    uint32_t k = uint32_t(i / 4);
    for (int j = 0; j < 4; ++j) text[i + j] = char(33 + (k >> (6 * j)) % 64);
  }
  std::set<std::string> seen;
  for (int rank = 0; rank < 2; ++rank) {
    auto l = make(text, 9, rank, 2);
    for (int step = 0; step < 3; ++step) {
      Batch b = l.next_train(2, 64);
      for (int r = 0; r < 2; ++r) {
        std::string row;
        for (int t = 0; t < 64; ++t) row.push_back(char(b.inputs[r * 64 + t]));
        EXPECT_TRUE(seen.insert(row).second) << "rank " << rank << " step " << step << " row " << r;
      }
    }
  }
  EXPECT_EQ(seen.size(), 12u);
}

TEST(ByteLoader, TooShortTextIsAClearError) {
  auto l = make(std::string(100, 'x'), 1);
  try {
    l.next_train(1, 200);
    FAIL() << "a 90-byte training part fed 201-byte rows";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("test text"), std::string::npos) << e.what();
  }
}

}  // namespace moelab
