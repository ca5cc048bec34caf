// The `moelab tokenizer` and `moelab data` commands as a user runs them: bad inputs exit
// non-zero with the file named on stderr, and encode | decode round-trips arbitrary bytes.
#include <gtest/gtest.h>

#include <sys/wait.h>

#include <cstdlib>
#include <fstream>

#include "data_test_util.hpp"
#include "common/test_support.hpp"

namespace moelab {
namespace {

struct Result {
  int code;
  std::string err;
};

// Runs `moelab ARGS` with stderr captured to a file in `dir`.
Result run(const testing::ScratchDir& dir, const std::string& args) {
  std::string err = dir.file("stderr.txt");
  std::string cmd = std::string(MOELAB_BINARY) + " " + args + " 2> '" + err + "' > /dev/null";
  int status = std::system(cmd.c_str());
  std::ifstream f(err);
  return {WIFEXITED(status) ? WEXITSTATUS(status) : -1, std::string(std::istreambuf_iterator<char>(f), {})};
}

using test::file_text;

}  // namespace

TEST(DataCli, BadInputsExitNonZeroNamingTheFile) {
  testing::ScratchDir dir;
  std::string out = dir.file("tok.txt");
  Result r = run(dir, "tokenizer train --input " + dir.file("nope.txt") + " --out " + out);
  EXPECT_NE(r.code, 0);
  EXPECT_NE(r.err.find("nope.txt"), std::string::npos) << r.err;
  r = run(dir, "tokenizer train --input " + dir.write("empty.txt", "") + " --out " + out);
  EXPECT_NE(r.code, 0);
  EXPECT_NE(r.err.find("empty.txt"), std::string::npos) << r.err;
  r = run(dir, "tokenizer train --input " + dir.write("bin.txt", std::string("\x7f" "ELF\0\0\1", 7)) + " --out " + out);
  EXPECT_NE(r.code, 0);
  EXPECT_NE(r.err.find("bin.txt: byte offset 4"), std::string::npos) << r.err;
  r = run(dir, "tokenizer train --input " + dir.write("a.txt", "some words\n\nmore words\n") + " --vocab-size 100 --out " + out);
  EXPECT_NE(r.code, 0);
  EXPECT_NE(r.err.find("265"), std::string::npos) << r.err;
  EXPECT_FALSE(std::filesystem::exists(out));
  r = run(dir, "tokenizer train --input " + dir.write("b.jsonl", "{\"text\": \"x\"}\n{\"body\": \"y\"}\n") + " --out " + out);
  EXPECT_NE(r.code, 0);
  EXPECT_NE(r.err.find("b.jsonl: line 2"), std::string::npos) << r.err;
}

TEST(DataCli, TrainEncodeDecodePrepare) {
  testing::ScratchDir dir;
  std::string tok = dir.file("tok.txt");
  std::string text = default_corpus_text().substr(0, 60'000);
  std::string txt = dir.write("text.txt", text);
  ASSERT_EQ(run(dir, "tokenizer train --input " + txt + " --vocab-size 400 --out " + tok).code, 0);
  EXPECT_EQ(Tokenizer::load(tok).vocab_size(), 400);
  // Random bytes through encode | decode, in both the text and the binary id forms.
  Rng rng(Rng(71).next_u64());
  std::string bytes(3000, '\0');
  for (auto& c : bytes) c = char(rng.below(256));
  bytes += text.substr(0, 2000);
  std::string in = dir.write("in.bin", bytes), back = dir.file("back.bin");
  for (std::string mode : {"", " --binary"}) {
    std::string cmd = std::string(MOELAB_BINARY) + " tokenizer encode --tokenizer " + tok + mode + " < " + in + " | " +
                      MOELAB_BINARY + " tokenizer decode --tokenizer " + tok + mode + " > " + back;
    ASSERT_EQ(std::system(cmd.c_str()), 0) << cmd;
    EXPECT_EQ(file_text(back), bytes) << "mode" << mode;
  }
  Result r = run(dir, "tokenizer decode --tokenizer " + tok + " < " + dir.write("ids.txt", "12\n99999\n"));
  EXPECT_NE(r.code, 0);
  EXPECT_NE(r.err.find("line 2"), std::string::npos) << r.err;
  std::string shards = dir.file("shards");
  r = run(dir, "data prepare --tokenizer " + tok + " --input " + txt + " --out " + shards + " --val-fraction 0.2");
  EXPECT_EQ(r.code, 0) << r.err;
  EXPECT_TRUE(std::filesystem::exists(shards + "/meta.json"));
  r = run(dir, "data prepare --tokenizer " + tok + " --input " + dir.write("j.jsonl", "{\"text\": 1}\n") + " --out " + shards + "_j");
  EXPECT_NE(r.code, 0);
  EXPECT_NE(r.err.find("j.jsonl: line 1"), std::string::npos) << r.err;
}

// A --out that is a folder is refused without leaving DIR.tmp beside it; a vocabulary far larger
// than the text can give shows the merges really made, not the requested count; a mistyped
// subcommand is answered with the nearest one.
TEST(DataCli, TokenizerOutputsAndMessagesStayTrue) {
  testing::ScratchDir dir;
  std::string text = dir.write("one.txt", "a single line of text with a few repeated words words words\n");
  std::filesystem::create_directories(dir.file("folder"));
  Result r = run(dir, "tokenizer train --input " + text + " --vocab-size 300 --out " + dir.file("folder"));
  EXPECT_EQ(r.code, 1) << r.err;
  EXPECT_NE(r.err.find("is a folder"), std::string::npos) << r.err;
  EXPECT_FALSE(std::filesystem::exists(dir.file("folder.tmp")));

  ASSERT_EQ(run(dir, "tokenizer train --input " + text + " --vocab-size 300 --out " + dir.file("tok.txt")).code, 0);
  r = run(dir, "tokenizer export --tokenizer " + dir.file("tok.txt") + " --out " + dir.file("folder"));
  EXPECT_EQ(r.code, 1) << r.err;
  EXPECT_FALSE(std::filesystem::exists(dir.file("folder.tmp")));

  r = run(dir, "tokenizer train --input " + text + " --vocab-size 1000000000 --out " + dir.file("big.txt"));
  EXPECT_EQ(r.code, 0) << r.err;
  EXPECT_EQ(r.err.find("999999"), std::string::npos) << r.err;
  EXPECT_NE(r.err.find("merges"), std::string::npos) << r.err;

  r = run(dir, "tokenizer trian --input " + text);
  EXPECT_EQ(r.code, 2) << r.err;
  EXPECT_NE(r.err.find("unknown subcommand 'trian' of 'moelab tokenizer'; did you mean 'train'?"), std::string::npos) << r.err;
}

}  // namespace moelab
