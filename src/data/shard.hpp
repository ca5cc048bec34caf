// Token shard files: a 32-byte header (magic, version, token width, count, vocab, bos id) and
// then the token ids, little-endian, uint16 when the vocabulary fits and uint32 otherwise.
// Every document in a shard starts with <|bos|>. Readers map the file and check the header and
// the exact file length, so a wrong or truncated file fails loudly. Format: docs/FORMATS.md.
#pragma once
#include <cstdint>
#include <cstdio>
#include <string>
#include <vector>

namespace moelab {

inline constexpr char kShardMagic[8] = {'M', 'O', 'E', 'L', 'A', 'B', 'T', 'K'};
inline constexpr uint32_t kShardVersion = 1;
inline constexpr size_t kShardHeaderBytes = 32;

// 2 for vocabularies of at most 65536 ids, else 4.
inline uint32_t shard_token_width(int64_t vocab) { return vocab <= 65536 ? 2 : 4; }

// Writes one shard; the header is completed by finish(), which renames the file into place so
// a shard that exists is whole.
class ShardWriter {
 public:
  ShardWriter(std::string path, int64_t vocab, int32_t bos_id);
  ~ShardWriter();
  ShardWriter(const ShardWriter&) = delete;
  ShardWriter& operator=(const ShardWriter&) = delete;
  void append(const int32_t* ids, size_t n);
  int64_t tokens() const { return count_; }
  void finish();

 private:
  void flush();
  std::string path_, tmp_;
  std::FILE* f_ = nullptr;
  int64_t vocab_;
  int32_t bos_;
  uint32_t width_;
  int64_t count_ = 0;
  std::vector<unsigned char> buf_;
};

// A read-only view of one shard (memory-mapped).
class Shard {
 public:
  // Checks magic, version, width and that the file holds exactly `count` tokens; errors name
  // the file and the byte offset at fault.
  explicit Shard(const std::string& path);
  ~Shard();
  Shard(Shard&& o) noexcept;
  Shard(const Shard&) = delete;
  Shard& operator=(const Shard&) = delete;
  Shard& operator=(Shard&&) = delete;

  int64_t size() const { return count_; }
  int64_t vocab() const { return vocab_; }
  int32_t bos_id() const { return bos_; }
  uint32_t width() const { return width_; }
  const std::string& path() const { return path_; }
  int32_t operator[](int64_t i) const {
    return width_ == 2 ? int32_t(reinterpret_cast<const uint16_t*>(data_)[i])
                       : int32_t(reinterpret_cast<const uint32_t*>(data_)[i]);
  }
  // Copies tokens [begin, begin + n) to out.
  void copy(int64_t begin, int64_t n, int32_t* out) const;

 private:
  void validate_header();
  std::string path_;
  void* map_ = nullptr;
  size_t map_bytes_ = 0;
  const unsigned char* data_ = nullptr;
  int64_t count_ = 0, vocab_ = 0;
  int32_t bos_ = 0;
  uint32_t width_ = 0;
};

}  // namespace moelab
