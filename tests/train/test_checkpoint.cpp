// Checkpoints: bit-exact round trips of weights, optimizer state and trainer scalars (f32 and f64
// masters), and all-or-nothing loading: a damaged or mismatched file throws an error naming the
// problem and leaves every target tensor exactly as it was.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>
#include <random>
#include <unistd.h>

#include "backend/cpu/cpu_backend.hpp"
#include "core/rng.hpp"
#include "config/config.hpp"
#include "train/checkpoint.hpp"
#include "train/safetensors.hpp"

namespace moelab {
namespace {

namespace fs = std::filesystem;

struct Model {
  ParamTable params;
  std::vector<NamedTensor> state;
};

void fill_random(Tensor& t, Rng& rng) {
  for (int64_t i = 0; i < t.numel(); ++i) {
    const double v = rng.normal();
    if (t.dtype == DType::f64) t.as<double>()[i] = v;
    else t.as<float>()[i] = float(v);
  }
}

// A small MoE-shaped table (embedding, a dense matrix, a 3-D expert tensor, the unembedding) and
// one optimizer slot per parameter, all filled with fresh random values.
Model make_model(Backend& b, Rng& rng, int64_t d, bool extra_param = false, bool drop_head = false) {
  Model m;
  const DType dt = b.master_dtype();
  auto add = [&](const std::string& name, ParamGroup g, Shape shape) {
    Param p;
    p.name = name;
    p.group = g;
    p.value = b.alloc(shape, dt);
    p.grad = b.alloc(shape, dt);
    p.compute = p.value;
    fill_random(p.value, rng);
    m.params.params.push_back(p);
    NamedTensor s{"optim/" + name + "/slot", b.alloc(shape, dt)};
    fill_random(s.tensor, rng);
    m.state.push_back(s);
  };
  add("transformer.wte.weight", ParamGroup::embedding, {32, d});
  add("transformer.h.0.attn.c_q.weight", ParamGroup::matrix, {d, d});
  add("transformer.h.0.mlp.experts.w_fc", ParamGroup::matrix, {4, 2 * d, d});
  if (!drop_head) add("lm_head.weight", ParamGroup::unembedding, {32, d});
  if (extra_param) add("transformer.h.1.attn.c_q.weight", ParamGroup::matrix, {d, d});
  return m;
}

std::vector<uint8_t> raw(const Tensor& t) {
  const auto* p = static_cast<const uint8_t*>(t.data);
  return {p, p + t.bytes()};
}

std::vector<std::vector<uint8_t>> snapshot(const Model& m) {
  std::vector<std::vector<uint8_t>> s;
  for (const auto& p : m.params.params) s.push_back(raw(p.value));
  for (const auto& t : m.state) s.push_back(raw(t.tensor));
  return s;
}

bool same_bits(double a, double b) { return std::memcmp(&a, &b, sizeof a) == 0; }

class CheckpointTest : public ::testing::Test {
 protected:
  void SetUp() override {
    std::random_device rd;
    rng_ = Rng((uint64_t(rd()) << 32) ^ rd() ^ uint64_t(::getpid()));
    dir_ = fs::temp_directory_path() / ("moelab_ck_" + std::to_string(rng_.next_u64()));
    fs::create_directories(dir_ / "checkpoints");
  }
  void TearDown() override { fs::remove_all(dir_); }

  CheckpointMeta random_meta() {
    CheckpointMeta meta;
    meta.step = int64_t(rng_.below(1000000));
    meta.data_state = {int64_t(rng_.next_u64() >> 1), -int64_t(rng_.below(100)), 0};
    meta.loss_ema = rng_.normal() / 3.0;  // a double with all 52 mantissa bits in use
    meta.train_time_s = rng_.uniform() * 1e5;
    meta.scalars = {{"nan", std::numeric_limits<double>::quiet_NaN()},
                    {"neg_zero", -0.0},
                    {"tiny", std::numeric_limits<double>::denorm_min()},
                    {"tokens.seen", 1e15 + 1}};
    Config cfg;
    cfg.model.d_model = 16;
    meta.config_text = config_to_toml(cfg);
    return meta;
  }

  // Loading must fail with `fragment` in the message and change no tensor.
  void expect_rejected(const std::string& file, Backend& b, Model& target, const std::string& fragment,
                       const std::string& current_config = {}) {
    const auto before = snapshot(target);
    CheckpointMeta out;
    out.step = -7;
    try {
      load_checkpoint(file, b, target.params, target.state, out, current_config);
      ADD_FAILURE() << "loading " << file << " succeeded; expected an error containing '" << fragment << "'";
    } catch (const Error& e) {
      const std::string msg = e.what();
      EXPECT_NE(msg.find(file), std::string::npos) << msg;
      EXPECT_NE(msg.find(fragment), std::string::npos) << "expected '" << fragment << "' in: " << msg;
    }
    EXPECT_EQ(snapshot(target), before) << "a failed load changed the target tensors";
    EXPECT_EQ(out.step, -7) << "a failed load changed the output meta";
  }

  std::string file(int64_t step) const { return checkpoint_path(dir_.string(), step); }

  fs::path dir_;
  Rng rng_{0};
};

void expect_round_trip(DType master, Rng& rng, const std::string& file, CheckpointMeta meta) {
  CpuBackend b(master, 1);
  Model src = make_model(b, rng, 16);
  save_checkpoint(file, b, src.params, src.state, meta);
  EXPECT_FALSE(fs::exists(file + ".tmp"));

  Model dst = make_model(b, rng, 16);
  ASSERT_NE(snapshot(dst), snapshot(src));
  CheckpointMeta out;
  load_checkpoint(file, b, dst.params, dst.state, out);
  EXPECT_EQ(snapshot(dst), snapshot(src));
  EXPECT_EQ(out.step, meta.step);
  EXPECT_EQ(out.data_state, meta.data_state);
  EXPECT_TRUE(same_bits(out.loss_ema, meta.loss_ema));
  EXPECT_TRUE(same_bits(out.train_time_s, meta.train_time_s));
  EXPECT_EQ(out.config_text, meta.config_text);
  ASSERT_EQ(out.scalars.size(), meta.scalars.size());
  for (const auto& [k, v] : meta.scalars) {
    ASSERT_TRUE(out.scalars.count(k)) << k;
    EXPECT_TRUE(same_bits(out.scalars.at(k), v)) << k;
  }
}

TEST_F(CheckpointTest, RoundTripF32IsBitExact) { expect_round_trip(DType::f32, rng_, file(12), random_meta()); }

TEST_F(CheckpointTest, RoundTripF64IsBitExact) {
  CheckpointMeta meta = random_meta();
  meta.data_state.clear();  // an empty loader state must survive too
  expect_round_trip(DType::f64, rng_, file(3), meta);
}

TEST_F(CheckpointTest, WeightsUseParamNamesAndMasterDtype) {
  CpuBackend b(DType::f32, 1);
  Model m = make_model(b, rng_, 8);
  save_checkpoint(file(1), b, m.params, m.state, random_meta());
  SafetensorsFile f = read_safetensors(file(1));
  const SafetensorsEntry* e = f.find("transformer.h.0.mlp.experts.w_fc");
  ASSERT_NE(e, nullptr);
  EXPECT_EQ(e->shape, (Shape{4, 16, 8}));
  EXPECT_EQ(e->dtype, SafeDType::f32);
  EXPECT_NE(f.find("optim/lm_head.weight/slot"), nullptr);
  EXPECT_EQ(f.entries.size(), 8u);
}

TEST_F(CheckpointTest, DamagedFilesNeverHalfLoad) {
  CpuBackend b(DType::f32, 1);
  Model src = make_model(b, rng_, 16);
  const std::string path = file(5);
  save_checkpoint(path, b, src.params, src.state, random_meta());
  std::vector<uint8_t> bytes;
  {
    std::ifstream f(path, std::ios::binary);
    bytes.assign(std::istreambuf_iterator<char>(f), std::istreambuf_iterator<char>());
  }
  auto write_bytes = [&](const std::vector<uint8_t>& v) {
    std::ofstream f(path, std::ios::binary | std::ios::trunc);
    f.write(reinterpret_cast<const char*>(v.data()), std::streamsize(v.size()));
  };
  Model target = make_model(b, rng_, 16);

  std::vector<uint8_t> truncated(bytes.begin(), bytes.end() - 1 - std::ptrdiff_t(rng_.below(1000)));
  write_bytes(truncated);
  expect_rejected(path, b, target, "truncated");

  std::vector<uint8_t> flipped = bytes;
  flipped[flipped.size() - 1 - rng_.below(4000)] ^= 0x10;  // inside the weights
  write_bytes(flipped);
  expect_rejected(path, b, target, "checksum mismatch");

  std::vector<uint8_t> bad_len = bytes;
  bad_len[7] = 0x40;
  write_bytes(bad_len);
  expect_rejected(path, b, target, "header length");
}

TEST_F(CheckpointTest, ShapeMismatchNamesTensorAndConfigKey) {
  CpuBackend b(DType::f32, 1);
  Model src = make_model(b, rng_, 16);
  save_checkpoint(file(2), b, src.params, src.state, random_meta());
  Model small = make_model(b, rng_, 8);
  expect_rejected(file(2), b, small, "tensor 'transformer.wte.weight' has shape [32, 16] but the model expects [32, 8]");
  Config current;
  current.model.d_model = 8;
  expect_rejected(file(2), b, small, "model.d_model: checkpoint 16, this run 8", config_to_toml(current));
}

TEST_F(CheckpointTest, MissingAndExtraTensorsAreRejected) {
  CpuBackend b(DType::f32, 1);
  Model src = make_model(b, rng_, 16);
  save_checkpoint(file(4), b, src.params, src.state, random_meta());

  Model bigger = make_model(b, rng_, 16, /*extra_param=*/true);
  expect_rejected(file(4), b, bigger, "tensor 'transformer.h.1.attn.c_q.weight' is missing");

  Model smaller = make_model(b, rng_, 16, false, /*drop_head=*/true);
  expect_rejected(file(4), b, smaller, "holds tensor 'lm_head.weight'");

  Model no_state = make_model(b, rng_, 16);
  no_state.state.pop_back();
  expect_rejected(file(4), b, no_state, "holds tensor 'optim/lm_head.weight/slot'");
}

TEST_F(CheckpointTest, MasterDtypeMismatchIsRejected) {
  CpuBackend b32(DType::f32, 1);
  Model src = make_model(b32, rng_, 16);
  save_checkpoint(file(6), b32, src.params, src.state, random_meta());
  CpuBackend b64(DType::f64, 1);
  Model target = make_model(b64, rng_, 16);
  expect_rejected(file(6), b64, target, "another master precision");
}

TEST_F(CheckpointTest, DuplicateNamesAreRejectedOnSave) {
  CpuBackend b(DType::f32, 1);
  Model m = make_model(b, rng_, 8);
  m.state.push_back({m.params.params[0].name, m.state[0].tensor});
  EXPECT_THROW(save_checkpoint(file(9), b, m.params, m.state, random_meta()), Error);
  EXPECT_FALSE(fs::exists(file(9)));
}

TEST_F(CheckpointTest, LatestCheckpointPicksHighestStep) {
  EXPECT_EQ(latest_checkpoint(dir_.string()), "");
  EXPECT_EQ(latest_checkpoint((dir_ / "nowhere").string()), "");
  const int64_t steps[] = {int64_t(rng_.below(900)), 999, 1000, int64_t(rng_.below(900))};
  for (int64_t s : steps) std::ofstream(file(s)) << "x";
  std::ofstream(file(5000) + ".tmp") << "x";                          // an unfinished write
  std::ofstream((dir_ / "checkpoints" / "step_9999999.bak").string()) << "x";  // not a checkpoint
  EXPECT_EQ(latest_checkpoint(dir_.string()), file(1000));
  EXPECT_EQ(fs::path(file(7)).filename().string(), "step_000007.safetensors");
  EXPECT_EQ(fs::path(file(1234567)).filename().string(), "step_1234567.safetensors");
  std::ofstream(file(1234567)) << "x";
  EXPECT_EQ(latest_checkpoint(dir_.string()), file(1234567));
}

}  // namespace
}  // namespace moelab
