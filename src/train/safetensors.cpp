// safetensors writing (atomic, checksummed) and reading (everything validated before return).
// The reader trusts nothing in the file: every number in the header is range-checked before it
// is used as a size or an offset, and sizes are multiplied with overflow checks.
#include "train/safetensors.hpp"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <bit>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <nlohmann/json.hpp>
#include <set>

#include "core/error.hpp"
#include "core/rng.hpp"

namespace moelab {
namespace {

static_assert(std::endian::native == std::endian::little,
              "safetensors data is little-endian; a big-endian host would need byte swaps");

// The reference implementation refuses headers above 100 MB; so does this one, which also keeps
// a corrupt length from triggering a huge allocation.
constexpr uint64_t kMaxHeaderBytes = 100u << 20;
constexpr const char* kChecksumPrefix = "fnv64x4:";

std::string fail_prefix(const std::string& path) { return "safetensors file '" + path + "': "; }

constexpr SafeDType kAllDTypes[] = {SafeDType::f32,  SafeDType::f64,     SafeDType::bf16,
                                    SafeDType::i32,  SafeDType::i64,     SafeDType::f8_e4m3,
                                    SafeDType::f8_e5m2};

bool parse_dtype(const std::string& s, SafeDType& out) {
  for (SafeDType t : kAllDTypes)
    if (s == safe_dtype_name(t)) {
      out = t;
      return true;
    }
  return false;
}

std::string supported_dtypes() {
  std::string s;
  for (SafeDType t : kAllDTypes) s += std::string(s.empty() ? "" : ", ") + safe_dtype_name(t);
  return s;
}

// Bytes of a dtype * shape, or false on a negative dimension or overflow.
bool checked_bytes(SafeDType t, const Shape& shape, uint64_t& out) {
  uint64_t n = safe_dtype_size(t);
  for (int64_t d : shape) {
    if (d < 0) return false;
    if (__builtin_mul_overflow(n, uint64_t(d), &n)) return false;
  }
  out = n;
  return true;
}

// The header's content in a fixed form (names sorted, numbers in decimal), hashed together with
// the data so that a changed name, shape, offset or metadata value is caught like a changed weight.
std::string canonical_header(std::vector<SafetensorsEntry> entries,
                             const std::map<std::string, std::string>& metadata) {
  std::sort(entries.begin(), entries.end(),
            [](const SafetensorsEntry& a, const SafetensorsEntry& b) { return a.name < b.name; });
  std::string s;
  for (const auto& e : entries) {
    s += e.name;
    s += '\0';
    s += safe_dtype_name(e.dtype);
    s += '\0';
    for (int64_t d : e.shape) s += std::to_string(d) + ",";
    s += '\0';
    s += std::to_string(e.offset) + "," + std::to_string(e.bytes) + "\n";
  }
  s += '\1';
  for (const auto& [k, v] : metadata) {
    if (k == kSafetensorsChecksumKey) continue;
    s += k;
    s += '\0';
    s += v;
    s += '\n';
  }
  return s;
}

std::string format_checksum(uint64_t h) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%s%016llx", kChecksumPrefix, static_cast<unsigned long long>(h));
  return buf;
}

// Streaming form of checksum64, so the writer can hash tensors in place, one after another.
class Checksum64 {
 public:
  explicit Checksum64(uint64_t seed) : seed_(seed) {
    for (int i = 0; i < 4; ++i) h_[i] = kBasis ^ splitmix64(seed + uint64_t(i));
  }
  void update(const void* data, size_t n) {
    const uint8_t* p = static_cast<const uint8_t*>(data);
    total_ += n;
    if (pending_ > 0) {
      size_t take = std::min(n, size_t(32) - pending_);
      if (take) std::memcpy(buf_ + pending_, p, take);
      pending_ += take;
      p += take;
      n -= take;
      if (pending_ < 32) return;
      block(buf_);
      pending_ = 0;
    }
    for (; n >= 32; n -= 32, p += 32) block(p);
    if (n) std::memcpy(buf_, p, n);
    pending_ = n;
  }
  uint64_t finish() const {
    uint64_t h0 = h_[0];
    for (size_t i = 0; i < pending_; ++i) h0 = (h0 ^ buf_[i]) * kPrime;
    // Each step below is a bijection of r for a fixed input, so a change confined to one lane
    // always changes the result.
    uint64_t r = seed_;
    r = splitmix64(r ^ h0);
    for (int i = 1; i < 4; ++i) r = splitmix64(r ^ h_[i]);
    return splitmix64(r ^ uint64_t(total_));
  }

 private:
  static constexpr uint64_t kPrime = 0x100000001b3ull, kBasis = 0xcbf29ce484222325ull;
  void block(const uint8_t* p) {
    for (int i = 0; i < 4; ++i) {
      uint64_t w;
      std::memcpy(&w, p + 8 * i, 8);
      h_[i] = (h_[i] ^ w) * kPrime;
    }
  }
  uint64_t seed_;
  uint64_t h_[4];
  uint8_t buf_[32] = {};
  size_t pending_ = 0;
  uint64_t total_ = 0;
};

uint64_t file_checksum(const uint8_t* data, size_t bytes, const std::vector<SafetensorsEntry>& entries,
                       const std::map<std::string, std::string>& metadata) {
  const std::string canon = canonical_header(entries, metadata);
  return checksum64(canon.data(), canon.size(), checksum64(data, bytes, 0));
}

void write_all(int fd, const void* data, size_t n, const std::string& path) {
  const char* p = static_cast<const char*>(data);
  while (n > 0) {
    ssize_t w = ::write(fd, p, n);
    if (w < 0) {
      if (errno == EINTR) continue;
      throw Error(fail_prefix(path) + "write failed: " + std::strerror(errno) +
                  " (check free disk space and permissions)");
    }
    p += w;
    n -= size_t(w);
  }
}

void read_all(int fd, void* data, size_t n, const std::string& path) {
  char* p = static_cast<char*>(data);
  while (n > 0) {
    ssize_t r = ::read(fd, p, n);
    if (r < 0) {
      if (errno == EINTR) continue;
      throw Error(fail_prefix(path) + "read failed: " + std::strerror(errno));
    }
    if (r == 0) throw Error(fail_prefix(path) + "the file ended while being read (is another process writing it?)");
    p += r;
    n -= size_t(r);
  }
}

// Closes the descriptor on every path out of a scope.
struct Fd {
  int fd = -1;
  ~Fd() {
    if (fd >= 0) ::close(fd);
  }
};

bool json_to_u64(const nlohmann::json& j, uint64_t& out) {
  if (j.is_number_unsigned()) {
    out = j.get<uint64_t>();
    return true;
  }
  if (j.is_number_integer() && j.get<int64_t>() >= 0) {
    out = uint64_t(j.get<int64_t>());
    return true;
  }
  return false;
}

SafetensorsEntry parse_entry(const std::string& path, const std::string& name, const nlohmann::json& j) {
  const std::string at = fail_prefix(path) + "tensor '" + name + "': ";
  if (name.empty()) throw Error(fail_prefix(path) + "a tensor has an empty name");
  if (!j.is_object()) throw Error(at + "its header entry is not an object");
  for (auto it = j.begin(); it != j.end(); ++it)
    if (it.key() != "dtype" && it.key() != "shape" && it.key() != "data_offsets")
      throw Error(at + "unknown header field '" + it.key() + "'");
  if (!j.contains("dtype") || !j["dtype"].is_string()) throw Error(at + "missing or non-string 'dtype'");
  if (!j.contains("shape") || !j["shape"].is_array()) throw Error(at + "missing or non-array 'shape'");
  if (!j.contains("data_offsets") || !j["data_offsets"].is_array() || j["data_offsets"].size() != 2)
    throw Error(at + "'data_offsets' must be an array of two integers [begin, end]");

  SafetensorsEntry e;
  e.name = name;
  const std::string dt = j["dtype"].get<std::string>();
  if (!parse_dtype(dt, e.dtype))
    throw Error(at + "dtype '" + dt + "' is not supported (supported: " + supported_dtypes() + ")");
  for (const auto& d : j["shape"]) {
    uint64_t v;
    if (!json_to_u64(d, v) || v > uint64_t(INT64_MAX))
      throw Error(at + "shape " + j["shape"].dump() + " has an entry that is not a non-negative integer");
    e.shape.push_back(int64_t(v));
  }
  uint64_t begin, end, want;
  if (!json_to_u64(j["data_offsets"][0], begin) || !json_to_u64(j["data_offsets"][1], end))
    throw Error(at + "data_offsets " + j["data_offsets"].dump() + " are not non-negative integers");
  if (end < begin) throw Error(at + "data_offsets " + j["data_offsets"].dump() + " end before they begin");
  if (!checked_bytes(e.dtype, e.shape, want))
    throw Error(at + "shape " + shape_str(e.shape) + " overflows a 64-bit byte count");
  if (end - begin != want)
    throw Error(at + "data_offsets " + j["data_offsets"].dump() + " span " + std::to_string(end - begin) +
                " bytes but " + dt + " " + shape_str(e.shape) + " needs " + std::to_string(want));
  e.offset = size_t(begin);
  e.bytes = size_t(want);
  return e;
}

}  // namespace

size_t safe_dtype_size(SafeDType t) {
  switch (t) {
    case SafeDType::f64: case SafeDType::i64: return 8;
    case SafeDType::f32: case SafeDType::i32: return 4;
    case SafeDType::bf16: return 2;
    case SafeDType::f8_e4m3: case SafeDType::f8_e5m2: return 1;
  }
  return 0;
}

const char* safe_dtype_name(SafeDType t) {
  switch (t) {
    case SafeDType::f32: return "F32";
    case SafeDType::f64: return "F64";
    case SafeDType::bf16: return "BF16";
    case SafeDType::i32: return "I32";
    case SafeDType::i64: return "I64";
    case SafeDType::f8_e4m3: return "F8_E4M3";
    case SafeDType::f8_e5m2: return "F8_E5M2";
  }
  return "?";
}

SafeDType safe_dtype_of(DType t) {
  switch (t) {
    case DType::f32: return SafeDType::f32;
    case DType::f64: return SafeDType::f64;
    case DType::bf16: return SafeDType::bf16;
    case DType::e4m3: return SafeDType::f8_e4m3;
    case DType::e5m2: return SafeDType::f8_e5m2;
    case DType::i32: return SafeDType::i32;
  }
  throw Error("safe_dtype_of: unknown DType");
}

const SafetensorsEntry* SafetensorsFile::find(const std::string& name) const {
  for (const auto& e : entries)
    if (e.name == name) return &e;
  return nullptr;
}

uint64_t checksum64(const void* data, size_t bytes, uint64_t seed) {
  Checksum64 c(seed);
  c.update(data, bytes);
  return c.finish();
}

void write_safetensors(const std::string& path, const std::vector<SafetensorsTensor>& tensors,
                       const std::map<std::string, std::string>& metadata) {
  if (metadata.count(kSafetensorsChecksumKey))
    throw Error(fail_prefix(path) + "metadata key '" + kSafetensorsChecksumKey + "' is reserved for the checksum");

  std::vector<SafetensorsEntry> entries;
  std::set<std::string> names;
  size_t offset = 0;
  for (const auto& t : tensors) {
    if (t.name.empty() || t.name == "__metadata__")
      throw Error(fail_prefix(path) + "tensor name '" + t.name + "' is not allowed");
    if (!names.insert(t.name).second) throw Error(fail_prefix(path) + "tensor '" + t.name + "' given twice");
    uint64_t bytes;
    if (!checked_bytes(t.dtype, t.shape, bytes))
      throw Error(fail_prefix(path) + "tensor '" + t.name + "' has an invalid shape " + shape_str(t.shape));
    if (bytes > 0 && t.data == nullptr)
      throw Error(fail_prefix(path) + "tensor '" + t.name + "' has no data");
    entries.push_back({t.name, t.dtype, t.shape, offset, size_t(bytes)});
    offset += size_t(bytes);
  }

  // Hash the data in file order without first gathering it into one buffer.
  Checksum64 hasher(0);
  for (size_t i = 0; i < tensors.size(); ++i) hasher.update(tensors[i].data, entries[i].bytes);
  const uint64_t data_hash = hasher.finish();
  const std::string canon = canonical_header(entries, metadata);
  const uint64_t sum = checksum64(canon.data(), canon.size(), data_hash);

  nlohmann::ordered_json header = nlohmann::ordered_json::object();
  nlohmann::ordered_json meta = nlohmann::ordered_json::object();
  for (const auto& [k, v] : metadata) meta[k] = v;
  meta[kSafetensorsChecksumKey] = format_checksum(sum);
  header["__metadata__"] = meta;
  for (const auto& e : entries)
    header[e.name] = {{"dtype", safe_dtype_name(e.dtype)},
                      {"shape", e.shape},
                      {"data_offsets", {uint64_t(e.offset), uint64_t(e.offset + e.bytes)}}};
  std::string text = header.dump();
  // Pad with spaces (the spec allows trailing whitespace) so the data starts 8-byte aligned.
  while ((text.size() + 8) % 8 != 0) text += ' ';
  uint8_t len_le[8];
  uint64_t len = text.size();
  std::memcpy(len_le, &len, 8);

  const std::string tmp = path + ".tmp";
  try {
    Fd f;
    f.fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (f.fd < 0)
      throw Error(fail_prefix(path) + "cannot create '" + tmp + "': " + std::strerror(errno) +
                  " (does the folder exist and is it writable?)");
    write_all(f.fd, len_le, 8, path);
    write_all(f.fd, text.data(), text.size(), path);
    for (size_t i = 0; i < tensors.size(); ++i) write_all(f.fd, tensors[i].data, entries[i].bytes, path);
    if (::fsync(f.fd) != 0) throw Error(fail_prefix(path) + "fsync failed: " + std::strerror(errno));
    if (::close(f.fd) != 0) {
      f.fd = -1;
      throw Error(fail_prefix(path) + "close failed: " + std::strerror(errno));
    }
    f.fd = -1;
    if (::rename(tmp.c_str(), path.c_str()) != 0)
      throw Error(fail_prefix(path) + "cannot rename '" + tmp + "' onto it: " + std::strerror(errno));
  } catch (...) {
    ::unlink(tmp.c_str());
    throw;
  }
  // Make the rename itself durable; a failure here leaves a complete file, so it is not fatal.
  std::string dir = std::filesystem::path(path).parent_path().string();
  if (dir.empty()) dir = ".";
  Fd d;
  d.fd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (d.fd >= 0) ::fsync(d.fd);
}

SafetensorsFile read_safetensors(const std::string& path, bool require_checksum) {
  const std::string at = fail_prefix(path);
  Fd f;
  f.fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (f.fd < 0) throw Error(at + "cannot open: " + std::strerror(errno));
  struct stat st {};
  if (::fstat(f.fd, &st) != 0) throw Error(at + "cannot stat: " + std::strerror(errno));
  if (!S_ISREG(st.st_mode)) throw Error(at + "is not a regular file");
  const uint64_t file_size = uint64_t(st.st_size);
  if (file_size < 8)
    throw Error(at + "is " + std::to_string(file_size) + " bytes, shorter than the 8-byte header length: the file is truncated");

  uint64_t header_len;
  read_all(f.fd, &header_len, 8, path);
  if (header_len > file_size - 8)
    throw Error(at + "header length " + std::to_string(header_len) + " runs past the end of the " +
                std::to_string(file_size) + "-byte file (truncated or not a safetensors file)");
  if (header_len > kMaxHeaderBytes)
    throw Error(at + "header length " + std::to_string(header_len) + " exceeds the 100 MB limit (not a safetensors file?)");
  if (header_len < 2) throw Error(at + "header length " + std::to_string(header_len) + " is too short for a JSON object");

  std::string text(size_t(header_len), '\0');
  read_all(f.fd, text.data(), text.size(), path);
  if (text[0] != '{') throw Error(at + "header does not start with '{' (not a safetensors file?)");

  // Top-level names must be unique; the JSON library would silently keep the last one.
  std::set<std::string> seen;
  std::string duplicate;
  auto on_event = [&](int depth, nlohmann::json::parse_event_t ev, nlohmann::json& parsed) {
    if (ev == nlohmann::json::parse_event_t::key && depth == 1 && parsed.is_string()) {
      const auto& k = parsed.get_ref<const std::string&>();
      if (!seen.insert(k).second && duplicate.empty()) duplicate = k;
    }
    return true;
  };
  nlohmann::json header;
  try {
    header = nlohmann::json::parse(text, on_event);
  } catch (const nlohmann::json::exception& e) {
    throw Error(at + "header is not valid JSON: " + e.what());
  }
  if (!duplicate.empty()) throw Error(at + "header names tensor '" + duplicate + "' twice");
  if (!header.is_object()) throw Error(at + "header is not a JSON object");

  SafetensorsFile out;
  out.path = path;
  std::string stored_sum;
  for (auto it = header.begin(); it != header.end(); ++it) {
    if (it.key() == "__metadata__") {
      if (!it->is_object()) throw Error(at + "__metadata__ is not an object");
      for (auto m = it->begin(); m != it->end(); ++m) {
        if (!m->is_string()) throw Error(at + "__metadata__ value of '" + m.key() + "' is not a string");
        if (m.key() == kSafetensorsChecksumKey) stored_sum = m->get<std::string>();
        else out.metadata[m.key()] = m->get<std::string>();
      }
      continue;
    }
    out.entries.push_back(parse_entry(path, it.key(), *it));
  }

  std::stable_sort(out.entries.begin(), out.entries.end(),
                   [](const SafetensorsEntry& a, const SafetensorsEntry& b) {
                     return a.offset != b.offset ? a.offset < b.offset : a.bytes < b.bytes;
                   });
  const uint64_t data_size = file_size - 8 - header_len;
  uint64_t expected = 0;
  for (const auto& e : out.entries) {
    if (e.offset < expected)
      throw Error(at + "tensor '" + e.name + "' starts at byte " + std::to_string(e.offset) +
                  " inside the previous tensor (overlapping data_offsets)");
    if (e.offset > expected)
      throw Error(at + "bytes " + std::to_string(expected) + ".." + std::to_string(e.offset) +
                  " of the data section belong to no tensor (tensor '" + e.name + "' starts after a gap)");
    expected = e.offset + e.bytes;
  }
  if (expected > data_size)
    throw Error(at + "the tensors need " + std::to_string(expected) + " data bytes but the file holds " +
                std::to_string(data_size) + ": the file is truncated");
  if (expected < data_size)
    throw Error(at + "the file has " + std::to_string(data_size - expected) +
                " trailing bytes after the last tensor (damaged or appended to)");

  out.data.resize(size_t(data_size));
  read_all(f.fd, out.data.data(), out.data.size(), path);

  if (stored_sum.empty()) {
    if (require_checksum)
      throw Error(at + "has no '" + std::string(kSafetensorsChecksumKey) +
                  "' in its metadata, so its integrity cannot be verified (was it written by moelab?)");
  } else {
    const std::string computed = format_checksum(file_checksum(out.data.data(), out.data.size(), out.entries, out.metadata));
    if (stored_sum.rfind(kChecksumPrefix, 0) != 0)
      throw Error(at + "checksum '" + stored_sum + "' has an unknown format (expected " + kChecksumPrefix + "<16 hex digits>)");
    if (computed != stored_sum)
      throw Error(at + "checksum mismatch (stored " + stored_sum + ", computed " + computed +
                  "): the file was damaged or modified after it was written");
  }
  return out;
}

}  // namespace moelab
