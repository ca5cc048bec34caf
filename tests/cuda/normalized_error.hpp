// ||out - ref|| / ||ref|| for the GPU tests (the absolute norm when ref is all zeros); infinite
// when the sizes differ or out holds a NaN or Inf, so such output never passes.
// worst_row_nerr adds the local view: a few wrong rows of a large output barely move the global
// norm, so each row is held to its own bound too.
#pragma once
#include <algorithm>
#include <cmath>
#include <vector>

namespace moelab {

// A row's own normalized error may reach this many times the test's global bound: rows are
// short, so their rounding error spreads wider than the whole output's.
constexpr double kRowTolFactor = 4;

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

// The largest of the rows' ||out_r - ref_r|| / max(||ref_r||, the mean row norm), over rows of
// `row_len` elements (row_len 1: per element, scaled by the output's rms). The mean-row-norm
// floor keeps rows that are near zero by chance from failing on rounding alone. Infinite as nerr.
inline double worst_row_nerr(const std::vector<float>& out, const std::vector<float>& ref, size_t row_len) {
  if (out.size() != ref.size() || row_len == 0) return INFINITY;
  const size_t rows = ref.size() / row_len;
  if (rows == 0) return nerr(out, ref);
  double total = 0;
  for (size_t i = 0; i < rows * row_len; ++i) total += double(ref[i]) * double(ref[i]);
  const double floor = std::sqrt(total / double(rows));
  double worst = 0;
  for (size_t r = 0; r < rows; ++r) {
    double num = 0, den = 0;
    for (size_t j = r * row_len; j < (r + 1) * row_len; ++j) {
      if (!std::isfinite(out[j])) return INFINITY;
      const double d = double(out[j]) - double(ref[j]);
      num += d * d;
      den += double(ref[j]) * double(ref[j]);
    }
    const double scale = std::max(std::sqrt(den), floor);
    worst = std::max(worst, scale == 0 ? std::sqrt(num) : std::sqrt(num) / scale);
  }
  return worst;
}

}  // namespace moelab
