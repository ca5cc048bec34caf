// Heatmap binning (see heatmap_bins.hpp).
#include "lab/heatmap_bins.hpp"

#include <algorithm>
#include <cmath>
#include <string>
#include <vector>

#include "lab/run_record.hpp"

namespace moelab::lab {

void bin_heatmap_steps(ExpertHeatmap& map, size_t max_cols) {
  if (map.load.size() <= max_cols) return;
  const size_t k = (map.load.size() + max_cols - 1) / max_cols;
  ExpertHeatmap out;
  out.title = map.title + " (mean of every " + std::to_string(k) + " steps)";
  for (size_t i = 0; i < map.load.size(); i += k) {
    size_t end = std::min(map.load.size(), i + k);
    auto acc = map.load[i];
    for (auto& layer : acc)
      for (auto& v : layer) v = 0;
    std::vector<std::vector<size_t>> count;
    for (auto& layer : acc) count.emplace_back(layer.size(), 0);
    for (size_t j = i; j < end; ++j)
      for (size_t l = 0; l < acc.size() && l < map.load[j].size(); ++l)
        for (size_t e = 0; e < acc[l].size() && e < map.load[j][l].size(); ++e)
          if (known(map.load[j][l][e])) {
            acc[l][e] += map.load[j][l][e];
            ++count[l][e];
          }
    for (size_t l = 0; l < acc.size(); ++l)
      for (size_t e = 0; e < acc[l].size(); ++e) acc[l][e] = count[l][e] ? acc[l][e] / double(count[l][e]) : NAN;
    out.steps.push_back(map.steps[i]);
    out.load.push_back(std::move(acc));
  }
  map = std::move(out);
}

void bin_heatmap_experts(ExpertHeatmap& map, size_t max_rows) {
  size_t experts = 0;
  for (const auto& step : map.load)
    for (const auto& layer : step) experts = std::max(experts, layer.size());
  if (max_rows == 0 || experts <= max_rows) return;
  const size_t g = (experts + max_rows - 1) / max_rows, rows = (experts + g - 1) / g;
  const double rescale = double(experts) / double(rows);
  for (auto& step : map.load)
    for (auto& layer : step) {
      std::vector<double> binned(rows, NAN);
      for (size_t r = 0; r < rows; ++r) {
        double sum = 0;
        size_t n = 0;
        for (size_t e = r * g; e < std::min(layer.size(), (r + 1) * g); ++e)
          if (known(layer[e])) sum += layer[e], ++n;
        if (n) binned[r] = sum / double(n) * rescale;
      }
      layer = std::move(binned);
    }
  map.title += " (experts in groups of " + std::to_string(g) + ")";
}

}  // namespace moelab::lab
