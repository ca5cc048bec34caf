// The training loop behind `moelab train`: set up the backend, data, model and optimizer from a
// validated config; run steps (micro-batches with gradient accumulation), log each step as
// nanochat does, validate, checkpoint, resume; and record everything in the run folder
// (docs/RUN_FOLDER.md). A failure anywhere marks the run failed with its step and error text.
#pragma once
#include <string>

#include "config/config.hpp"

namespace moelab {

struct TrainResult {
  int64_t steps_done = 0;
  double last_loss = 0;  // debiased EMA, as printed
  double last_raw_loss = 0;
  double peak_mem_mib = 0;
  double total_time_min = 0;
};

// Runs training into run_dir. The config must already be validated. Throws moelab::Error on
// failure after writing status.json as failed.
TrainResult run_training(const Config& cfg, const std::string& run_dir);

}  // namespace moelab
