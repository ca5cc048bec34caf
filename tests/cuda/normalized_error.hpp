// ||out - ref|| / ||ref|| for the GPU tests (the absolute norm when ref is all zeros); infinite
// when the sizes differ or out holds a NaN or Inf, so such output never passes.
#pragma once
#include <cmath>
#include <vector>

namespace moelab {

inline double nerr(const std::vector<float>& out, const std::vector<float>& ref) {
  if (out.size() != ref.size()) return INFINITY;
  double num = 0, den = 0;
  for (size_t i = 0; i < out.size(); ++i) {
    if (!std::isfinite(out[i])) return INFINITY;
    const double d = double(out[i]) - double(ref[i]);
    num += d * d;
    den += double(ref[i]) * double(ref[i]);
  }
  return den == 0 ? std::sqrt(num) : std::sqrt(num / den);
}

}  // namespace moelab
