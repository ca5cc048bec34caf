// safetensors: random round trips over every dtype, and every kind of damage a file can suffer on
// disk (truncation, trailing bytes, flipped bytes, a bad header length, malformed or inconsistent
// headers) must be rejected with an error that names the file and the problem.
#include <gtest/gtest.h>

#include <algorithm>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <random>
#include <unistd.h>

#include "core/rng.hpp"
#include "train/safetensors.hpp"

namespace moelab {
namespace {

namespace fs = std::filesystem;

class SafetensorsTest : public ::testing::Test {
 protected:
  void SetUp() override {
    Rng seed_rng(uint64_t(::getpid()) ^ uint64_t(std::random_device{}()));
    dir_ = fs::temp_directory_path() / ("moelab_st_" + std::to_string(seed_rng.next_u64()));
    fs::create_directories(dir_);
    rng_ = Rng(seed_rng.next_u64());
  }
  void TearDown() override { fs::remove_all(dir_); }

  std::string path(const std::string& name) const { return (dir_ / name).string(); }

  std::vector<uint8_t> random_bytes(size_t n) {
    std::vector<uint8_t> v(n);
    for (auto& b : v) b = uint8_t(rng_.next_u64());
    return v;
  }

  // A file with one tensor of each dtype (random shapes, a scalar and an empty one among them).
  struct Written {
    std::vector<SafetensorsTensor> tensors;
    std::vector<std::vector<uint8_t>> data;
    std::map<std::string, std::string> metadata;
  };
  Written write_random(const std::string& file) {
    Written w;
    const SafeDType types[] = {SafeDType::f32, SafeDType::f64,     SafeDType::bf16,   SafeDType::i32,
                               SafeDType::i64, SafeDType::f8_e4m3, SafeDType::f8_e5m2};
    w.data.reserve(16);
    int i = 0;
    for (SafeDType t : types) {
      Shape shape;
      const int nd = 1 + int(rng_.below(3));
      for (int d = 0; d < nd; ++d) shape.push_back(1 + int64_t(rng_.below(7)));
      int64_t n = 1;
      for (auto d : shape) n *= d;
      w.data.push_back(random_bytes(size_t(n) * safe_dtype_size(t)));
      w.tensors.push_back({"t" + std::to_string(i++) + "." + safe_dtype_name(t), t, shape, w.data.back().data()});
    }
    w.data.push_back(random_bytes(4));
    w.tensors.push_back({"scalar", SafeDType::f32, {}, w.data.back().data()});
    w.tensors.push_back({"empty", SafeDType::bf16, {3, 0}, nullptr});
    w.metadata = {{"note", "line one\nline \"two\" \xc3\xa9"}, {"number", std::to_string(rng_.next_u64())}};
    write_safetensors(file, w.tensors, w.metadata);
    return w;
  }

  std::vector<uint8_t> slurp(const std::string& file) {
    std::ifstream f(file, std::ios::binary);
    return {std::istreambuf_iterator<char>(f), std::istreambuf_iterator<char>()};
  }
  void spit(const std::string& file, const std::vector<uint8_t>& bytes) {
    std::ofstream f(file, std::ios::binary | std::ios::trunc);
    f.write(reinterpret_cast<const char*>(bytes.data()), std::streamsize(bytes.size()));
  }
  // A file from a raw header text and data section, as another tool (or damage) might leave it.
  void spit_raw(const std::string& file, const std::string& header, const std::vector<uint8_t>& data) {
    std::vector<uint8_t> bytes(8);
    uint64_t n = header.size();
    std::memcpy(bytes.data(), &n, 8);
    bytes.insert(bytes.end(), header.begin(), header.end());
    bytes.insert(bytes.end(), data.begin(), data.end());
    spit(file, bytes);
  }

  // The read must fail, with the file's path and `fragment` in the message.
  void expect_error(const std::string& file, const std::string& fragment, bool require_checksum = true) {
    try {
      read_safetensors(file, require_checksum);
      ADD_FAILURE() << "reading " << file << " succeeded; expected an error containing '" << fragment << "'";
    } catch (const Error& e) {
      const std::string msg = e.what();
      EXPECT_NE(msg.find(file), std::string::npos) << msg;
      EXPECT_NE(msg.find(fragment), std::string::npos) << "expected '" << fragment << "' in: " << msg;
    }
  }

  // The bytes of a random file freshly written at `file`, for a test to damage.
  std::vector<uint8_t> random_file_bytes(const std::string& file) {
    write_random(file);
    return slurp(file);
  }
  // `bytes` written over `file`, whose read must then fail as expect_error says.
  void expect_bytes_refused(const std::string& file, const std::vector<uint8_t>& bytes, const std::string& fragment) {
    spit(file, bytes);
    expect_error(file, fragment);
  }

  fs::path dir_;
  Rng rng_{0};
};

TEST_F(SafetensorsTest, RoundTripEveryDtype) {
  const std::string file = path("a.safetensors");
  Written w = write_random(file);
  EXPECT_FALSE(fs::exists(file + ".tmp"));

  SafetensorsFile r = read_safetensors(file);
  EXPECT_EQ(r.metadata, w.metadata);
  ASSERT_EQ(r.entries.size(), w.tensors.size());
  for (const auto& t : w.tensors) {
    const SafetensorsEntry* e = r.find(t.name);
    ASSERT_NE(e, nullptr) << t.name;
    EXPECT_EQ(e->dtype, t.dtype) << t.name;
    EXPECT_EQ(e->shape, t.shape) << t.name;
    int64_t n = 1;
    for (auto d : t.shape) n *= d;
    ASSERT_EQ(e->bytes, size_t(n) * safe_dtype_size(t.dtype)) << t.name;
    if (e->bytes) {
      EXPECT_EQ(std::memcmp(r.bytes(*e), t.data, e->bytes), 0) << t.name;
    }
  }
  // The data section starts 8-byte aligned, as the reference writer does.
  auto raw = slurp(file);
  uint64_t header_len;
  std::memcpy(&header_len, raw.data(), 8);
  EXPECT_EQ((8 + header_len) % 8, 0u);
  EXPECT_EQ(raw[8], '{');
}

TEST_F(SafetensorsTest, OverwriteReplacesAtomically) {
  const std::string file = path("b.safetensors");
  write_random(file);
  Written second = write_random(file);
  SafetensorsFile r = read_safetensors(file);
  EXPECT_EQ(r.metadata, second.metadata);
  EXPECT_FALSE(fs::exists(file + ".tmp"));
  // A failed write (folder missing) leaves nothing behind and says why.
  EXPECT_THROW(write_safetensors(path("no_such_dir/c.safetensors"), second.tensors, {}), Error);
}

TEST_F(SafetensorsTest, ReadsFilesWithoutChecksumOnlyWhenAllowed) {
  // The layout other tools write: no moelab checksum, header not padded.
  const std::string file = path("foreign.safetensors");
  std::vector<uint8_t> data = random_bytes(8 + 4);
  spit_raw(file,
           R"({"__metadata__":{"format":"pt"},"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},)"
           R"("i":{"dtype":"I32","shape":[1],"data_offsets":[8,12]}})",
           data);
  SafetensorsFile r = read_safetensors(file, /*require_checksum=*/false);
  ASSERT_NE(r.find("i"), nullptr);
  EXPECT_EQ(std::memcmp(r.bytes(*r.find("i")), data.data() + 8, 4), 0);
  EXPECT_EQ(r.metadata.at("format"), "pt");
  expect_error(file, "integrity");
}

TEST_F(SafetensorsTest, TruncatedFileIsRejected) {
  const std::string file = path("t.safetensors");
  auto raw = random_file_bytes(file);
  raw.pop_back();
  expect_bytes_refused(file, raw, "truncated");
  raw.resize(5);
  expect_bytes_refused(file, raw, "truncated");
}

TEST_F(SafetensorsTest, TrailingBytesAreRejected) {
  const std::string file = path("g.safetensors");
  auto raw = random_file_bytes(file);
  raw.push_back(0);
  expect_bytes_refused(file, raw, "trailing");
}

TEST_F(SafetensorsTest, FlippedDataByteFailsChecksum) {
  const std::string file = path("f.safetensors");
  auto raw = random_file_bytes(file);
  uint64_t header_len;
  std::memcpy(&header_len, raw.data(), 8);
  const size_t data_start = 8 + header_len;
  ASSERT_GT(raw.size(), data_start);
  const size_t at = data_start + rng_.below(raw.size() - data_start);
  raw[at] ^= uint8_t(1u << rng_.below(8));
  expect_bytes_refused(file, raw, "checksum mismatch");
}

TEST_F(SafetensorsTest, FlippedMetadataByteFailsChecksum) {
  const std::string file = path("m.safetensors");
  auto raw = random_file_bytes(file);
  const std::string needle = "line one";
  auto it = std::search(raw.begin(), raw.end(), needle.begin(), needle.end());
  ASSERT_NE(it, raw.end());
  *it = 'L';  // still valid JSON: only the checksum can notice
  expect_bytes_refused(file, raw, "checksum mismatch");
}

TEST_F(SafetensorsTest, BadHeaderLengthIsRejected) {
  const std::string file = path("h.safetensors");
  auto raw = random_file_bytes(file);
  uint64_t huge = uint64_t(raw.size());  // one past what the file can hold
  std::memcpy(raw.data(), &huge, 8);
  expect_bytes_refused(file, raw, "header length");
  uint64_t zero = 0;
  std::memcpy(raw.data(), &zero, 8);
  expect_bytes_refused(file, raw, "header length");
}

TEST_F(SafetensorsTest, MalformedHeadersAreRejected) {
  const std::string file = path("bad.safetensors");
  const std::vector<uint8_t> data = random_bytes(16);
  struct Case {
    std::string header, fragment;
  };
  const Case cases[] = {
      {R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}})",
       "overlapping"},
      {R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[1],"data_offsets":[12,16]}})",
       "gap"},
      {R"({"a":{"dtype":"F32","shape":[3],"data_offsets":[0,16]}})", "needs 12"},
      {R"({"a":{"dtype":"F16","shape":[8],"data_offsets":[0,16]}})", "not supported"},
      {R"({"a":{"dtype":"F32","shape":[-4],"data_offsets":[0,16]}})", "non-negative"},
      {R"({"a":{"dtype":"F32","shape":[4],"data_offsets":[16,0]}})", "end before"},
      {R"({"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]},"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}})",
       "twice"},
      {R"({"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]},"__metadata__":{"k":3}})", "not a string"},
      {R"({"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16],"extra":1}})", "unknown header field"},
      {R"({"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]})", "not valid JSON"},
      {R"(["a"])", "does not start with"},
      {R"({"a":{"dtype":"I64","shape":[4611686018427387904,4],"data_offsets":[0,16]}})", "overflows"},
  };
  for (const auto& c : cases) {
    SCOPED_TRACE(c.header);
    spit_raw(file, c.header, data);
    expect_error(file, c.fragment, /*require_checksum=*/false);
  }
}

TEST_F(SafetensorsTest, ChecksumSeesEverySingleBitFlip) {
  std::vector<uint8_t> buf = random_bytes(100);
  const uint64_t base = checksum64(buf.data(), buf.size());
  for (size_t i = 0; i < buf.size(); ++i)
    for (int b = 0; b < 8; ++b) {
      buf[i] ^= uint8_t(1u << b);
      ASSERT_NE(checksum64(buf.data(), buf.size()), base) << "byte " << i << " bit " << b;
      buf[i] ^= uint8_t(1u << b);
    }
  EXPECT_NE(checksum64(buf.data(), buf.size() - 1), base);
  EXPECT_NE(checksum64(buf.data(), buf.size(), 1), base);
}

TEST_F(SafetensorsTest, WriterRejectsBadInput) {
  std::vector<float> v(4, 1.0f);
  const std::string file = path("w.safetensors");
  EXPECT_THROW(write_safetensors(file, {{"x", SafeDType::f32, {4}, v.data()}, {"x", SafeDType::f32, {4}, v.data()}}, {}),
               Error);
  EXPECT_THROW(write_safetensors(file, {{"__metadata__", SafeDType::f32, {4}, v.data()}}, {}), Error);
  EXPECT_THROW(write_safetensors(file, {{"x", SafeDType::f32, {4}, v.data()}}, {{kSafetensorsChecksumKey, "x"}}),
               Error);
  EXPECT_FALSE(fs::exists(file));
}

}  // namespace
}  // namespace moelab
