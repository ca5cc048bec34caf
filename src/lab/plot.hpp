// PNG figures of the report, drawn with cairo: line charts (one line per run against step) and
// the per-layer expert-load heatmap of an MoE run. Kept behind this small interface so a build
// without cairo (MOELAB_PLOTS off) still writes the markdown and CSVs.
#pragma once
#include <filesystem>
#include <string>
#include <vector>

namespace moelab::lab {

struct Series {
  std::string label;
  std::vector<double> x, y;  // non-finite y values leave a gap in the line
};

struct LineChart {
  std::string title, x_label, y_label;
  std::vector<Series> series;
  // Leave steps before `warmup_steps` out of the y range (step 0 of a compiled run takes minutes
  // and would flatten every other point); they are still drawn, clipped. 0: use every point.
  double warmup_steps = 0;
};

struct ExpertHeatmap {
  std::string title;
  std::vector<double> steps;                             // x axis, one column per entry
  std::vector<std::vector<std::vector<double>>> load;    // [step][layer][expert] fraction
};

// True when this build can render PNGs.
bool plots_available();

// Render to a PNG file. Throw moelab::Error when the file cannot be written or when plots are
// not available in this build.
void render_line_chart(const LineChart& chart, const std::filesystem::path& png, int width = 1200, int height = 700);
void render_expert_heatmap(const ExpertHeatmap& map, const std::filesystem::path& png);

// "Nice" axis ticks (1, 2, 5 times a power of ten) covering [lo, hi], at most about `target`.
std::vector<double> nice_ticks(double lo, double hi, int target);

}  // namespace moelab::lab
