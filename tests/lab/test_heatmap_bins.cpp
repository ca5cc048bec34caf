// Heatmap binning: many steps average into at most the column budget, many experts group into at
// most the row budget with each row's colour value the mean of its experts' load ratios; maps
// that fit are left alone; missing values are skipped, never averaged in as zeros.
#include <gtest/gtest.h>

#include <cmath>

#include "lab/heatmap_bins.hpp"

namespace moelab::lab {
namespace {

ExpertHeatmap ramp(size_t steps, size_t layers, size_t experts) {
  ExpertHeatmap m;
  m.title = "t";
  for (size_t s = 0; s < steps; ++s) {
    m.steps.push_back(double(10 * s));
    std::vector<std::vector<double>> step(layers, std::vector<double>(experts));
    for (size_t l = 0; l < layers; ++l)
      for (size_t e = 0; e < experts; ++e) step[l][e] = double(s + 1) * double(e + 1 + l);
    m.load.push_back(step);
  }
  return m;
}

TEST(HeatmapBins, StepsAverageIntoTheColumnBudget) {
  ExpertHeatmap m = ramp(10, 2, 3);
  m.load[1][0][0] = NAN;  // a missing value is skipped
  bin_heatmap_steps(m, 4);  // groups of 3 steps: [0,1,2] [3,4,5] [6,7,8] [9]
  ASSERT_EQ(m.load.size(), 4u);
  EXPECT_EQ(m.steps, (std::vector<double>{0, 30, 60, 90}));
  EXPECT_DOUBLE_EQ(m.load[0][0][0], (1.0 + 3.0) / 2);  // steps 0 and 2 only
  EXPECT_DOUBLE_EQ(m.load[1][1][2], (4.0 + 5.0 + 6.0) / 3 * 4.0);
  EXPECT_DOUBLE_EQ(m.load[3][0][1], 10.0 * 2.0);
  EXPECT_NE(m.title.find("every 3 steps"), std::string::npos);
  ExpertHeatmap small = ramp(4, 1, 2);
  bin_heatmap_steps(small, 4);
  EXPECT_EQ(small.load.size(), 4u);
  EXPECT_EQ(small.title, "t");
}

TEST(HeatmapBins, ExpertsGroupIntoTheRowBudgetKeepingLoadRatios) {
  // 10 experts with loads summing to 1 into at most 4 rows: groups of 3 -> rows of 3, 3, 3, 1.
  ExpertHeatmap m;
  m.steps = {0};
  std::vector<double> load(10);
  double sum = 0;
  for (size_t e = 0; e < 10; ++e) sum += (load[e] = double(e + 1));
  for (auto& v : load) v /= sum;
  load[4] = NAN;
  m.load = {{load}};
  const auto original = load;
  bin_heatmap_experts(m, 4);
  ASSERT_EQ(m.load[0][0].size(), 4u);
  // The renderer colours value * rows (load / uniform); it must equal the group's mean ratio.
  auto ratio_mean = [&](size_t a, size_t b) {
    double s = 0;
    int n = 0;
    for (size_t e = a; e < b; ++e)
      if (std::isfinite(original[e])) s += original[e] * 10, ++n;
    return s / n;
  };
  EXPECT_NEAR(m.load[0][0][0] * 4, ratio_mean(0, 3), 1e-12);
  EXPECT_NEAR(m.load[0][0][1] * 4, ratio_mean(3, 6), 1e-12);  // expert 4 missing: skipped
  EXPECT_NEAR(m.load[0][0][3] * 4, ratio_mean(9, 10), 1e-12);
  EXPECT_NE(m.title.find("groups of 3"), std::string::npos);
  ExpertHeatmap fits = ramp(2, 1, 8);
  bin_heatmap_experts(fits, 32);
  EXPECT_EQ(fits.load[0][0].size(), 8u);
}

}  // namespace
}  // namespace moelab::lab
