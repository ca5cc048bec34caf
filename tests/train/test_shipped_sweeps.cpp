// Every sweep file under configs/ expands into runs whose configs (base config + the sweep's and
// the run's overrides, as `moelab sweep` passes them to `moelab train --set`) validate, so a typo
// in a shipped sweep fails here rather than minutes into a GPU session.
#include <gtest/gtest.h>

#include <filesystem>
#include <vector>

#include "lab/sweep_spec.hpp"
#include "config/config.hpp"

namespace moelab {
namespace {

TEST(ShippedSweeps, EveryRunHasAValidConfig) {
  int files = 0;
  std::vector<std::filesystem::path> sweeps;
  for (const auto& entry : std::filesystem::directory_iterator(std::string(MOELAB_SOURCE_DIR) + "/configs")) {
    const std::string name = entry.path().filename().string();
    // sweep-*.toml and the routing lab's routing-*.toml
    if ((name.rfind("sweep-", 0) == 0 || name.rfind("routing-", 0) == 0) && entry.path().extension() == ".toml")
      sweeps.push_back(entry.path());
  }
  // configs/seed/ holds only sweep files: the seed's matrices.
  for (const auto& entry : std::filesystem::directory_iterator(std::string(MOELAB_SOURCE_DIR) + "/configs/seed"))
    if (entry.path().extension() == ".toml") sweeps.push_back(entry.path());
  for (const auto& path : sweeps) {
    const std::filesystem::directory_entry entry(path);
    const std::string name = entry.path().filename().string();
    ++files;
    const lab::SweepSpec spec = lab::load_sweep(entry.path());
    EXPECT_FALSE(spec.runs.empty()) << name;
    for (const lab::PlannedRun& run : spec.runs) {
      Config c = load_config(spec.base_config.string());
      for (const auto& [key, value] : run.overrides) apply_override(c, key + "=" + value);
      EXPECT_NO_THROW(validate_config(c)) << name << ": run " << run.name;
    }
  }
  EXPECT_GE(files, 4);
}

// The seed's matrices under its run names: v4's 13 rows at 140 steps with the long ones at 360,
// each name's precision as the seed's (bf16; fp8 on the dense linears for "noexpert"; fp8 on the
// experts too for "fp8_experts"), and the 3 x 3 capacity ablation at 280 with FP8 experts, all
// on the seed's recipe with its 2^19 tokens a step.
TEST(ShippedSweeps, SeedMatrices) {
  const std::string dir = std::string(MOELAB_SOURCE_DIR) + "/configs/seed/";
  const lab::SweepSpec v4 = lab::load_sweep(dir + "v4.toml");
  ASSERT_EQ(v4.runs.size(), 13u);
  int long_runs = 0;
  for (const lab::PlannedRun& run : v4.runs) {
    Config c = load_config(v4.base_config.string());
    for (const auto& [key, value] : run.overrides) apply_override(c, key + "=" + value);
    const bool is_long = run.name.ends_with("_long");
    long_runs += is_long;
    EXPECT_EQ(c.train.steps, is_long ? 360 : 140) << run.name;
    EXPECT_EQ(c.grad_accum_steps() * c.train.batch_size * c.train.seq_len, 524288) << run.name;
    const bool dynamic = run.name.find("dynamic") != std::string::npos;
    const bool eager = run.name.find("nocompile") != std::string::npos;
    EXPECT_EQ(c.moe.dispatch, dynamic ? "dropless" : "capacity") << run.name;
    EXPECT_EQ(c.exec, eager ? "eager" : "graph") << run.name;
    EXPECT_EQ(c.optim.muon_variant, "normuon");
    EXPECT_TRUE(c.model.value_embeddings && c.model.scalar_lambdas);
    const bool bf16 = run.name.find("bf16") != std::string::npos;
    const bool dense_only = run.name.find("noexpert") != std::string::npos;
    EXPECT_EQ(c.precision, bf16 ? "bf16" : "fp8") << run.name;
    if (!bf16) {
      EXPECT_EQ(c.fp8.layers, dense_only ? "dense" : "all") << run.name;
    }
  }
  EXPECT_EQ(long_runs, 2);
  const lab::SweepSpec cap = lab::load_sweep(dir + "capacity.toml");
  ASSERT_EQ(cap.runs.size(), 9u);
  for (const lab::PlannedRun& run : cap.runs) {
    Config c = load_config(cap.base_config.string());
    for (const auto& [key, value] : run.overrides) apply_override(c, key + "=" + value);
    EXPECT_EQ(c.train.steps, 280) << run.name;
    EXPECT_EQ(c.precision, "fp8") << run.name;
    EXPECT_EQ(c.fp8.layers, "all") << run.name;
  }
}

}  // namespace
}  // namespace moelab
