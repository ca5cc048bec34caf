// Configs in tests written as the `--set` overrides a user would pass: one line names the keys a
// test changes, instead of one assignment a line.
#pragma once
#include <sstream>
#include <string>

#include "config/config.hpp"

namespace moelab::test {

// Applies whitespace-separated "section.key=value" assignments in order, each parsed as `--set`
// parses it (apply_override), and returns the config.
inline Config with_keys(Config c, const std::string& assignments) {
  std::istringstream in(assignments);
  for (std::string a; in >> a;) apply_override(c, a);
  return c;
}

}  // namespace moelab::test
