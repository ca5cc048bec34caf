// ||out - ref|| / ||ref|| for the kernel benchmarks' output checks; infinite when out holds a NaN
// or Inf, so such output never passes.
#pragma once
#include <algorithm>
#include <cmath>
#include <vector>

namespace moelab {

inline double nerr(const std::vector<float>& out, const std::vector<float>& ref) {
  double num = 0, den = 0;
  for (size_t i = 0; i < out.size(); ++i) {
    if (!std::isfinite(out[i])) return INFINITY;
    const double d = double(out[i]) - ref[i];
    num += d * d;
    den += double(ref[i]) * ref[i];
  }
  return std::sqrt(num / std::max(den, 1e-30));
}

}  // namespace moelab
