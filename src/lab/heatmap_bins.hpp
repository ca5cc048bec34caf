// Binning of the expert-load heatmap, so a long run or a model with many experts still draws as
// a readable figure: consecutive steps averaged into at most a number of columns, consecutive
// experts grouped into at most a number of rows per layer.
#pragma once
#include <cstddef>

#include "lab/plot.hpp"

namespace moelab::lab {

// Averages consecutive steps (missing values skipped) so the map keeps at most max_cols columns;
// each column is labelled with its first step. No-op when it already fits.
void bin_heatmap_steps(ExpertHeatmap& map, size_t max_cols);

// Groups consecutive experts of each layer into at most max_rows rows, each row holding the mean
// load of its group scaled by experts / rows, so the renderer's load / uniform-load colour of a
// row is the mean of its experts' ratios. No-op when the map already fits.
void bin_heatmap_experts(ExpertHeatmap& map, size_t max_rows);

}  // namespace moelab::lab
