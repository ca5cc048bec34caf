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

struct TrainOptions {
  // A folder that already holds a run is refused unless the config resumes it (train.resume) or
  // force is set; force moves the old run's files aside to RUN_DIR.oldK/ first.
  bool force = false;
};

// Runs training into run_dir. The config must already be validated. The folder is locked for the
// whole run (a second writer is refused at once, naming the holder's pid). A refused start (folder
// in use, a run already there, a resume that does not fit) throws before anything in the folder
// changes; a failure of a started run throws after writing status.json as failed.
TrainResult run_training(const Config& cfg, const std::string& run_dir, const TrainOptions& options = {});

// Files of a run in its folder (the sweep's own sweep.json and logs are not among them).
bool folder_holds_run(const std::string& run_dir);

}  // namespace moelab
