// The sweep file (TOML): what to run, how often, where, and what to do when a run fails.
//
//   name = "sweep-cpu"                 # experiment name (folder suffix, artifact names)
//   title = "MoE dispatch on CPU"      # report heading (optional)
//   base = "tiny-cpu.toml"             # base config, relative to this file's folder
//   set = { "train.threads" = 2 }      # overrides for every run (optional)
//   baseline = "dropless"              # run the tok/s change column compares with (optional)
//   repeat = 1                         # runs of each config: NAME, NAME_repeat, NAME_repeat2, ...
//   max_retries = 1                    # extra attempts per planned run
//   timeout = "10m"                    # per attempt: seconds, or "90s" / "10m" / "1h"; 0 = none
//   devices = "cpu"                    # "cpu", or GPU indices [0, 1, ...]: one run per GPU
//   workers = 1                        # parallel runs on a CPU
//
//   [[run]]                            # named runs
//   name = "capacity"
//   set = { "moe.dispatch" = "capacity", "moe.capacity_factor" = 1.25 }
//
//   [[grid]]                           # every combination of the axes
//   name = "cf{moe.capacity_factor}_k{moe.top_k}"
//   axes = { "moe.capacity_factor" = [1.0, 1.25], "moe.top_k" = [1, 2] }
//
//   [[on_failure]]                     # retry rules, first match wins
//   match = "graph capture|CUDA graph" # regex on the failure text (reason and error line)
//   set = { exec = "eager" }           # fallback: retry as NAME_retryK with these overrides
//   # a rule without `set` retries the same config (the failed folder becomes NAME.failK)
//
// Keys in `set` tables may be written quoted ("moe.dispatch") or as nested tables; both mean
// the same override. Errors name the sweep file and the field, and say how to fix it.
#pragma once
#include <cstdint>
#include <filesystem>
#include <string>
#include <utility>
#include <vector>

namespace moelab::lab {

using Overrides = std::vector<std::pair<std::string, std::string>>;  // ordered "key" -> "value"

struct PlannedRun {
  std::string name;    // folder name of the first attempt
  Overrides overrides;  // sweep-wide `set` first, then the run's own
  int repeat_index = 0;
};

struct RetryRule {
  std::string match;  // ECMAScript regex, searched in the failure text
  Overrides set;      // empty: retry unchanged
};

struct SweepSpec {
  std::filesystem::path file;
  std::string name, title, baseline;
  std::filesystem::path base_config;  // resolved against the sweep file's folder
  std::vector<PlannedRun> runs;
  std::vector<RetryRule> on_failure;
  int max_retries = 0;
  double timeout_s = 0;
  std::vector<std::string> gpus;  // empty: CPU
  int workers = 1;
};

SweepSpec load_sweep(const std::filesystem::path& file);
SweepSpec sweep_from_toml_text(const std::string& text, const std::filesystem::path& origin);

// "90" / "90s" / "10m" / "1.5h" -> seconds; throws naming `what` on anything else.
double parse_duration(const std::string& text, const std::string& what);

// Repeats differ by seed: repeat r of a run gets train.seed = (its train.seed, else base_seed) + r.
// Repeat 0 keeps its seed, so a sweep with repeat = 1 runs exactly the configs it names.
void vary_repeat_seeds(SweepSpec& spec, int64_t base_seed);

// Keeps only the planned runs whose names are listed (in the sweep's order), for rerunning a few
// rows of a matrix; throws naming each unknown name and the runs there are.
void select_runs(SweepSpec& spec, const std::vector<std::string>& names);

// Merge overrides: later keys replace earlier ones in place.
Overrides merge_overrides(Overrides base, const Overrides& more);

}  // namespace moelab::lab
