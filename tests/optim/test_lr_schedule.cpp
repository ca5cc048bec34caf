// Schedules: nanochat's warm-up / flat / warm-down multiplier at its boundaries and Muon's
// momentum ramp, checked against values computed by hand.
#include <gtest/gtest.h>

#include <random>

#include "core/rng.hpp"
#include "optim/lr_schedule.hpp"

namespace moelab {
namespace {

TEST(LrSchedule, WarmupFlatWarmdownBoundaries) {
  TrainConfig t;
  t.steps = 100;
  t.warmup_ratio = 0.1;    // W = 10
  t.warmdown_ratio = 0.2;  // D = 20
  t.final_lr_frac = 0.1;
  EXPECT_DOUBLE_EQ(lr_multiplier(t, 0), 0.1);
  EXPECT_DOUBLE_EQ(lr_multiplier(t, 4), 0.5);
  EXPECT_DOUBLE_EQ(lr_multiplier(t, 9), 1.0);
  EXPECT_DOUBLE_EQ(lr_multiplier(t, 10), 1.0);
  EXPECT_DOUBLE_EQ(lr_multiplier(t, 80), 1.0);  // step <= steps - D stays flat
  EXPECT_DOUBLE_EQ(lr_multiplier(t, 81), 0.95 + 0.05 * 0.1);
  EXPECT_DOUBLE_EQ(lr_multiplier(t, 90), 0.5 + 0.5 * 0.1);
  EXPECT_DOUBLE_EQ(lr_multiplier(t, 99), 0.05 + 0.95 * 0.1);
  EXPECT_DOUBLE_EQ(lr_multiplier(t, 100), 0.1);
}

TEST(LrSchedule, NoWarmupAndRandomMonotoneWarmdown) {
  std::random_device rd;
  Rng rng(rd());
  TrainConfig t;
  t.steps = 50 + int64_t(rng.below(1000));
  t.warmup_ratio = 0;
  t.warmdown_ratio = 0.05 + 0.9 * rng.uniform();
  t.final_lr_frac = rng.uniform() * 0.5;
  EXPECT_DOUBLE_EQ(lr_multiplier(t, 0), 1.0);
  double prev = 1.0;
  for (int64_t s = 0; s < t.steps; ++s) {
    const double m = lr_multiplier(t, s);
    ASSERT_LE(m, prev + 1e-15) << "step " << s;
    ASSERT_GT(m, t.final_lr_frac - 1e-15) << "step " << s;
    prev = m;
  }
  EXPECT_LT(prev, 1.0);
}

TEST(LrSchedule, RoundsRatiosHalfToEvenLikePython) {
  TrainConfig t;
  t.steps = 10;
  t.warmup_ratio = 0.25;  // 2.5 -> 2
  t.warmdown_ratio = 0.35;  // 3.5 -> 4
  t.final_lr_frac = 0.0;
  EXPECT_DOUBLE_EQ(lr_multiplier(t, 0), 0.5);
  EXPECT_DOUBLE_EQ(lr_multiplier(t, 1), 1.0);
  EXPECT_DOUBLE_EQ(lr_multiplier(t, 6), 1.0);
  EXPECT_DOUBLE_EQ(lr_multiplier(t, 7), 0.75);
}

TEST(MuonMomentum, LinearWarmupThenConstant) {
  OptimConfig o;
  o.muon_momentum_start = 0.85;
  o.muon_momentum = 0.95;
  o.muon_momentum_warmup = 300;
  EXPECT_DOUBLE_EQ(muon_momentum_at(o, 0), 0.85);
  EXPECT_NEAR(muon_momentum_at(o, 150), 0.90, 1e-15);
  EXPECT_NEAR(muon_momentum_at(o, 299), 0.85 + 0.1 * 299.0 / 300.0, 1e-15);
  EXPECT_DOUBLE_EQ(muon_momentum_at(o, 300), 0.95);
  EXPECT_DOUBLE_EQ(muon_momentum_at(o, 100000), 0.95);
  o.muon_momentum_warmup = 0;
  EXPECT_DOUBLE_EQ(muon_momentum_at(o, 0), 0.95);
}

}  // namespace
}  // namespace moelab
