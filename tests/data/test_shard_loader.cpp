// Shard loader over a folder prepared from a slice of the corpus: rows start with <|bos|> and
// decode to document text, order is fixed by the seed, resume continues exactly, ranks split
// the rows of a single-rank run, and a damaged folder is an error naming the file.
#include <gtest/gtest.h>

#include "core/error.hpp"
#include "data/prepare.hpp"
#include "data/shard_loader.hpp"
#include "data_test_util.hpp"

namespace moelab {
namespace {

// A prepared folder: ~24 Brown documents, the tiny tokenizer, 20% for validation.
struct PreparedFolder {
  testing::ScratchDir dir;
  ShardFolderInfo info;
  std::string text;
  PreparedFolder(int64_t shard_tokens = 100'000'000) {
    const std::string& corpus = default_corpus_text();
    text = corpus.substr(0, corpus.find("\n\n", 280'000) + 1);
    PrepareOptions opt = testing::tiny_prepare(dir, {dir.write("brown.txt", text)}, "shards");
    opt.val_fraction = 0.2;
    opt.shard_tokens = shard_tokens;
    info = prepare_shards(opt);
  }
  DataConfig config() const {
    DataConfig c;
    c.source = "shards";
    c.dir = info.dir;
    return c;
  }
};

const PreparedFolder& folder() {
  static const PreparedFolder f;
  return f;
}

}  // namespace

TEST(ShardLoader, RowsStartWithBosAndDecodeToDocumentText) {
  auto loader = make_loader(folder().config(), 1);
  const Tokenizer& tok = testing::tiny_tokenizer();
  EXPECT_EQ(loader->vocab(), tok.vocab_size());
  ASSERT_EQ(loader->token_bytes().size(), size_t(tok.vocab_size()));
  EXPECT_EQ(loader->token_bytes()[size_t(tok.bos_id())], 0);
  for (int step = 0; step < 5; ++step) {
    Batch b = loader->next_train(4, 128);
    for (int r = 0; r < 4; ++r) {
      ASSERT_EQ(b.inputs[size_t(r * 128)], tok.bos_id()) << "step " << step << " row " << r;
      for (int t = 0; t + 1 < 128; ++t) ASSERT_EQ(b.targets[size_t(r * 128 + t)], b.inputs[size_t(r * 128 + t + 1)]);
      // Each stretch between <|bos|> tokens decodes to a piece of the prepared text.
      std::vector<int32_t> piece;
      for (int t = 1; t <= 128; ++t) {
        int32_t id = t < 128 ? b.inputs[size_t(r * 128 + t)] : b.targets[size_t(r * 128 + 127)];
        if (id == tok.bos_id() || t == 128) {
          if (!piece.empty() && piece.size() > 3) {
            std::string s = tok.decode(std::vector<int32_t>(piece.begin() + 1, piece.end() - 1));
            EXPECT_NE(folder().text.find(s), std::string::npos) << s;
          }
          piece.clear();
        }
        piece.push_back(id);
      }
    }
  }
  Batch v = loader->next_val(2, 128);
  EXPECT_EQ(v.inputs[0], tok.bos_id());
}

TEST(ShardLoader, DeterministicForASeed) {
  auto a = make_loader(folder().config(), 5), b = make_loader(folder().config(), 5), c = make_loader(folder().config(), 6);
  Batch ba = a->next_train(3, 64), bb = b->next_train(3, 64), bc = c->next_train(3, 64);
  EXPECT_EQ(ba.inputs, bb.inputs);
  EXPECT_NE(ba.inputs, bc.inputs);
  a->reset_val();
  Batch v1 = a->next_val(2, 64);
  a->next_val(2, 64);
  a->reset_val();
  EXPECT_EQ(a->next_val(2, 64).inputs, v1.inputs);
}

TEST(ShardLoader, ResumeReproducesTheStreamAcrossBlocksAndEpochs) {
  // Rows of 65 tokens, 256 per block: ~16k tokens a block, so ~17 blocks an epoch; 700 rows
  // of 3 pass block edges and (with ~275k tokens) an epoch edge.
  auto a = make_loader(folder().config(), 9);
  Rng rng(Rng(7).next_u64());
  int64_t skip = 100 + int64_t(rng.below(300));
  for (int64_t i = 0; i < skip; ++i) a->next_train(3, 64);
  auto saved = a->state();
  std::vector<std::vector<int32_t>> expect;
  for (int i = 0; i < 400; ++i) expect.push_back(a->next_train(3, 64).inputs);
  auto b = make_loader(folder().config(), 9);
  b->restore(saved);
  for (int i = 0; i < 400; ++i) ASSERT_EQ(b->next_train(3, 64).inputs, expect[size_t(i)]) << "batch " << i << " after " << skip;
  EXPECT_THROW(b->next_train(3, 32), Error);  // another seq_len cannot continue this position
  EXPECT_THROW(b->restore({1, 2, 3}), Error);
}

TEST(ShardLoader, RanksTakeDisjointRowsOfTheSameStream) {
  auto one = make_loader(folder().config(), 3, 0, 1);
  auto r0 = make_loader(folder().config(), 3, 0, 2), r1 = make_loader(folder().config(), 3, 1, 2);
  for (int step = 0; step < 20; ++step) {
    Batch all = one->next_train(4, 64), b0 = r0->next_train(2, 64), b1 = r1->next_train(2, 64);
    std::vector<int32_t> joined = b0.inputs;
    joined.insert(joined.end(), b1.inputs.begin(), b1.inputs.end());
    ASSERT_EQ(joined, all.inputs) << "step " << step;
    EXPECT_NE(b0.inputs, b1.inputs);
  }
}

TEST(ShardLoader, ManyShardsReadLikeOne) {
  PreparedFolder small(10'000);
  EXPECT_GE(small.info.train.shards.size(), 5u);
  auto a = make_loader(folder().config(), 4), b = make_loader(small.config(), 4);
  for (int i = 0; i < 30; ++i) ASSERT_EQ(a->next_train(2, 100).inputs, b->next_train(2, 100).inputs);
}

TEST(ShardLoader, DamagedFoldersAreErrorsNamingTheFile) {
  PreparedFolder f;
  auto error_of = [&](DataConfig c) {
    try {
      make_loader(c, 1);
    } catch (const Error& e) {
      return std::string(e.what());
    }
    return std::string("(loaded)");
  };
  // A tokenizer other than the shards' own.
  DataConfig other = f.config();
  other.tokenizer = f.dir.file("other.tok");
  train_tokenizer({"a few words of text to learn from"}, 300, 1).save(other.tokenizer);
  EXPECT_NE(error_of(other).find("vocab"), std::string::npos);
  // A shard with a truncated tail.
  std::string shard = f.info.path_of(f.info.val.shards[0]);
  std::filesystem::resize_file(shard, std::filesystem::file_size(shard) - 3);
  std::string e = error_of(f.config());
  EXPECT_NE(e.find(shard), std::string::npos) << e;
  EXPECT_NE(e.find("truncated"), std::string::npos) << e;
  // No meta.json: not a prepared folder.
  std::filesystem::remove(f.info.path_of("meta.json"));
  EXPECT_NE(error_of(f.config()).find("meta.json"), std::string::npos);
  DataConfig missing = f.config();
  missing.dir = f.dir.file("nowhere");
  EXPECT_NE(error_of(missing).find("nowhere"), std::string::npos);
}

}  // namespace moelab
