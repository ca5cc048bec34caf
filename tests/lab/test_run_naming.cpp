// Run folder naming: repeats, failed attempts, retries, and finding the origin from a name.
#include <gtest/gtest.h>

#include "lab/run_naming.hpp"

using namespace moelab::lab;

TEST(RunNaming, RepeatsFollowTheSeedReport) {
  EXPECT_EQ(repeat_name("moe", 0), "moe");
  EXPECT_EQ(repeat_name("moe", 1), "moe_repeat");
  EXPECT_EQ(repeat_name("moe", 2), "moe_repeat2");
  EXPECT_EQ(fail_name("moe", 1), "moe.fail1");
  EXPECT_EQ(retry_name("moe", 2), "moe_retry2");
}

TEST(RunNaming, OriginStripsAttemptsButNotRepeats) {
  // (name, its origin): attempt suffixes go, repeat suffixes and suffixes without a number stay.
  const std::pair<const char*, const char*> cases[] = {
      {"moe_fp8_experts_static.fail1", "moe_fp8_experts_static"},
      {"moe_fp8_experts_dynamic_coalesce0_retry2", "moe_fp8_experts_dynamic_coalesce0"},
      {"a_retry1.fail2", "a"}, {"moe_repeat2", "moe_repeat2"}, {"_retry", "_retry"}, {"x.fail", "x.fail"}};
  for (const auto& [name, origin] : cases) EXPECT_EQ(origin_of(name), origin) << name;
}
