// Token-shard data source (data.source = "shards"): reads the folder `moelab data prepare`
// wrote and packs its documents into rows that each start with <|bos|> (packer.hpp).
//
// Order and resume: the training documents are shuffled per epoch by (seed, epoch), then taken
// in blocks of about kBlockRows rows' worth of tokens, and each block is packed on its own. A
// row is therefore fixed by (epoch, first document of its block, row within the block), which
// is the whole saved position: resume repacks one block and continues exactly. Ranks share the
// row stream; of each batch's rows * world rows, rank r takes the r-th run of `rows`.
#pragma once
#include <memory>

#include "data/loader.hpp"
#include "data/packer.hpp"
#include "data/shard.hpp"
#include "data/tokenizer.hpp"

namespace moelab {

class ShardLoader : public DataLoader {
 public:
  static constexpr int64_t kBlockRows = 256;

  // train and val are shard paths; their vocab and bos id must match the tokenizer's.
  ShardLoader(const std::vector<std::string>& train, const std::vector<std::string>& val, const Tokenizer& tokenizer,
              std::string origin, uint64_t seed, int rank, int world);
  // Streams point into the splits, so the loader stays where it was made.
  ShardLoader(const ShardLoader&) = delete;
  ShardLoader& operator=(const ShardLoader&) = delete;

  Batch next_train(int64_t rows, int64_t seq_len) override;
  void reset_val() override;
  Batch next_val(int64_t rows, int64_t seq_len) override;
  std::vector<int64_t> state() const override;
  void restore(const std::vector<int64_t>& state) override;
  int64_t vocab() const override { return int64_t(token_bytes_.size()); }
  const std::vector<int32_t>& token_bytes() const override { return token_bytes_; }
  std::string describe() const override;

  int32_t bos_id() const { return bos_; }

 private:
  struct Split {
    std::vector<Shard> shards;
    std::vector<Piece> docs;  // each starts with the document's own <|bos|>
    int64_t tokens = 0;
  };
  // Position in one split's row stream, and the packed rows of its current block.
  struct Stream {
    const Split* split = nullptr;
    bool shuffle = false;
    int64_t row_len = 0, epoch = 0, block_start = 0, row_in_block = 0;
    // Derived from the fields above; rebuilt when missing.
    bool ready = false;
    int64_t block_end = 0, order_epoch = -1;
    std::vector<uint32_t> order;
    std::vector<PackedRow> rows;
  };

  Split open_split(const std::vector<std::string>& paths, const char* which);
  void build_block(Stream& s) const;
  const PackedRow& next_row(Stream& s) const;
  Batch next_batch(Stream& s, int64_t rows, int64_t seq_len, const char* which);

  std::string origin_;
  uint64_t seed_;
  int rank_, world_;
  int32_t bos_;
  int64_t vocab_;
  Split train_, val_;
  Stream train_pos_, val_pos_;
  std::vector<int32_t> token_bytes_;
};

std::unique_ptr<DataLoader> make_shard_loader(const DataConfig& cfg, uint64_t seed, int rank, int world);

}  // namespace moelab
