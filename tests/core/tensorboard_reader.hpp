// A reader of TensorBoard event files for the tests, independent of the writer (core/tensorboard):
// TFRecord framing with both masked CRC-32Cs computed bit by bit, and the Event / Summary
// protobuf fields decoded from the wire format. Failures are reported through gtest.
#pragma once
#include <gtest/gtest.h>

#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

namespace moelab::test {

namespace tb_detail {
namespace fs = std::filesystem;
// CRC-32C one bit at a time (independent of the table the writer uses).
inline uint32_t crc32c_bitwise(const uint8_t* p, size_t n) {
  uint32_t c = 0xFFFFFFFFu;
  for (size_t i = 0; i < n; ++i) {
    c ^= p[i];
    for (int k = 0; k < 8; ++k) c = (c >> 1) ^ (0x82F63B78u & (0u - (c & 1u)));
  }
  return ~c;
}
inline uint32_t masked(uint32_t c) { return ((c >> 15) | (c << 17)) + 0xa282ead8u; }

struct Reader {  // protobuf wire format over a byte range
  const uint8_t* p;
  const uint8_t* end;
  uint64_t varint() {
    uint64_t v = 0;
    for (int shift = 0; p < end; shift += 7) {
      const uint8_t b = *p++;
      v |= uint64_t(b & 0x7f) << shift;
      if (!(b & 0x80)) return v;
    }
    ADD_FAILURE() << "truncated varint";
    return v;
  }
  template <class T>
  T fixed() {
    T v{};
    EXPECT_LE(p + sizeof(T), end);
    std::memcpy(&v, p, sizeof(T));
    p += sizeof(T);
    return v;
  }
  Reader sub() {
    const uint64_t n = varint();
    Reader r{p, p + n};
    p += n;
    return r;
  }
};

struct Scalar {
  std::string tag;
  int64_t step;
  float value;
};

// Every record of the file, CRCs checked; returns the scalars and the file_version string.
inline std::vector<Scalar> read_tensorboard_events(const fs::path& path, std::string& file_version, int& records) {
  std::ifstream in(path, std::ios::binary);
  std::string blob((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  const auto* b = reinterpret_cast<const uint8_t*>(blob.data());
  std::vector<Scalar> out;
  size_t at = 0;
  records = 0;
  while (at < blob.size()) {
    EXPECT_LE(at + 12, blob.size()) << "truncated record header";
    uint64_t len;
    uint32_t len_crc, data_crc;
    std::memcpy(&len, b + at, 8);
    std::memcpy(&len_crc, b + at + 8, 4);
    EXPECT_EQ(len_crc, masked(crc32c_bitwise(b + at, 8))) << "length CRC of record " << records;
    EXPECT_LE(at + 12 + len + 4, blob.size()) << "truncated record";
    const uint8_t* data = b + at + 12;
    std::memcpy(&data_crc, data + len, 4);
    EXPECT_EQ(data_crc, masked(crc32c_bitwise(data, len))) << "data CRC of record " << records;
    at += 12 + len + 4;
    ++records;
    Reader ev{data, data + len};
    int64_t step = 0;
    std::vector<Scalar> values;
    while (ev.p < ev.end) {
      const uint64_t key = ev.varint();
      const int field = int(key >> 3), wire = int(key & 7);
      if (field == 1 && wire == 1) {
        EXPECT_GT(ev.fixed<double>(), 1.6e9);  // wall time in seconds since 1970
      } else if (field == 2 && wire == 0) {
        step = int64_t(ev.varint());
      } else if (field == 3 && wire == 2) {
        Reader s = ev.sub();
        file_version.assign(reinterpret_cast<const char*>(s.p), size_t(s.end - s.p));
      } else if (field == 5 && wire == 2) {
        Reader summary = ev.sub();
        while (summary.p < summary.end) {
          EXPECT_EQ(summary.varint(), (1u << 3) | 2u);  // Summary.value
          Reader v = summary.sub();
          Scalar sc{};
          while (v.p < v.end) {
            const uint64_t k = v.varint();
            if (k == ((1u << 3) | 2u)) {
              Reader t = v.sub();
              sc.tag.assign(reinterpret_cast<const char*>(t.p), size_t(t.end - t.p));
            } else if (k == ((2u << 3) | 5u)) {
              sc.value = v.fixed<float>();
            } else {
              ADD_FAILURE() << "unexpected Summary.Value field key " << k;
              return out;
            }
          }
          values.push_back(sc);
        }
      } else {
        ADD_FAILURE() << "unexpected Event field " << field << " wire type " << wire;
        return out;
      }
    }
    for (auto& v : values) {
      v.step = step;
      out.push_back(v);
    }
  }
  return out;
}

}  // namespace tb_detail

using tb_detail::crc32c_bitwise;
using tb_detail::read_tensorboard_events;
using tb_detail::Scalar;

}  // namespace moelab::test
