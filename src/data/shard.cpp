// Shard files: writing with a buffered stream and reading through mmap, so a loader touches
// only the pages it reads and many shards cost no memory up front.
#include "data/shard.hpp"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cstdio>
#include <cstring>

#include "core/error.hpp"

namespace moelab {
namespace {

void put_u32(unsigned char* p, uint32_t v) {
  for (int i = 0; i < 4; ++i) p[i] = (unsigned char)(v >> (8 * i));
}
void put_u64(unsigned char* p, uint64_t v) {
  for (int i = 0; i < 8; ++i) p[i] = (unsigned char)(v >> (8 * i));
}
uint32_t get_u32(const unsigned char* p) {
  uint32_t v = 0;
  for (int i = 0; i < 4; ++i) v |= uint32_t(p[i]) << (8 * i);
  return v;
}
uint64_t get_u64(const unsigned char* p) {
  uint64_t v = 0;
  for (int i = 0; i < 8; ++i) v |= uint64_t(p[i]) << (8 * i);
  return v;
}

// Header layout: magic[8] version:u32 width:u32 count:u64 vocab:u32 bos:u32.
void encode_header(unsigned char* h, uint32_t width, uint64_t count, uint32_t vocab, uint32_t bos) {
  std::memcpy(h, kShardMagic, 8);
  put_u32(h + 8, kShardVersion);
  put_u32(h + 12, width);
  put_u64(h + 16, count);
  put_u32(h + 24, vocab);
  put_u32(h + 28, bos);
}

}  // namespace

ShardWriter::ShardWriter(std::string path, int64_t vocab, int32_t bos_id)
    : path_(std::move(path)), tmp_(path_ + ".tmp"), vocab_(vocab), bos_(bos_id), width_(shard_token_width(vocab)) {
  f_ = std::fopen(tmp_.c_str(), "wb");
  if (!f_) throw Error(path_ + ": cannot be created; check that the output folder is writable");
  unsigned char h[kShardHeaderBytes] = {};
  encode_header(h, width_, 0, uint32_t(vocab_), uint32_t(bos_));
  if (std::fwrite(h, 1, sizeof h, f_) != sizeof h) throw Error(path_ + ": write failed (disk full?)");
}

ShardWriter::~ShardWriter() {
  if (f_) {
    std::fclose(f_);
    std::remove(tmp_.c_str());
  }
}

void ShardWriter::append(const int32_t* ids, size_t n) {
  for (size_t i = 0; i < n; ++i) {
    uint32_t v = uint32_t(ids[i]);
    if (ids[i] < 0 || ids[i] >= vocab_)
      throw Error(path_ + ": token id " + std::to_string(ids[i]) + " is outside the vocabulary of " + std::to_string(vocab_));
    for (uint32_t k = 0; k < width_; ++k) buf_.push_back((unsigned char)(v >> (8 * k)));
  }
  count_ += int64_t(n);
  if (buf_.size() >= (1u << 22)) flush();
}

void ShardWriter::flush() {
  if (!buf_.empty() && std::fwrite(buf_.data(), 1, buf_.size(), f_) != buf_.size())
    throw Error(path_ + ": write failed (disk full?)");
  buf_.clear();
}

void ShardWriter::finish() {
  flush();
  unsigned char h[kShardHeaderBytes] = {};
  encode_header(h, width_, uint64_t(count_), uint32_t(vocab_), uint32_t(bos_));
  bool ok = std::fseek(f_, 0, SEEK_SET) == 0 && std::fwrite(h, 1, sizeof h, f_) == sizeof h;
  ok = std::fclose(f_) == 0 && ok;
  f_ = nullptr;
  if (!ok || std::rename(tmp_.c_str(), path_.c_str()) != 0) throw Error(path_ + ": could not be written completely");
}

Shard::Shard(const std::string& path) : path_(path) {
  int fd = ::open(path.c_str(), O_RDONLY);
  if (fd < 0) throw Error(path + ": shard file cannot be opened (missing?); re-run `moelab data prepare`");
  struct stat st{};
  if (::fstat(fd, &st) != 0) {
    ::close(fd);
    throw Error(path + ": cannot stat the shard file");
  }
  size_t bytes = size_t(st.st_size);
  if (bytes < kShardHeaderBytes) {
    ::close(fd);
    throw Error(path + ": " + std::to_string(bytes) + " bytes, shorter than the " + std::to_string(kShardHeaderBytes) +
                "-byte shard header: truncated or not a shard");
  }
  map_ = ::mmap(nullptr, bytes, PROT_READ, MAP_PRIVATE, fd, 0);
  ::close(fd);
  if (map_ == MAP_FAILED) {
    map_ = nullptr;
    throw Error(path + ": cannot be memory-mapped");
  }
  map_bytes_ = bytes;
  try {
    validate_header();
  } catch (...) {
    ::munmap(map_, map_bytes_);
    map_ = nullptr;
    throw;
  }
}

void Shard::validate_header() {
  const size_t bytes = map_bytes_;
  const auto* h = static_cast<const unsigned char*>(map_);
  if (std::memcmp(h, kShardMagic, 8) != 0)
    throw Error(path_ + ": byte offset 0: wrong magic number (expected \"MOELABTK\"): not a moelab token shard");
  uint32_t version = get_u32(h + 8);
  if (version != kShardVersion)
    throw Error(path_ + ": byte offset 8: shard format version " + std::to_string(version) + ", this moelab reads version " +
                std::to_string(kShardVersion) + "; re-run `moelab data prepare` with this moelab");
  width_ = get_u32(h + 12);
  if (width_ != 2 && width_ != 4)
    throw Error(path_ + ": byte offset 12: token width " + std::to_string(width_) + " is neither 2 nor 4: damaged shard");
  uint64_t count = get_u64(h + 16);
  vocab_ = get_u32(h + 24);
  bos_ = int32_t(get_u32(h + 28));
  if (width_ != shard_token_width(vocab_) || bos_ < 0 || bos_ >= vocab_)
    throw Error(path_ + ": byte offset 24: vocab " + std::to_string(vocab_) + " / bos id " + std::to_string(bos_) +
                " do not match the token width " + std::to_string(width_) + ": damaged shard");
  uint64_t payload = bytes - kShardHeaderBytes;
  if (count > payload / width_)
    throw Error(path_ + ": truncated: the header promises " + std::to_string(count) + " tokens (" +
                std::to_string(kShardHeaderBytes) + " + " + std::to_string(count) + " x " + std::to_string(width_) +
                " bytes) but the file ends at byte offset " + std::to_string(bytes) + "; re-run `moelab data prepare`");
  if (payload != count * width_)
    throw Error(path_ + ": " + std::to_string(payload - count * width_) + " unexpected bytes after the last token at byte offset " +
                std::to_string(kShardHeaderBytes + count * width_) + ": damaged shard");
  count_ = int64_t(count);
  data_ = h + kShardHeaderBytes;
}

Shard::Shard(Shard&& o) noexcept
    : path_(std::move(o.path_)), map_(o.map_), map_bytes_(o.map_bytes_), data_(o.data_), count_(o.count_),
      vocab_(o.vocab_), bos_(o.bos_), width_(o.width_) {
  o.map_ = nullptr;
  o.map_bytes_ = 0;
}

Shard::~Shard() {
  if (map_) ::munmap(map_, map_bytes_);
}

void Shard::copy(int64_t begin, int64_t n, int32_t* out) const {
  if (width_ == 2) {
    const auto* p = reinterpret_cast<const uint16_t*>(data_) + begin;
    for (int64_t i = 0; i < n; ++i) out[i] = p[i];
  } else {
    const auto* p = reinterpret_cast<const uint32_t*>(data_) + begin;
    for (int64_t i = 0; i < n; ++i) out[i] = int32_t(p[i]);
  }
}

}  // namespace moelab
