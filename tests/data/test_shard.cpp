// Shard files: exact round-trip in both token widths, and loud errors for a wrong magic,
// version, width, or a truncated or overlong tail.
#include <gtest/gtest.h>

#include "core/error.hpp"
#include "data/shard.hpp"
#include "data_test_util.hpp"
#include "common/test_support.hpp"

namespace moelab {
namespace {

std::vector<int32_t> random_ids(size_t n, int64_t vocab, Rng& rng) {
  std::vector<int32_t> ids(n);
  for (auto& id : ids) id = int32_t(rng.below(uint64_t(vocab)));
  return ids;
}

std::string error_opening(const std::string& path) {
  return test::error_of([&] { Shard s(path); }, "(opened)");
}

using test::file_text;

}  // namespace

TEST(Shard, RoundTripsIdsInBothWidths) {
  testing::ScratchDir dir;
  Rng rng(Rng(31).next_u64());
  for (int64_t vocab : {int64_t(4096), int64_t(65536), int64_t(100'000)}) {
    std::string path = dir.file(std::to_string(vocab) + ".bin");
    auto ids = random_ids(5000 + rng.below(5000), vocab, rng);
    {
      ShardWriter w(path, vocab, 7);
      w.append(ids.data(), 1234);
      w.append(ids.data() + 1234, ids.size() - 1234);
      w.finish();
    }
    Shard s(path);
    EXPECT_EQ(s.width(), vocab <= 65536 ? 2u : 4u);
    EXPECT_EQ(s.vocab(), vocab);
    EXPECT_EQ(s.bos_id(), 7);
    ASSERT_EQ(s.size(), int64_t(ids.size()));
    std::vector<int32_t> back(ids.size());
    s.copy(0, s.size(), back.data());
    EXPECT_EQ(back, ids);
    EXPECT_EQ(s[17], ids[17]);
    EXPECT_EQ(std::filesystem::file_size(path), kShardHeaderBytes + ids.size() * s.width());
  }
}

TEST(Shard, AnUnfinishedWriterLeavesNoShard) {
  testing::ScratchDir dir;
  {
    ShardWriter w(dir.file("x.bin"), 300, 1);
    int32_t ids[3] = {1, 2, 3};
    w.append(ids, 3);
  }
  EXPECT_FALSE(std::filesystem::exists(dir.file("x.bin")));
  EXPECT_FALSE(std::filesystem::exists(dir.file("x.bin.tmp")));
  ShardWriter w(dir.file("y.bin"), 300, 1);
  int32_t bad = 300;
  EXPECT_THROW(w.append(&bad, 1), Error);
}

TEST(Shard, CorruptFilesAreRejectedNamingFileAndOffset) {
  testing::ScratchDir dir;
  Rng rng(Rng(32).next_u64());
  auto ids = random_ids(1000, 4096, rng);
  std::string good = dir.file("good.bin");
  {
    ShardWriter w(good, 4096, 0);
    w.append(ids.data(), ids.size());
    w.finish();
  }
  const std::string bytes = file_text(good);

  std::string magic = bytes;
  magic[0] = 'X';
  std::string e = error_opening(dir.write("magic.bin", magic));
  EXPECT_NE(e.find("magic.bin"), std::string::npos) << e;
  EXPECT_NE(e.find("magic"), std::string::npos) << e;

  std::string version = bytes;
  version[8] = 9;
  e = error_opening(dir.write("version.bin", version));
  EXPECT_NE(e.find("version.bin: byte offset 8"), std::string::npos) << e;
  EXPECT_NE(e.find("version 9"), std::string::npos) << e;

  std::string width = bytes;
  width[12] = 3;
  e = error_opening(dir.write("width.bin", width));
  EXPECT_NE(e.find("width 3"), std::string::npos) << e;

  e = error_opening(dir.write("cut.bin", bytes.substr(0, bytes.size() - 1 - rng.below(500))));
  EXPECT_NE(e.find("cut.bin: truncated"), std::string::npos) << e;

  e = error_opening(dir.write("long.bin", bytes + "zz"));
  EXPECT_NE(e.find("2 unexpected bytes"), std::string::npos) << e;

  e = error_opening(dir.write("tiny.bin", bytes.substr(0, 10)));
  EXPECT_NE(e.find("tiny.bin"), std::string::npos) << e;

  e = error_opening(dir.file("absent.bin"));
  EXPECT_NE(e.find("absent.bin"), std::string::npos) << e;
}

}  // namespace moelab
