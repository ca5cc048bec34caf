// The embedded corpus decompresses to the documented text, and the inflater rejects damage.
#include <gtest/gtest.h>

#include "core/error.hpp"
#include "data/embedded_corpus.hpp"
#include "data/gunzip.hpp"

namespace moelab {

TEST(EmbeddedCorpus, IsTheBrownCorpusAsRunningText) {
  const std::string& text = default_corpus_text();
  EXPECT_GT(text.size(), 5'000'000u);
  EXPECT_LT(text.size(), 8'000'000u);
  EXPECT_EQ(text.rfind("The Fulton County Grand Jury said Friday", 0), 0u);
  // Tags are gone: no word/tag pairs such as "jury/nn".
  EXPECT_EQ(text.find("/nn"), std::string::npos);
  EXPECT_EQ(text.find("/at "), std::string::npos);
  // 500 documents, separated by one blank line.
  size_t docs = 1;
  for (size_t at = text.find("\n\n"); at != std::string::npos; at = text.find("\n\n", at + 2)) ++docs;
  EXPECT_EQ(docs, 500u);
}

TEST(Gunzip, RejectsDamagedAndTruncatedStreams) {
  std::string gz(embedded_corpus_compressed().substr(0));
  ASSERT_GT(gz.size(), 1000u);
  std::string flipped = gz;
  flipped[gz.size() / 2] ^= 0x10;
  EXPECT_THROW(gunzip(flipped, "flipped"), Error);
  EXPECT_THROW(gunzip(gz.substr(0, gz.size() / 3), "cut"), Error);
  EXPECT_THROW(gunzip("not gzip at all, just words", "text"), Error);
  try {
    gunzip(gz.substr(0, gz.size() - 5), "short.gz");
    FAIL() << "a stream without its trailer was accepted";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("short.gz"), std::string::npos);
  }
}

TEST(Crc32, MatchesTheStandardCheckValue) {
  EXPECT_EQ(crc32("123456789"), 0xCBF43926u);
  EXPECT_EQ(crc32(""), 0u);
}

}  // namespace moelab
