// Input checks and `data prepare`: documents from text and JSONL, line-numbered JSONL errors,
// binary or empty inputs refused, and shards that hold exactly the documents, each after <|bos|>.
#include <gtest/gtest.h>

#include <algorithm>
#include <filesystem>

#include <nlohmann/json.hpp>

#include "core/error.hpp"
#include "data/documents.hpp"
#include "data/prepare.hpp"
#include "data/shard.hpp"
#include "data/text_input.hpp"
#include "data_test_util.hpp"
#include "common/test_support.hpp"

namespace moelab {
namespace {

using test::error_of;

std::vector<std::string> documents_of(const std::string& path) {
  std::vector<std::string> docs;
  for_each_document(path, [&](std::string_view d) { docs.emplace_back(d); });
  return docs;
}

}  // namespace

TEST(Documents, TextSplitsAtBlankLinesAndJsonlReadsText) {
  testing::ScratchDir dir;
  auto docs = documents_of(dir.write("a.txt", "\n\none\ntwo\n\n  \n\nthree\n\n"));
  ASSERT_EQ(docs.size(), 2u);
  EXPECT_EQ(docs[0], "one\ntwo\n");
  EXPECT_EQ(docs[1], "three\n");
  docs = documents_of(dir.write("b.jsonl", "{\"text\": \"first\\n\", \"id\": 1}\n\n{\"text\": \"caf\\u00e9\"}\n"));
  ASSERT_EQ(docs.size(), 2u);
  EXPECT_EQ(docs[0], "first\n");
  EXPECT_EQ(docs[1], "caf\xC3\xA9");
}

TEST(Documents, BadInputsNameTheFileAndLine) {
  testing::ScratchDir dir;
  std::string e = error_of([&] { documents_of(dir.write("c.jsonl", "{\"text\": \"ok\"}\n{\"txt\": \"no\"}\n")); });
  EXPECT_NE(e.find("c.jsonl: line 2"), std::string::npos) << e;
  EXPECT_NE(e.find("\"text\""), std::string::npos) << e;
  e = error_of([&] { documents_of(dir.write("d.jsonl", "{\"text\": \"ok\"}\n\n{\"text\": 5}\n")); });
  EXPECT_NE(e.find("d.jsonl: line 3"), std::string::npos) << e;
  e = error_of([&] { documents_of(dir.write("e.jsonl", "{\"text\": \"ok\"}\n{not json\n")); });
  EXPECT_NE(e.find("e.jsonl: line 2"), std::string::npos) << e;
  e = error_of([&] { documents_of(dir.write("empty.txt", "")); });
  EXPECT_NE(e.find("empty.txt"), std::string::npos) << e;
  e = error_of([&] { documents_of(dir.write("blank.txt", "\n \n\n")); });
  EXPECT_NE(e.find("blank.txt: holds no document"), std::string::npos) << e;
  e = error_of([&] { documents_of(dir.file("missing.txt")); });
  EXPECT_NE(e.find("missing.txt: file not found"), std::string::npos) << e;
  // Binary junk: random bytes, and text with a NUL in it.
  Rng rng(Rng(51).next_u64());
  std::string junk(4000, '\0');
  for (auto& c : junk) c = char(rng.below(256));
  e = error_of([&] { documents_of(dir.write("junk.txt", junk)); });
  EXPECT_NE(e.find("junk.txt: "), std::string::npos) << e;
  e = error_of([&] { documents_of(dir.write("nul.txt", std::string("hello\0world", 11))); });
  EXPECT_NE(e.find("nul.txt: byte offset 5"), std::string::npos) << e;
  e = error_of([&] { documents_of(dir.write("junk.jsonl", junk)); });
  EXPECT_NE(e.find("junk.jsonl: line 1"), std::string::npos) << e;
  // A few stray invalid bytes in real text are tolerated (the tokenizer handles any bytes).
  std::string text = default_corpus_text().substr(0, 20'000);
  text[100] = char(0xff);
  EXPECT_NO_THROW(check_is_text(text, "mostly text"));
}

TEST(Prepare, ShardsHoldEveryDocumentAfterBosWithAnEvenValidationSplit) {
  testing::ScratchDir dir;
  const Tokenizer& tok = testing::tiny_tokenizer();
  // 30 short documents over two files, one text and one JSONL.
  std::vector<std::string> docs;
  std::string txt, jsonl;
  Rng rng(Rng(61).next_u64());
  for (int i = 0; i < 30; ++i) {
    std::string d = default_corpus_text().substr(rng.below(1'000'000), 50 + rng.below(200));
    for (auto& c : d)
      if (c == '\n') c = ' ';
    d += "\n";
    docs.push_back(d);
    if (i < 20)
      txt += d + "\n";
    else
      jsonl += nlohmann::json({{"text", d}}).dump() + "\n";
  }
  PrepareOptions opt = testing::tiny_prepare(dir, {dir.write("a.txt", txt), dir.write("b.jsonl", jsonl)});
  opt.val_fraction = 0.1;
  ShardFolderInfo info = prepare_shards(opt);
  EXPECT_EQ(info.train.documents, 27);
  EXPECT_EQ(info.val.documents, 3);  // documents 9, 19 and 29
  std::vector<std::string> val_docs;
  for (auto [split, names] : {std::pair{&info.train, "train"}, std::pair{&info.val, "val"}}) {
    int64_t tokens = 0;
    std::string decoded;
    for (auto& name : split->shards) {
      Shard s(info.path_of(name));
      EXPECT_EQ(s[0], tok.bos_id()) << names;
      std::vector<int32_t> ids(size_t(s.size()));
      s.copy(0, s.size(), ids.data());
      tokens += s.size();
      decoded += tok.decode(ids);
    }
    EXPECT_EQ(tokens, split->tokens);
    std::string expect;
    for (size_t i = 0; i < docs.size(); ++i)
      if (((i + 1) % 10 == 0) == (split == &info.val)) expect += "<|bos|>" + docs[i];
    EXPECT_EQ(decoded, expect) << names;
  }
  // The tokenizer is recorded beside the shards.
  EXPECT_EQ(Tokenizer::load(info.path_of(info.tokenizer)).merges(), tok.merges());
}

// A single text file without blank lines is one document: it is split by position, its last
// val_fraction of tokens going to validation, and the two splits together hold the whole text.
TEST(Prepare, OneDocumentIsSplitByPosition) {
  testing::ScratchDir dir;
  const Tokenizer& tok = testing::tiny_tokenizer();
  Rng rng(Rng(71).next_u64());
  std::string text = default_corpus_text().substr(rng.below(1'000'000), 4000);
  for (auto& c : text)
    if (c == '\n') c = ' ';  // no blank line anywhere: one document
  PrepareOptions opt = testing::tiny_prepare(dir, {dir.write("one.txt", text)});
  opt.val_fraction = 0.1;
  ShardFolderInfo info = prepare_shards(opt);
  ASSERT_EQ(info.train.documents, 1);
  ASSERT_EQ(info.val.documents, 1);
  std::vector<int32_t> all = {tok.bos_id()};
  tok.encode_append(text, all);
  const int64_t n = int64_t(all.size()) - 1;
  EXPECT_EQ(info.val.tokens - 1, std::llround(double(n) * 0.1));  // its own BOS, then the tail
  EXPECT_EQ(info.train.tokens + info.val.tokens - 1, int64_t(all.size()));
  std::string decoded[2];
  for (int k = 0; k < 2; ++k)
    for (auto& name : (k == 0 ? info.train : info.val).shards) {
      Shard s(info.path_of(name));
      EXPECT_EQ(s[0], tok.bos_id());
      std::vector<int32_t> ids(size_t(s.size()));
      s.copy(0, s.size(), ids.data());
      decoded[k] += tok.decode(std::vector<int32_t>(ids.begin() + 1, ids.end()));
    }
  EXPECT_EQ(decoded[0] + decoded[1], text);
  EXPECT_FALSE(decoded[1].empty());
}

TEST(Prepare, RefusesBadInputsBeforeWritingShards) {
  testing::ScratchDir dir;
  PrepareOptions opt = testing::tiny_prepare(dir, {dir.write("ok.txt", "one\n\ntwo\n"), dir.file("missing.txt")});
  const std::string tok_path = opt.tokenizer;
  EXPECT_NE(error_of([&] { prepare_shards(opt); }).find("missing.txt"), std::string::npos);
  EXPECT_FALSE(std::filesystem::exists(dir.file("out")));
  opt.inputs = {dir.write("one.txt", "a")};  // one document of one token: nothing to split
  EXPECT_NE(error_of([&] { prepare_shards(opt); }).find("too few"), std::string::npos);
  EXPECT_FALSE(std::filesystem::exists(dir.file("out/meta.json")));
  opt.inputs = {dir.file("ok.txt")};
  opt.tokenizer = dir.write("bad.tok", "not a tokenizer\n");
  EXPECT_NE(error_of([&] { prepare_shards(opt); }).find("bad.tok: line 1"), std::string::npos);
  opt.tokenizer = tok_path;
  opt.val_fraction = 0;
  EXPECT_NE(error_of([&] { prepare_shards(opt); }).find("--val-fraction"), std::string::npos);
}

// An input that fails part way (Latin-1 text is not UTF-8) leaves nothing: not the folder, not
// the tokenizer copy written before the documents were read.
TEST(Prepare, AFailedPrepareLeavesNothingBehind) {
  testing::ScratchDir dir;
  PrepareOptions opt = testing::tiny_prepare(dir, {dir.write("latin1.txt", "one doc\n\ncaf\xe9 au lait\n\nthree\n")});
  EXPECT_NE(error_of([&] { prepare_shards(opt); }), "");
  EXPECT_FALSE(std::filesystem::exists(dir.file("out")));
  // A folder that existed keeps what was there and gains nothing.
  std::filesystem::create_directories(dir.file("mine"));
  dir.write("mine/notes.txt", "mine\n");
  opt.out = dir.file("mine");
  EXPECT_NE(error_of([&] { prepare_shards(opt); }), "");
  std::vector<std::string> left;
  for (const auto& e : std::filesystem::directory_iterator(dir.file("mine"))) left.push_back(e.path().filename().string());
  EXPECT_EQ(left, std::vector<std::string>{"notes.txt"});
}

// A folder that already holds shards is refused and left as it was; --force removes the old
// shards (those beyond the new ones too) before writing the new folder.
TEST(Prepare, AFolderWithShardsIsRefusedUnlessForced) {
  testing::ScratchDir dir;
  PrepareOptions opt = testing::tiny_prepare(dir, {});
  std::string docs;
  for (int i = 0; i < 40; ++i) docs += "document number " + std::to_string(i) + "\n\n";
  opt.inputs = {dir.write("docs.txt", docs)};
  prepare_shards(opt);
  dir.write("out/train_000031.bin", "a later shard of an earlier, larger prepare");
  auto listing = [&] {
    std::vector<std::string> names;
    for (const auto& e : std::filesystem::directory_iterator(dir.file("out"))) names.push_back(e.path().filename().string());
    std::sort(names.begin(), names.end());
    return names;
  };
  const auto before = listing();
  const std::string msg = error_of([&] { prepare_shards(opt); });
  EXPECT_NE(msg.find("already holds a shard folder"), std::string::npos) << msg;
  EXPECT_NE(msg.find("--force"), std::string::npos) << msg;
  EXPECT_EQ(listing(), before);
  opt.force = true;
  prepare_shards(opt);
  EXPECT_FALSE(std::filesystem::exists(dir.file("out/train_000031.bin")));
  const auto after = listing();
  EXPECT_EQ(std::count(after.begin(), after.end(), "meta.json"), 1);
  EXPECT_LT(after.size(), before.size());
}

}  // namespace moelab
