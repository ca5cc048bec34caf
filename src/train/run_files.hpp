// Writers for the run folder's files (docs/RUN_FOLDER.md): status.json replaced atomically,
// metrics.jsonl appended and flushed line by line, and nanochat's step line for stdout. The lab
// reads these files while the run writes them, so every write leaves them whole.
#pragma once
#include <cstdint>
#include <fstream>
#include <optional>
#include <string>

#include <nlohmann/json.hpp>

#include "core/atomic_file.hpp"

namespace moelab {


struct RunStatus {
  std::string status = "running";  // running | completed | failed
  int64_t step = 0, steps = 0;
  int64_t ranks = 1;  // processes of the job (data / expert parallel ranks)
  std::string error;
  std::string started_at, device;
  std::optional<double> peak_mem_mib, total_time_min;
};
void write_status(const std::string& run_dir, const RunStatus& s);
// After the writer is gone (a data-parallel job that died under its launcher): marks the run in
// run_dir failed with `cause` first in its error, keeping the rest of status.json. Leaves a
// completed run, a folder without status.json, or one a live writer still holds after 10 s
// alone; returns whether it wrote.
// The step it failed at is the one after the last step metrics.jsonl logged.
bool mark_run_failed(const std::string& run_dir, const std::string& cause);
// The highest step of metrics.jsonl's step records; -1 when there is none.
int64_t last_logged_step(const std::string& run_dir);

class MetricsLog {
 public:
  // Opens run_dir/metrics.jsonl; with keep_before_step >= 0, first drops lines of steps at or
  // after it (a resumed run rewrites what the interrupted one logged past its checkpoint).
  MetricsLog(const std::string& run_dir, int64_t keep_before_step);
  void append(const nlohmann::json& record);

 private:
  std::ofstream out_;
};

struct StepLine {
  int64_t step = 0, steps = 0;
  double loss = 0, bal = 0, lrm = 0, dt_ms = 0, tok_sec = 0, total_time_min = 0;
  std::optional<double> mfu;
  std::optional<double> maxvio;  // the worst MoE layer's MaxVio (absent for a dense model)
};
// "step 00139/00140 (99.29%) | loss: 4.671600 | bal: 0.0102 | maxvio 0.123 | lrm: 0.05 | dt: 537.80ms | ..."
std::string format_step_line(const StepLine& s);

}  // namespace moelab
