// TensorBoard event files (train.tensorboard = true): a trained run's events file read back
// record by record with the tests' own reader (tests/core/tensorboard_reader.hpp: TFRecord
// framing, both masked CRC-32Cs computed bit by bit, the Event / Summary fields decoded from the
// wire format), and every scalar checked against the run's metrics.jsonl.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>

#include "core/tensorboard.hpp"
#include "core/tensorboard_reader.hpp"
#include "train/run_test_support.hpp"
#include "train/trainer.hpp"

namespace moelab {
namespace {

namespace fs = std::filesystem;

using test::crc32c_bitwise;
using test::read_tensorboard_events;
using test::Scalar;

TEST(TensorBoard, Crc32cKnownValue) {
  // The check value of CRC-32C (RFC 3720): "123456789" -> 0xE3069283.
  EXPECT_EQ(crc32c("123456789", 9), 0xE3069283u);
  EXPECT_EQ(crc32c_bitwise(reinterpret_cast<const uint8_t*>("123456789"), 9), 0xE3069283u);
}

TEST(TensorBoard, RunWritesScalarsThatMatchMetrics) {
  const fs::path dir = test::fresh_dir("tensorboard");
  Config c = test::tiny_byte_config(test::write_words(dir, {"a", "tensor", "board", "shows", "runs", "."}, 3000, 3));
  // Capacity factor 0.5 drops tokens, so drop_rate is not all zeros.
  c = test::with_keys(c, "train.steps=6 train.batch_size=2 train.eval_every=3 train.threads=2 train.save_final=false "
                         "moe.dispatch=capacity moe.capacity_factor=0.5 train.tensorboard=true");
  run_training(c, (dir / "run").string());

  std::vector<fs::path> files;
  for (const auto& e : fs::directory_iterator(dir / "run"))
    if (e.path().filename().string().find("tfevents") != std::string::npos) files.push_back(e.path());
  ASSERT_EQ(files.size(), 1u);
  std::string version;
  int records = 0;
  const std::vector<Scalar> scalars = read_tensorboard_events(files[0], version, records);
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
