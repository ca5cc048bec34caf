// Raw-bytes loader. A batch of `rows` rows for `world` ranks is one contiguous stretch of the
// text, rank r taking the r-th block of rows, so ranks read disjoint bytes and the position is
// two integers that make resume exact.
#include "data/byte_loader.hpp"

#include <cstdio>

#include "core/error.hpp"
#include "core/rng.hpp"

namespace moelab {
namespace {
constexpr int64_t kStateTag = 0x6279746573;  // "bytes": marks a byte-loader position
}

ByteLoader::ByteLoader(std::string_view text, std::string owned, std::string origin, double val_fraction,
                       uint64_t seed, int rank, int world)
    : owned_(std::move(owned)), text_(owned_.empty() ? text : std::string_view(owned_)), origin_(std::move(origin)),
      seed_(seed), rank_(rank), world_(world) {
  if (world < 1 || rank < 0 || rank >= world)
    throw Error("data loader: rank " + std::to_string(rank) + " is outside world size " + std::to_string(world));
  if (!(val_fraction > 0 && val_fraction < 1))
    throw Error("data.val_fraction = " + std::to_string(val_fraction) + " must be in (0, 1); use e.g. 0.05");
  size_t val_len = size_t(double(text_.size()) * val_fraction);
  train_len_ = text_.size() - val_len;
}

void ByteLoader::check_fits(size_t len, int64_t seq_len, const char* which) const {
  if (seq_len < 1) throw Error("data loader: seq_len must be positive");
  if (len < size_t(seq_len) + 1)
    throw Error(origin_ + ": its " + which + " part has " + std::to_string(len) + " bytes, fewer than train.seq_len + 1 = " +
                std::to_string(seq_len + 1) + "; use a longer text, a smaller train.seq_len" +
                (std::string(which) == "validation" ? ", or a larger data.val_fraction" : ""));
}

Batch ByteLoader::cut(size_t begin, size_t len, size_t start, int64_t rows, int64_t seq_len) const {
  Batch b;
  b.rows = rows;
  b.seq_len = seq_len;
  b.inputs.resize(size_t(rows * seq_len));
  b.targets.resize(size_t(rows * seq_len));
  const auto* bytes = reinterpret_cast<const unsigned char*>(text_.data()) + begin;
  for (int64_t r = 0; r < rows; ++r) {
    size_t row_start = (start + size_t((int64_t(rank_) * rows + r) * seq_len)) % len;
    int32_t* in = b.inputs.data() + r * seq_len;
    int32_t* tg = b.targets.data() + r * seq_len;
    size_t at = row_start;
    int32_t prev = bytes[at];
    for (int64_t t = 0; t < seq_len; ++t) {
      at = at + 1 == len ? 0 : at + 1;
      int32_t cur = bytes[at];
      in[t] = prev;
      tg[t] = cur;
      prev = cur;
    }
  }
  return b;
}

Batch ByteLoader::next_train(int64_t rows, int64_t seq_len) {
  check_fits(train_len_, seq_len, "training");
  if (pos_ >= int64_t(train_len_)) {
    ++epoch_;
    pos_ = 0;
  }
  size_t offset = Rng(seed_, 0x65706f6368ull + uint64_t(epoch_)).below(train_len_);
  Batch b = cut(0, train_len_, (offset + size_t(pos_)) % train_len_, rows, seq_len);
  pos_ += rows * world_ * seq_len;
  return b;
}

Batch ByteLoader::next_val(int64_t rows, int64_t seq_len) {
  size_t val_len = text_.size() - train_len_;
  check_fits(val_len, seq_len, "validation");
  Batch b = cut(train_len_, val_len, size_t(val_pos_) % val_len, rows, seq_len);
  val_pos_ = int64_t((size_t(val_pos_) + size_t(rows * world_ * seq_len)) % val_len);
  return b;
}

std::vector<int64_t> ByteLoader::state() const { return {kStateTag, epoch_, pos_}; }

void ByteLoader::restore(const std::vector<int64_t>& s) {
  if (s.size() != 3 || s[0] != kStateTag)
    throw Error("data loader: the checkpoint's data position was not written by the raw-bytes loader "
                "(data.source differs from the run that saved it); resume with the same data settings");
  if (s[1] < 0 || s[2] < 0) throw Error("data loader: the checkpoint's data position is negative (damaged checkpoint)");
  epoch_ = s[1];
  pos_ = s[2];
}

std::string ByteLoader::describe() const {
  char buf[256];
  std::snprintf(buf, sizeof buf, "raw bytes of %s (%.2f MB: %.2f MB train, %.2f MB validation), vocab 256",
                origin_.c_str(), double(text_.size()) / 1e6, double(train_len_) / 1e6,
                double(text_.size() - train_len_) / 1e6);
  return buf;
}

}  // namespace moelab
