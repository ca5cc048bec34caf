// Test names for the table's rows (unique: a repeated name gets its index).
#pragma once
#include <gtest/gtest.h>

#include <set>
#include <string>

#include "ops/op_harness.hpp"

namespace moelab::ops {

inline std::string row_name(const ::testing::TestParamInfo<size_t>& info) {
  static const std::vector<std::string> names = [] {
    std::vector<std::string> n;
    std::set<std::string> seen;
    for (size_t i = 0; i < op_cases().size(); ++i) {
      std::string s = op_cases()[i].name();
      if (!seen.insert(s).second) s += "_" + std::to_string(i);
      n.push_back(s);
    }
    return n;
  }();
  return names[info.param];
}

}  // namespace moelab::ops
