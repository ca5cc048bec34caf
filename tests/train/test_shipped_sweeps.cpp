// Every sweep file under configs/ expands into runs whose configs (base config + the sweep's and
// the run's overrides, as `moelab sweep` passes them to `moelab train --set`) validate, so a typo
// in a shipped sweep fails here rather than minutes into a GPU session.
#include <gtest/gtest.h>

#include <filesystem>

#include "lab/sweep_spec.hpp"
#include "config/config.hpp"

namespace moelab {
namespace {

TEST(ShippedSweeps, EveryRunHasAValidConfig) {
  int files = 0;
  for (const auto& entry : std::filesystem::directory_iterator(std::string(MOELAB_SOURCE_DIR) + "/configs")) {
    const std::string name = entry.path().filename().string();
    if (name.rfind("sweep-", 0) != 0 || entry.path().extension() != ".toml") continue;
    ++files;
    const lab::SweepSpec spec = lab::load_sweep(entry.path());
    EXPECT_FALSE(spec.runs.empty()) << name;
    for (const lab::PlannedRun& run : spec.runs) {
      Config c = load_config(spec.base_config.string());
      for (const auto& [key, value] : run.overrides) apply_override(c, key + "=" + value);
      EXPECT_NO_THROW(validate_config(c)) << name << ": run " << run.name;
    }
  }
  EXPECT_GE(files, 2);
}

}  // namespace
}  // namespace moelab
