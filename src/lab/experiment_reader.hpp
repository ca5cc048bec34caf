// Reading an experiment folder into run records, and the status rules. An experiment folder holds
// run folders (written by `moelab train`, usually under `moelab sweep`) and/or nanochat-style
// *.log files, one per run. The rules, in order:
//   - status.json says completed, failed or queued: that is the state.
//   - it says running (or there is none, or the run is a log): running while any of its files
//     changed in the last stale_s seconds; otherwise failed ("no update for ...").
//   - a record of the run's end (metrics "end" event, the log's end lines) without a failure
//     means completed; a Python traceback or error line in a log means failed with that error.
// Folders and files that cannot be read still appear, with what went wrong in their problems.
#pragma once
#include <filesystem>
#include <string>
#include <vector>

#include "lab/run_record.hpp"

namespace moelab::lab {

struct Experiment {
  std::filesystem::path dir;
  std::string name;      // for artifact file names: experiment.json's, else the folder name
  std::string title;     // report heading
  std::string baseline;  // run whose tok/s the others are compared with ("" = none)
  std::vector<RunRecord> runs;
  std::vector<std::string> problems;  // inputs that were skipped entirely
};

struct ReadOptions {
  double stale_s = 300;  // a run with no file change for this long is no longer running
};

Experiment read_experiment(const std::filesystem::path& dir, const ReadOptions& opt = {});

// One run folder, or one log file, alone.
RunRecord read_run_folder(const std::filesystem::path& dir, const ReadOptions& opt = {});
RunRecord read_log_file(const std::filesystem::path& file, const ReadOptions& opt = {});

// True when the folder looks like a run folder (has any file a run writes).
bool is_run_folder(const std::filesystem::path& dir);

// Name used for artifacts when none is recorded: the folder name without a leading
// YYYYMMDD_HHMMSS_ stamp, with characters unsafe in file names replaced.
std::string experiment_name_from_dir(const std::filesystem::path& dir);

// The last line of a child's stderr that looks like an error ("" when there is none).
std::string last_error_line(std::string_view stderr_text);

}  // namespace moelab::lab
