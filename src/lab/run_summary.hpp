// The numbers of the Run Summary table, computed from a run record: tail means over the last N
// observed steps (N = 50 by default, as the seed's report), the change of tokens/s against a
// baseline run, and the MoE routing figures (capacity drop rate, expert load imbalance).
// Formatting lives here too so the markdown and the CSV print the same text.
#pragma once
#include <string>
#include <vector>

#include "lab/run_record.hpp"

namespace moelab::lab {

struct RunSummary {
  std::string name;
  RunState state = RunState::unknown;
  int64_t steps_observed = 0;
  int64_t last_step = -1;
  double last_loss = kUnknown;
  double tail_tok_sec = kUnknown;
  double tail_mfu = kUnknown;
  double tail_dt_ms = kUnknown;
  double peak_mem_mib = kUnknown;
  double total_time_min = kUnknown;
  double tok_sec_change_pct = kUnknown;  // against the baseline run
  double tail_drop_rate = kUnknown;
  double tail_load_imbalance = kUnknown;  // max expert load / mean expert load, worst layer
  int64_t moe_layers = 0;
  int64_t experts = 0;
};

// Mean of the known values among the last `tail` steps' field; unknown when there are none.
double tail_mean(const std::vector<StepRow>& steps, int64_t tail, double StepRow::*field);

RunSummary summarize_run(const RunRecord& rec, int64_t tail);

// Fill tok_sec_change_pct of every row from the row named `baseline` (left unknown when that
// run is missing or has no tokens/s).
void compare_with_baseline(std::vector<RunSummary>& rows, const std::string& baseline);

// Fixed-point text with `decimals` digits, "-" for unknown.
std::string format_number(double v, int decimals);
// "+12.3%" / "-4.0%" / "-" for unknown.
std::string format_change(double pct);

// The summary table's header and one row's cells, shared by markdown and CSV.
std::vector<std::string> summary_columns(int64_t tail, const std::string& baseline);
std::vector<std::string> summary_cells(const RunSummary& s, bool with_baseline);

}  // namespace moelab::lab
