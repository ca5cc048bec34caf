// Run folder naming (see run_naming.hpp).
#include "lab/run_naming.hpp"

#include <cctype>

namespace moelab::lab {
namespace {

// If name ends in marker followed by digits, return the length before the marker; else npos.
size_t strip_suffix(const std::string& name, const std::string& marker) {
  size_t end = name.size();
  while (end > 0 && std::isdigit(static_cast<unsigned char>(name[end - 1]))) --end;
  if (end == name.size() || end < marker.size() + 1) return std::string::npos;
  if (name.compare(end - marker.size(), marker.size(), marker) != 0) return std::string::npos;
  return end - marker.size();
}

}  // namespace

std::string repeat_name(const std::string& base, int index) {
  if (index <= 0) return base;
  if (index == 1) return base + "_repeat";
  return base + "_repeat" + std::to_string(index);
}

std::string fail_name(const std::string& base, int k) { return base + ".fail" + std::to_string(k); }
std::string retry_name(const std::string& base, int k) { return base + "_retry" + std::to_string(k); }

std::string origin_of(const std::string& name) {
  std::string n = name;
  for (bool changed = true; changed;) {
    changed = false;
    for (const char* marker : {".fail", "_retry"}) {
      size_t cut = strip_suffix(n, marker);
      if (cut != std::string::npos) {
        n.resize(cut);
        changed = true;
      }
    }
  }
  return n;
}

}  // namespace moelab::lab
