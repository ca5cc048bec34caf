// Raw-bytes data source (data.source = "bytes"): every byte of a text is a token (vocab 256).
// It needs no tokenizer, so `moelab train` works on the embedded corpus out of the box.
#pragma once
#include <string>
#include <string_view>

#include "data/loader.hpp"

namespace moelab {

class ByteLoader : public DataLoader {
 public:
  // The first (1 - val_fraction) of `text` trains, the rest validates. `origin` names the text
  // in errors. `text` must outlive the loader when `owned` is empty (the embedded corpus does).
  ByteLoader(std::string_view text, std::string owned, std::string origin, double val_fraction, uint64_t seed,
             int rank, int world);

  Batch next_train(int64_t rows, int64_t seq_len) override;
  void reset_val() override { val_pos_ = 0; }
  Batch next_val(int64_t rows, int64_t seq_len) override;
  std::vector<int64_t> state() const override;
  void restore(const std::vector<int64_t>& state) override;
  int64_t vocab() const override { return 256; }
  const std::vector<int32_t>& token_bytes() const override { return token_bytes_; }
  std::string describe() const override;

 private:
  // Fills rows of seq_len + 1 consecutive bytes of region [begin, begin + len), read circularly
  // from `start`, one row every seq_len bytes; this rank's rows only.
  Batch cut(size_t begin, size_t len, size_t start, int64_t rows, int64_t seq_len) const;
  void check_fits(size_t len, int64_t seq_len, const char* which) const;

  std::string owned_;
  std::string_view text_;
  std::string origin_;
  size_t train_len_ = 0;
  uint64_t seed_;
  int rank_, world_;
  // Training position: epoch number and bytes consumed (by all ranks) within it. Each epoch
  // starts at a seed-chosen offset, so epochs see the text split at different places.
  int64_t epoch_ = 0, pos_ = 0;
  int64_t val_pos_ = 0;
  std::vector<int32_t> token_bytes_ = std::vector<int32_t>(256, 1);
};

}  // namespace moelab
