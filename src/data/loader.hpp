// What the trainer reads: (rows, seq_len) batches of input and target token ids, a validation
// stream, and a position that checkpoints save and resume restores. Two sources implement it:
// raw bytes of a text file (vocab 256, byte_loader.cpp) and token shards (shard_loader.cpp).
#pragma once
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "config/config.hpp"

namespace moelab {

struct Batch {
  int64_t rows = 0, seq_len = 0;
  std::vector<int32_t> inputs;   // rows * seq_len
  std::vector<int32_t> targets;  // rows * seq_len; -1 = ignored position
};

class DataLoader {
 public:
  virtual ~DataLoader() = default;
  virtual Batch next_train(int64_t rows, int64_t seq_len) = 0;
  // Validation restarts from its beginning on every reset_val(), so each evaluation sees the
  // same tokens.
  virtual void reset_val() = 0;
  virtual Batch next_val(int64_t rows, int64_t seq_len) = 0;
  // Position in the training stream, saved in checkpoints (opaque to the trainer).
  virtual std::vector<int64_t> state() const = 0;
  virtual void restore(const std::vector<int64_t>& state) = 0;
  // Smallest model.vocab that covers every id this source emits.
  virtual int64_t vocab() const = 0;
  // UTF-8 bytes of each token id (for bits per byte); 1 for every byte in raw-bytes mode,
  // 0 for special tokens.
  virtual const std::vector<int32_t>& token_bytes() const = 0;
  virtual std::string describe() const = 0;
};

// The loader for cfg.data; rank/world select disjoint parts of the training stream.
std::unique_ptr<DataLoader> make_loader(const DataConfig& cfg, uint64_t seed, int rank = 0, int world = 1);

}  // namespace moelab
