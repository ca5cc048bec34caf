// Shard loader: document index from <|bos|> positions, per-epoch shuffle, block-wise best-fit
// packing, rank selection, and the position that checkpoints keep.
#include "data/shard_loader.hpp"

#include <cstdio>

#include "core/error.hpp"
#include "core/rng.hpp"
#include "data/shard_folder.hpp"

namespace moelab {
namespace {
constexpr int64_t kStateTag = 0x7368617264;  // "shard": marks a shard-loader position
}

ShardLoader::ShardLoader(const std::vector<std::string>& train, const std::vector<std::string>& val,
                         const Tokenizer& tokenizer, std::string origin, uint64_t seed, int rank, int world)
    : origin_(std::move(origin)), seed_(seed), rank_(rank), world_(world), bos_(tokenizer.bos_id()),
      vocab_(tokenizer.vocab_size()), token_bytes_(tokenizer.token_byte_lengths()) {
  if (world < 1 || rank < 0 || rank >= world)
    throw Error("data loader: rank " + std::to_string(rank) + " is outside world size " + std::to_string(world));
  train_ = open_split(train, "training");
  val_ = open_split(val, "validation");
  train_pos_.split = &train_;
  train_pos_.shuffle = true;
  val_pos_.split = &val_;
}

ShardLoader::Split ShardLoader::open_split(const std::vector<std::string>& paths, const char* which) {
  Split s;
  for (const auto& path : paths) {
    Shard shard(path);
    if (shard.vocab() != vocab_ || shard.bos_id() != bos_)
      throw Error(path + ": made with a tokenizer of vocab " + std::to_string(shard.vocab()) + " and <|bos|> " +
                  std::to_string(shard.bos_id()) + ", but the tokenizer in use has vocab " + std::to_string(vocab_) +
                  " and <|bos|> " + std::to_string(bos_) + "; use the tokenizer the shards were prepared with");
    if (shard.size() > 0 && shard[0] != bos_)
      throw Error(path + ": does not start with <|bos|> (id " + std::to_string(bos_) + "): damaged shard");
    uint32_t index = uint32_t(s.shards.size());
    int64_t start = 0;
    for (int64_t i = 1; i <= shard.size(); ++i) {
      if (i == shard.size() || shard[i] == bos_) {
        s.docs.push_back({index, false, start, i - start});
        start = i;
      }
      if (i < shard.size() && shard[i] >= vocab_)
        throw Error(path + ": token " + std::to_string(i) + " has id " + std::to_string(shard[i]) + ", outside vocab " +
                    std::to_string(vocab_) + ": damaged shard");
    }
    s.tokens += shard.size();
    s.shards.push_back(std::move(shard));
  }
  if (s.docs.empty())
    throw Error(origin_ + ": the " + which + " split has no tokens; prepare more text (or a larger --val-fraction)");
  return s;
}

void ShardLoader::build_block(Stream& s) const {
  const Split& split = *s.split;
  const int64_t n = int64_t(split.docs.size());
  if (s.order_epoch != s.epoch) {
    s.order.resize(size_t(n));
    for (int64_t i = 0; i < n; ++i) s.order[size_t(i)] = uint32_t(i);
    if (s.shuffle) {
      Rng rng(seed_, 0x73687566ull + uint64_t(s.epoch));
      for (int64_t i = n - 1; i > 0; --i) std::swap(s.order[size_t(i)], s.order[rng.below(uint64_t(i + 1))]);
    }
    s.order_epoch = s.epoch;
  }
  std::vector<Piece> pieces;
  int64_t tokens = 0, i = s.block_start;
  for (; i < n && tokens < kBlockRows * s.row_len; ++i) {
    pieces.push_back(split.docs[s.order[size_t(i)]]);
    tokens += pieces.back().size();
  }
  s.block_end = i;
  s.rows = pack_best_fit(pieces, s.row_len);
  s.ready = true;
}

const PackedRow& ShardLoader::next_row(Stream& s) const {
  if (!s.ready) build_block(s);
  int64_t empty_blocks = 0;
  while (s.row_in_block >= int64_t(s.rows.size())) {
    if (s.rows.empty() && ++empty_blocks > 2 * int64_t(s.split->docs.size()) + 2)
      throw Error(origin_ + ": too few tokens to fill a single row of " + std::to_string(s.row_len) +
                  " tokens; prepare more text or use a smaller train.seq_len");
    s.block_start = s.block_end;
    s.row_in_block = 0;
    if (s.block_start >= int64_t(s.split->docs.size())) {
      ++s.epoch;
      s.block_start = 0;
    }
    build_block(s);
  }
  return s.rows[size_t(s.row_in_block++)];
}

Batch ShardLoader::next_batch(Stream& s, int64_t rows, int64_t seq_len, const char* which) {
  if (seq_len < 1 || rows < 1) throw Error("data loader: rows and seq_len must be positive");
  if (s.row_len != seq_len + 1) {
    if (s.row_len != 0 && (s.epoch != 0 || s.block_start != 0 || s.row_in_block != 0))
      throw Error(std::string("data loader: the ") + which + " position was made with rows of seq_len " +
                  std::to_string(s.row_len - 1) + ", now asked for " + std::to_string(seq_len) +
                  "; resume with the same train.seq_len");
    s.row_len = seq_len + 1;
    s.ready = false;
  }
  Batch b;
  b.rows = rows;
  b.seq_len = seq_len;
  b.inputs.resize(size_t(rows * seq_len));
  b.targets.resize(size_t(rows * seq_len));
  std::vector<int32_t> row(size_t(seq_len + 1));
  for (int64_t g = 0; g < rows * world_; ++g) {
    const PackedRow& layout = next_row(s);
    int64_t r = g - int64_t(rank_) * rows;
    if (r < 0 || r >= rows) continue;  // another rank's row
    int64_t at = 0;
    for (const Piece& p : layout) {
      if (p.bos_prefix) row[size_t(at++)] = bos_;
      s.split->shards[p.shard].copy(p.begin, p.length, row.data() + at);
      at += p.length;
    }
    MOELAB_CHECK(at == seq_len + 1, "packed row length");
    std::copy(row.begin(), row.end() - 1, b.inputs.begin() + r * seq_len);
    std::copy(row.begin() + 1, row.end(), b.targets.begin() + r * seq_len);
  }
  return b;
}

Batch ShardLoader::next_train(int64_t rows, int64_t seq_len) { return next_batch(train_pos_, rows, seq_len, "training"); }

void ShardLoader::reset_val() {
  bool keep = val_pos_.ready && val_pos_.epoch == 0 && val_pos_.block_start == 0;
  val_pos_.epoch = 0;
  val_pos_.block_start = 0;
  val_pos_.row_in_block = 0;
  if (!keep) val_pos_.ready = false;
}

Batch ShardLoader::next_val(int64_t rows, int64_t seq_len) { return next_batch(val_pos_, rows, seq_len, "validation"); }

std::vector<int64_t> ShardLoader::state() const {
  return {kStateTag, train_pos_.row_len, train_pos_.epoch, train_pos_.block_start, train_pos_.row_in_block};
}

void ShardLoader::restore(const std::vector<int64_t>& st) {
  if (st.size() != 5 || st[0] != kStateTag)
    throw Error("data loader: the checkpoint's data position was not written by the shard loader "
                "(data.source differs from the run that saved it); resume with the same data settings");
  if (st[1] < 0 || st[2] < 0 || st[3] < 0 || st[4] < 0 || st[3] > int64_t(train_.docs.size()))
    throw Error("data loader: the checkpoint's data position is outside this data (damaged checkpoint, or data.dir changed)");
  train_pos_.row_len = st[1];
  train_pos_.epoch = st[2];
  train_pos_.block_start = st[3];
  train_pos_.row_in_block = st[4];
  train_pos_.ready = false;
}

std::string ShardLoader::describe() const {
  char buf[512];
  std::snprintf(buf, sizeof buf, "token shards in %s: %.2fM train tokens (%zu documents), %.2fM validation tokens, vocab %lld",
                origin_.c_str(), double(train_.tokens) / 1e6, train_.docs.size(), double(val_.tokens) / 1e6,
                (long long)vocab_);
  return buf;
}

std::unique_ptr<DataLoader> make_shard_loader(const DataConfig& cfg, uint64_t seed, int rank, int world) {
  ShardFolderInfo info = read_shard_folder(cfg.dir);
  std::string tok_path = cfg.tokenizer.empty() ? info.path_of(info.tokenizer) : cfg.tokenizer;
  Tokenizer tok = Tokenizer::load(tok_path);
  if (tok.vocab_size() != info.vocab || tok.bos_id() != info.bos_id)
    throw Error("data.tokenizer = " + tok_path + " has vocab " + std::to_string(tok.vocab_size()) +
                ", but the shards in " + cfg.dir + " were made with vocab " + std::to_string(info.vocab) +
                "; leave data.tokenizer empty to use the one recorded with the shards");
  std::vector<std::string> train, val;
  for (const auto& n : info.train.shards) train.push_back(info.path_of(n));
  for (const auto& n : info.val.shards) val.push_back(info.path_of(n));
  return std::make_unique<ShardLoader>(train, val, tok, cfg.dir, seed, rank, world);
}

}  // namespace moelab
