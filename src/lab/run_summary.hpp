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
  bool diverged = false;  // the loss became nan/inf (RunRecord::diverged_step): last_loss shows "nan"
  double tail_tok_sec = kUnknown;
  double tail_mfu = kUnknown;
  double tail_dt_ms = kUnknown;
  double peak_mem_mib = kUnknown;
  double total_time_min = kUnknown;
  double tok_sec_change_pct = kUnknown;  // against the baseline run
  double last_val_loss = kUnknown, best_val_loss = kUnknown;  // best: lowest seen
  double last_val_bpb = kUnknown, best_val_bpb = kUnknown;
  double val_loss_change_pct = kUnknown, val_bpb_change_pct = kUnknown;  // last, against the baseline
  double tail_drop_rate = kUnknown;
  double tail_load_imbalance = kUnknown;  // max expert load / mean expert load, worst layer
  int64_t moe_layers = 0;
  int64_t experts = 0;
  // Routing statistics (docs/ROUTING.md). final: the last step that recorded the key; mean: the
  // mean over every step that recorded it (the whole run, as the MaxVio of the auxiliary-loss-free
  // balancing paper is averaged over training). MaxVio takes the worst layer of each step first.
  double final_max_vio = kUnknown, mean_max_vio = kUnknown;
  std::vector<double> final_max_vio_layers, mean_max_vio_layers;  // per MoE layer
  double final_router_entropy = kUnknown, mean_router_entropy = kUnknown;  // mean over layers
  double final_z_loss = kUnknown, mean_z_loss = kUnknown;
  double final_bias_range = kUnknown;  // widest layer; aux_free runs only
  double final_drop_rate = kUnknown, mean_drop_rate = kUnknown;
  std::string error;  // the run's error line when it failed
};

// Mean of the known values among the last `tail` steps' field; unknown when there are none.
double tail_mean(const std::vector<StepRow>& steps, int64_t tail, double StepRow::*field);

RunSummary summarize_run(const RunRecord& rec, int64_t tail);

// Fill tok_sec_change_pct and the validation changes of every row from the row named `baseline`
// (left unknown when that run is missing or lacks the number).
void compare_with_baseline(std::vector<RunSummary>& rows, const std::string& baseline);

// Fixed-point text with `decimals` digits, "-" for unknown.
std::string format_number(double v, int decimals);
// "+12.3%" / "-4.0%" / "-" for unknown.
std::string format_change(double pct);

// Runs of one config repeated with other seeds (NAME, NAME_repeat, NAME_repeat2, ...): mean and
// sample standard deviation of the summary numbers over the repeats that have them.
struct RepeatGroup {
  std::string name;  // the first run's name
  std::vector<std::string> runs;
  struct Stat {
    double mean = kUnknown, sd = kUnknown;
    int64_t n = 0;
  };
  Stat last_loss, last_val_loss, best_val_loss, last_val_bpb, tail_tok_sec;
};
// Groups with more than one run, in the order of their first run.
std::vector<RepeatGroup> repeat_groups(const std::vector<RunSummary>& rows);
// "4.512 ± 0.031 (n=3)", "-" when no repeat has the number.
std::string format_stat(const RepeatGroup::Stat& s, int decimals);

// The summary table's header and one row's cells, shared by markdown and CSV.
std::vector<std::string> summary_columns(int64_t tail, const std::string& baseline);
// exact: numbers as the shortest text that reads back to the same double (the CSV), instead of
// the table's fixed decimals.
std::vector<std::string> summary_cells(const RunSummary& s, bool with_baseline, bool exact = false);
// Whether the run recorded any routing statistic (MaxVio, entropy, z-loss, bias range, loads).
bool has_routing(const RunSummary& s);
// The routing table's header and one row's cells (markdown: fixed decimals; CSV: exact), and the
// per-layer MaxVio cell ("0.120 0.305 ...", one value per MoE layer; "-" when not recorded).
std::vector<std::string> routing_columns(int64_t tail);
std::vector<std::string> routing_cells(const RunSummary& s, bool exact = false);
std::string format_layers(const std::vector<double>& v, int decimals, bool exact = false);
// The shortest round-trip text of v ("-" for unknown).
std::string format_exact(double v);

}  // namespace moelab::lab
