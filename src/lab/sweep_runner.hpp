// `moelab sweep`: runs the planned runs of a sweep file as `moelab train` children, a few at a
// time (one per GPU, or N CPU workers), with retries and fallbacks, and keeps the report current.
// Everything it decides is written into the experiment folder (experiment.json, sweep.toml, and
// per run sweep.json, status.json, stdout.log, stderr.log), so a run can be reproduced from its
// folder alone and the same command run again picks up where it stopped: completed runs are
// skipped, unfinished ones are moved aside (NAME.failK) and started again. The experiment folder
// is locked for the sweep's lifetime (a second sweep into it is refused), and a run folder still
// locked by a live trainer (of an earlier sweep) is waited for, never raced.
#pragma once
#include <atomic>
#include <filesystem>
#include <iosfwd>
#include <string>
#include <vector>

#include "lab/sweep_spec.hpp"

namespace moelab::lab {

struct SweepOptions {
  std::filesystem::path out_dir;           // "" = runs/YYYYMMDD_HHMMSS_<name>
  std::vector<std::string> train_command;  // "" = {this executable, "train"}; tests use a script
  int workers = 0;                         // > 0 replaces the sweep file's CPU workers
  double grace_s = 10;                     // SIGTERM -> SIGKILL delay when stopping a child
  double poll_s = 0.2;
  double progress_every_s = 5;
  bool report = true;                      // regenerate the report after each run
  int64_t tail = 50;
  std::ostream* out = nullptr;             // progress lines; nullptr = stdout
  const std::atomic<bool>* interrupt = nullptr;  // set from a SIGINT handler
  double holder_wait_s = 30;               // how long to wait for a live writer of a run folder
};

struct SweepOutcome {
  std::filesystem::path exp_dir;
  std::filesystem::path report;  // "" when no report was written
  int completed = 0, failed = 0, skipped = 0;  // attempts
  std::vector<std::string> failed_for_good;     // planned runs whose last attempt failed
  bool interrupted = false;
};

SweepOutcome run_sweep(const SweepSpec& spec, const SweepOptions& opt);

// Shell-quoted command line, as recorded in each run's sweep.json.
std::string shell_join(const std::vector<std::string>& argv);

}  // namespace moelab::lab
