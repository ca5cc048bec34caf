// Best-fit packing: rows are exactly full, each starts with <|bos|>, whole documents are
// preferred, and no token is lost except in the final partial row.
#include <gtest/gtest.h>

#include <map>

#include "core/rng.hpp"
#include "data/packer.hpp"

namespace moelab {

TEST(Packer, RowsAreFullStartWithBosAndLoseNothingButTheTail) {
  Rng rng(Rng(41).next_u64());
  for (int trial = 0; trial < 30; ++trial) {
    const int64_t row_len = 8 + int64_t(rng.below(120));
    std::vector<Piece> docs;
    int64_t at = 0, total = 0;
    const size_t n = 1 + rng.below(80);
    for (size_t i = 0; i < n; ++i) {
      int64_t len = 1 + int64_t(rng.below(trial % 2 ? 40 : 400));  // short docs, or docs longer than rows
      docs.push_back({0, false, at, len});
      at += len;
      total += len;
    }
    auto rows = pack_best_fit(docs, row_len);
    // Token positions 'at' where a document starts hold <|bos|> in the stream.
    std::map<int64_t, bool> doc_start;
    for (auto& d : docs) doc_start[d.begin] = true;
    std::vector<int> used(size_t(total), 0);
    for (auto& row : rows) {
      int64_t size = 0;
      for (auto& p : row) size += p.size();
      EXPECT_EQ(size, row_len);
      ASSERT_FALSE(row.empty());
      EXPECT_TRUE(row[0].bos_prefix || doc_start.count(row[0].begin)) << "row does not start with <|bos|>";
      for (auto& p : row)
        for (int64_t t = p.begin; t < p.begin + p.length; ++t) used[size_t(t)]++;
    }
    int64_t covered = 0;
    for (int u : used) {
      EXPECT_LE(u, 1) << "a token was packed twice";
      covered += u;
    }
    EXPECT_GT(covered, total - row_len) << "more than one row's worth of tokens was dropped";
  }
}

TEST(Packer, PrefersTheLargestWholeDocumentThatFits) {
  // Row of 10: the best fit for an empty row is the 10-token document, then 6 + 4.
  std::vector<Piece> docs = {{0, false, 0, 6}, {0, false, 6, 10}, {0, false, 16, 4}, {0, false, 20, 3}};
  auto rows = pack_best_fit(docs, 10);
  ASSERT_GE(rows.size(), 2u);
  ASSERT_EQ(rows[0].size(), 1u);
  EXPECT_EQ(rows[0][0].length, 10);
  ASSERT_EQ(rows[1].size(), 2u);
  EXPECT_EQ(rows[1][0].length, 6);
  EXPECT_EQ(rows[1][1].length, 4);
  // Only 3 tokens remain: not a full row, dropped.
  EXPECT_EQ(rows.size(), 2u);
}

TEST(Packer, CroppedTailsComeBackLedByBos) {
  std::vector<Piece> docs = {{0, false, 0, 25}};
  auto rows = pack_best_fit(docs, 10);
  // 25 tokens: row 1 takes 10; the tail (15 + bos = 16) gives row 2 (bos + 9); then 7 left: dropped.
  ASSERT_EQ(rows.size(), 2u);
  EXPECT_FALSE(rows[0][0].bos_prefix);
  EXPECT_TRUE(rows[1][0].bos_prefix);
  EXPECT_EQ(rows[1][0].begin, 10);
  EXPECT_EQ(rows[1][0].length, 9);
}

}  // namespace moelab
