// What the lab knows about one run, whichever source it came from (a run folder's metrics.jsonl
// and status.json, or a nanochat stdout log). Every number may be unknown (NaN), because a run
// can be read while it is being written, after a crash, or from an older log format.
#pragma once
#include <cmath>
#include <cstdint>
#include <limits>
#include <string>
#include <utility>
#include <vector>

namespace moelab::lab {

inline constexpr double kUnknown = std::numeric_limits<double>::quiet_NaN();
inline bool known(double v) { return std::isfinite(v); }

struct StepRow {
  int64_t step = 0;
  double loss = kUnknown;
  double bal = kUnknown;
  double dt_ms = kUnknown;
  double tok_sec = kUnknown;
  double mfu = kUnknown;  // percent
  double drop_rate = kUnknown;
  double tokens = kUnknown;  // training tokens seen after this step
  std::vector<std::vector<double>> expert_load;  // [layer][expert] fraction of assignments
  // Routing statistics of the step (docs/ROUTING.md), one value per MoE layer in layer order;
  // empty when the run did not record them (older runs, dense runs, bias_range unless aux_free).
  std::vector<double> max_vio;         // max_e load_e / mean_e load_e - 1
  std::vector<double> router_entropy;  // mean over tokens of -sum_e p_e ln p_e
  std::vector<double> bias_range;      // max_e bias_e - min_e bias_e (aux_free balancing)
  double z_loss = kUnknown;            // mean over MoE layers of mean logsumexp(logits)^2
};

// One validation: moelab's "val" event, or a validation line of a log.
struct ValRow {
  int64_t step = -1;  // -1: the log did not say
  double loss = kUnknown;
  double bpb = kUnknown;
};

enum class RunState { queued, running, completed, failed, unknown };
const char* state_name(RunState s);

struct RunRecord {
  std::string name;
  std::string source;  // the folder or log file it was read from
  RunState state = RunState::unknown;
  std::vector<StepRow> steps;
  std::vector<ValRow> vals;
  double min_val_bpb = kUnknown;  // nanochat's "Minimum validation bpb" line
  int64_t planned_steps = -1;
  double peak_mem_mib = kUnknown;
  double total_time_min = kUnknown;
  bool saw_end = false;  // the run printed / recorded its end
  // The first step whose loss the run printed as nan or inf (-1: none). Unknown values are NaN
  // in the rows, so a diverged loss is recorded here rather than lost among missing data.
  int64_t diverged_step = -1;
  std::string error;     // one line: why it failed
  std::vector<std::string> problems;  // what could not be read, for the report
  // From the sweep (sweep.json in the run folder): which planned run this attempt belongs to,
  // what the attempt was, and the overrides it ran with.
  std::string origin;
  std::string attempt_kind;  // "first" | "retry" | "fallback" | "repeat" | ""
  std::vector<std::pair<std::string, std::string>> overrides;
  std::vector<std::pair<std::string, std::string>> changes;  // a fallback's settings
  std::vector<std::pair<std::string, std::string>> config;  // flat resolved config, if any
  double age_s = kUnknown;  // seconds since the newest input file changed
};

}  // namespace moelab::lab
