// `moelab report`: the progress report of an experiment folder. Writes the markdown (title,
// Generated at, Experiment dir, Run Summary, failures with their retries, MoE routing, config
// differences, unreadable inputs, artifacts), metrics/<name>_steps.csv, _val.csv and _summary.csv
// (and _routing.csv when runs recorded per-layer routing statistics), and
// figures/<name>_{loss,loss_tokens,loss_delta,toksec,mfu,dt_ms,drop_rate,maxvio}.png (those with
// data) plus one expert-load heatmap per MoE run. Metrics and
// figures go beside the markdown file so its relative links work wherever it is written.
#pragma once
#include <filesystem>
#include <string>
#include <vector>

#include "lab/experiment_reader.hpp"
#include "lab/run_summary.hpp"

namespace moelab::lab {

struct ReportOptions {
  std::filesystem::path exp_dir;              // an experiment folder, or one run folder
  std::vector<std::filesystem::path> more_dirs;  // further folders to compare (needs out_md)
  std::filesystem::path out_md;  // "" = EXP_DIR/report.md (never inside a run folder)
  bool require_runs = false;     // throw when no run is found (moelab report); a sweep reports as it goes
  int64_t tail = 50;
  std::string baseline;  // overrides experiment.json's; "" = keep it
  std::string name;      // artifact name; "" = from the experiment
  double smooth = 0;     // EMA weight of the past in the loss figure (0 = raw, 0.9 = strong)
  bool figures = true;
  std::filesystem::path tensorboard;  // "" = none; else the runs' scalars as event files under it
  ReadOptions read;
};

struct ReportResult {
  std::filesystem::path markdown;
  std::vector<std::filesystem::path> artifacts;
  std::string figures_note;  // why figures were skipped, if they were
  std::vector<RunSummary> rows;
};

ReportResult write_report(const ReportOptions& opt);

// The parts, for tests.
std::string csv_field(const std::string& s);
std::string steps_csv(const Experiment& ex);
std::string val_csv(const Experiment& ex);
// metrics/<name>_routing.csv: one row per (run, step, MoE layer) of the per-layer routing
// statistics; written only when some run recorded them (has_layer_routing).
std::string routing_csv(const Experiment& ex);
bool has_layer_routing(const Experiment& ex);
std::string summary_csv(const std::vector<RunSummary>& rows, int64_t tail, const std::string& baseline);
std::string render_markdown(const Experiment& ex, const std::vector<RunSummary>& rows, const ReportOptions& opt,
                            const std::vector<std::string>& artifacts, const std::vector<std::string>& figures,
                            const std::string& figures_note);

}  // namespace moelab::lab
