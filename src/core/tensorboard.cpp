// TensorBoard event files: TFRecord framing with masked CRC-32C, Event / Summary protobufs
// encoded by hand (see tensorboard.hpp for why).
#include "core/tensorboard.hpp"

#include <unistd.h>

#include <array>
#include <cerrno>
#include <chrono>
#include <cstring>
#include <filesystem>

#include "core/error.hpp"

namespace moelab {
namespace {

const std::array<uint32_t, 256>& crc32c_table() {
  static const std::array<uint32_t, 256> table = [] {
    std::array<uint32_t, 256> t{};
    for (uint32_t i = 0; i < 256; ++i) {
      uint32_t c = i;
      for (int k = 0; k < 8; ++k) c = c & 1 ? (c >> 1) ^ 0x82F63B78u : c >> 1;  // reflected Castagnoli polynomial
      t[i] = c;
    }
    return t;
  }();
  return table;
}

// Protobuf wire format: a field's key is (number << 3) | wire type (0 varint, 1 fixed64,
// 2 length-delimited, 5 fixed32); integers are little-endian base-128 varints.
void put_varint(std::string& out, uint64_t v) {
  while (v >= 0x80) {
    out.push_back(char((v & 0x7f) | 0x80));
    v >>= 7;
  }
  out.push_back(char(v));
}
void put_key(std::string& out, int field, int wire) { put_varint(out, uint64_t(field) << 3 | uint64_t(wire)); }
template <class T>
void put_fixed(std::string& out, T v) {
  char b[sizeof(T)];
  std::memcpy(b, &v, sizeof(T));  // x86-64 is little-endian, as the wire format
  out.append(b, sizeof(T));
}
void put_bytes(std::string& out, int field, const std::string& bytes) {
  put_key(out, field, 2);
  put_varint(out, bytes.size());
  out += bytes;
}

double now_seconds() {
  return std::chrono::duration<double>(std::chrono::system_clock::now().time_since_epoch()).count();
}

// Event { double wall_time = 1; int64 step = 2; string file_version = 3; Summary summary = 5; }
std::string event_header(double wall_time, int64_t step) {
  std::string e;
  put_key(e, 1, 1);
  put_fixed(e, wall_time);
  put_key(e, 2, 0);
  put_varint(e, uint64_t(step));
  return e;
}

}  // namespace

uint32_t crc32c(const void* data, size_t bytes) {
  const auto& t = crc32c_table();
  const auto* p = static_cast<const uint8_t*>(data);
  uint32_t c = 0xFFFFFFFFu;
  for (size_t i = 0; i < bytes; ++i) c = t[(c ^ p[i]) & 0xff] ^ (c >> 8);
  return c ^ 0xFFFFFFFFu;
}

uint32_t masked_crc32c(const void* data, size_t bytes) {
  const uint32_t c = crc32c(data, bytes);
  return ((c >> 15) | (c << 17)) + 0xa282ead8u;
}

TensorBoardLog::TensorBoardLog(const std::string& run_dir) {
  char host[256] = "localhost";
  gethostname(host, sizeof host - 1);
  const double t = now_seconds();
  // TensorBoard reads the files whose names contain "tfevents"; a resumed run adds a new one.
  path_ = (std::filesystem::path(run_dir) / ("events.out.tfevents." + std::to_string(int64_t(t)) + "." + host + "." +
                                             std::to_string(getpid()) + ".moelab")).string();
  open("ab");
}

TensorBoardLog::TensorBoardLog(const ExactPath& file) : path_(file.path) { open("wb"); }

void TensorBoardLog::open(const char* mode) {
  f_ = std::fopen(path_.c_str(), mode);
  if (!f_) throw Error("tensorboard: cannot create " + path_ + ": " + std::strerror(errno));
  std::string e = event_header(now_seconds(), 0);
  put_bytes(e, 3, "brain.Event:2");
  write_record(e);
}

TensorBoardLog::~TensorBoardLog() {
  if (f_) std::fclose(f_);
}

void TensorBoardLog::write_record(const std::string& data) {
  // TFRecord: uint64 length, uint32 masked crc of the length's bytes, data, uint32 masked crc of data.
  std::string r;
  const uint64_t n = data.size();
  put_fixed(r, n);
  put_fixed(r, masked_crc32c(r.data(), 8));
  r += data;
  put_fixed(r, masked_crc32c(data.data(), data.size()));
  if (std::fwrite(r.data(), 1, r.size(), f_) != r.size() || std::fflush(f_) != 0)
    throw Error("tensorboard: cannot write " + path_ + ": " + std::strerror(errno));
}

void TensorBoardLog::scalar(const std::string& tag, int64_t step, double value) {
  // Summary { repeated Value value = 1; }  Value { string tag = 1; float simple_value = 2; }
  std::string v;
  put_bytes(v, 1, tag);
  put_key(v, 2, 5);
  put_fixed(v, float(value));
  std::string summary;
  put_bytes(summary, 1, v);
  std::string e = event_header(now_seconds(), step);
  put_bytes(e, 5, summary);
  write_record(e);
}

void TensorBoardLog::append(const nlohmann::json& r) {
  const std::string event = r.value("event", "");
  if (!r.contains("step")) return;
  const int64_t step = r["step"].get<int64_t>();
  auto put = [&](const char* key, const char* tag) {
    if (r.contains(key) && r[key].is_number()) scalar(tag, step, r[key].get<double>());
  };
  if (event == "step") {
    put("loss", "train/loss");
    put("raw_loss", "train/raw_loss");
    put("lrm", "train/lr_multiplier");
    put("tok_sec", "train/tok_per_sec");
    put("mfu", "train/mfu");
    put("drop_rate", "train/drop_rate");
    put("bal", "train/balance_loss");
  } else if (event == "val") {
    put("val_loss", "val/loss");
    put("val_bpb", "val/bpb");
  }
}

}  // namespace moelab
