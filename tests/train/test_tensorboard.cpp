// TensorBoard event files (train.tensorboard = true): a trained run's events file read back
// record by record with a reader written here (TFRecord framing, both masked CRC-32Cs computed
// bit by bit, the Event / Summary protobuf fields decoded from the wire format), and every
// scalar checked against the run's metrics.jsonl.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>

#include "train/run_test_support.hpp"
#include "train/tensorboard.hpp"
#include "train/trainer.hpp"

namespace moelab {
namespace {

namespace fs = std::filesystem;

// CRC-32C one bit at a time (independent of the table the writer uses).
uint32_t crc32c_bitwise(const uint8_t* p, size_t n) {
  uint32_t c = 0xFFFFFFFFu;
  for (size_t i = 0; i < n; ++i) {
    c ^= p[i];
    for (int k = 0; k < 8; ++k) c = (c >> 1) ^ (0x82F63B78u & (0u - (c & 1u)));
  }
  return ~c;
}
uint32_t masked(uint32_t c) { return ((c >> 15) | (c << 17)) + 0xa282ead8u; }

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
std::vector<Scalar> read_events(const fs::path& path, std::string& file_version, int& records) {
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

TEST(TensorBoard, Crc32cKnownValue) {
  // The check value of CRC-32C (RFC 3720): "123456789" -> 0xE3069283.
  EXPECT_EQ(crc32c("123456789", 9), 0xE3069283u);
  EXPECT_EQ(crc32c_bitwise(reinterpret_cast<const uint8_t*>("123456789"), 9), 0xE3069283u);
}

TEST(TensorBoard, RunWritesScalarsThatMatchMetrics) {
  const fs::path dir = test::fresh_dir("tensorboard");
  Config c = test::tiny_byte_config(test::write_words(dir, {"a", "tensor", "board", "shows", "runs", "."}, 3000, 3));
  c.train.steps = 6;
  c.train.batch_size = 2;
  c.train.eval_every = 3;
  c.train.threads = 2;
  c.train.save_final = false;
  c.moe.dispatch = "capacity";
  c.moe.capacity_factor = 0.5;  // drops, so drop_rate is not all zeros
  c.train.tensorboard = true;
  run_training(c, (dir / "run").string());

  std::vector<fs::path> files;
  for (const auto& e : fs::directory_iterator(dir / "run"))
    if (e.path().filename().string().find("tfevents") != std::string::npos) files.push_back(e.path());
  ASSERT_EQ(files.size(), 1u);
  std::string version;
  int records = 0;
  const std::vector<Scalar> scalars = read_events(files[0], version, records);
  EXPECT_EQ(version, "brain.Event:2");

  // Each metrics.jsonl value against its scalar, at float precision.
  std::map<std::pair<std::string, int64_t>, float> tb;
  for (const auto& s : scalars) EXPECT_TRUE(tb.emplace(std::make_pair(s.tag, s.step), s.value).second) << s.tag;
  size_t compared = 0;
  auto expect = [&](const std::string& tag, int64_t step, const nlohmann::json& v) {
    auto it = tb.find({tag, step});
    ASSERT_NE(it, tb.end()) << tag << " at step " << step;
    const double want = v.get<double>();
    EXPECT_TRUE(std::isfinite(it->second));
    EXPECT_LE(std::abs(double(it->second) - want), 1e-6 * std::max(1.0, std::abs(want))) << tag << " at step " << step;
    ++compared;
  };
  double drops = 0;
  const auto steps = test::read_events(dir / "run", "step");
  ASSERT_EQ(steps.size(), 6u);
  for (const auto& s : steps) {
    const int64_t step = s["step"].get<int64_t>();
    expect("train/loss", step, s["loss"]);
    expect("train/raw_loss", step, s["raw_loss"]);
    expect("train/lr_multiplier", step, s["lrm"]);
    expect("train/tok_per_sec", step, s["tok_sec"]);
    expect("train/drop_rate", step, s["drop_rate"]);
    expect("train/balance_loss", step, s["bal"]);
    EXPECT_TRUE(s["mfu"].is_null());  // a CPU run without train.peak_flops: no MFU, and no scalar
    EXPECT_EQ(tb.count({"train/mfu", step}), 0u);
    drops += s["drop_rate"].get<double>();
  }
  EXPECT_GT(drops, 0.0);
  const auto vals = test::read_events(dir / "run", "val");
  ASSERT_EQ(vals.size(), 2u);
  for (const auto& v : vals) {
    expect("val/loss", v["step"].get<int64_t>(), v["val_loss"]);
    expect("val/bpb", v["step"].get<int64_t>(), v["val_bpb"]);
  }
  EXPECT_EQ(compared, scalars.size()) << "scalars that metrics.jsonl does not hold";
  EXPECT_EQ(records, int(scalars.size()) + 1);  // one scalar per record after the file_version record
  fs::remove_all(dir);
}

TEST(TensorBoard, OffByDefault) {
  const fs::path dir = test::fresh_dir("tensorboard_off");
  Config c = test::tiny_byte_config(test::write_words(dir, {"no", "events", "."}, 2000, 4));
  c.train.steps = 2;
  c.train.batch_size = 2;
  c.train.threads = 2;
  c.train.save_final = false;
  run_training(c, (dir / "run").string());
  for (const auto& e : fs::directory_iterator(dir / "run"))
    EXPECT_EQ(e.path().filename().string().find("tfevents"), std::string::npos) << e.path();
  fs::remove_all(dir);
}

}  // namespace
}  // namespace moelab
