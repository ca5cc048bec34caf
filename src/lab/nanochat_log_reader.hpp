// Reader of nanochat-style training stdout logs, the lab's second source of runs: a folder of
// *.log files from the PyTorch reference (or a run folder's stdout.log) gives the same report as
// run folders do. Formats seen in the wild:
//   step 00139/00140 (99.29%) | loss: 4.671600 | bal: 0.0102 | lrm: 0.05 | dt: 537.80ms |
//     tok/sec: 982,070 | mfu: 11.88 | epoch: 1 | total time: 1.59m
// (newer: "bf16_mfu:" and "| eta: 3.2m"; older: no "bal:"), the end lines "Peak memory usage:
// 23231.91MiB" and "Total training time: 1.59m", and for a crash a Python traceback whose last
// line is the error. Never throws; unreadable lines are counted in RunRecord::problems.
#pragma once
#include <string_view>

#include "lab/run_record.hpp"

namespace moelab::lab {

// Fill rec from the log text. Sets rec.state to completed (end lines seen) or failed (a
// traceback or an error line) and leaves it unknown otherwise: whether a log without an end is
// still running depends on its age, which the caller knows (see experiment_reader.hpp).
void parse_nanochat_log(std::string_view text, RunRecord& rec);

// Parse one "step ..." line into row; false when the line is not a readable step line.
bool parse_nanochat_step_line(std::string_view line, StepRow& row, int64_t* planned_steps);

}  // namespace moelab::lab
