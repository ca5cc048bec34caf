// The report's markdown. The first sections keep the seed report's shape (title, Generated at,
// Experiment dir, Run Summary with its columns, a failure list, Artifacts) so old and new
// reports read alike; the MoE, config and input sections appear only when they have content.
#include <algorithm>
#include <map>
#include <set>
#include <sstream>

#include "lab/file_io.hpp"
#include "lab/report.hpp"
#include "lab/run_naming.hpp"

namespace moelab::lab {
namespace {

// Text safe inside a table cell or a code span.
std::string md_cell(std::string s) {
  std::string out;
  for (char c : s) {
    if (c == '|') out += "\\|";
    else if (c == '\n' || c == '\r') out += ' ';
    else out += c;
  }
  return out;
}
std::string md_code(std::string s) {
  std::replace(s.begin(), s.end(), '`', '\'');
  std::replace(s.begin(), s.end(), '\n', ' ');
  std::replace(s.begin(), s.end(), '\r', ' ');
  return "`" + s + "`";
}

void table(std::ostringstream& os, const std::vector<std::string>& cols, const std::vector<bool>& numeric,
           const std::vector<std::vector<std::string>>& rows) {
  os << '|';
  for (const auto& c : cols) os << ' ' << md_cell(c) << " |";
  os << "\n|";
  for (size_t i = 0; i < cols.size(); ++i) os << (i < numeric.size() && numeric[i] ? " ---: |" : " --- |");
  os << '\n';
  for (const auto& r : rows) {
    os << '|';
    for (const auto& c : r) os << ' ' << md_cell(c) << " |";
    os << '\n';
  }
}

std::string attempt_label(const RunRecord& r) {
  std::string label = r.attempt_kind.empty() ? "retry" : r.attempt_kind;
  if (!r.changes.empty()) {
    std::string sets;
    for (const auto& [k, v] : r.changes) sets += (sets.empty() ? "" : ", ") + k + "=" + v;
    label += " (" + sets + ")";
  }
  return label;
}

void failures_section(std::ostringstream& os, const Experiment& ex) {
  os << "## Failures and Retries\n\n";
  bool any = false;
  for (const auto& r : ex.runs) {
    if (r.state != RunState::failed) continue;
    any = true;
    os << "- " << md_code(r.name) << " failed with: " << (r.error.empty() ? "(no error line recorded)" : md_code(r.error))
       << '\n';
    std::string origin = r.origin.empty() ? origin_of(r.name) : r.origin;
    for (const auto& other : ex.runs) {
      if (&other == &r) continue;
      std::string o = other.origin.empty() ? origin_of(other.name) : other.origin;
      if (o != origin) continue;
      os << "  - " << attempt_label(other) << ' ' << md_code(other.name) << " status: " << md_code(state_name(other.state))
         << '\n';
    }
  }
  if (!any) os << "No failed runs.\n";
  os << '\n';
}

// The seed report's "Dynamic Compile Status": each run whose name says dynamic, with its error
// when it failed, else its state.
void dynamic_section(std::ostringstream& os, const Experiment& ex) {
  std::vector<const RunRecord*> dynamic;
  for (const auto& r : ex.runs)
    if (r.name.find("dynamic") != std::string::npos) dynamic.push_back(&r);
  if (dynamic.empty()) return;
  os << "## Dynamic Compile Status\n\n";
  for (const auto* r : dynamic) {
    if (r->state == RunState::failed)
      os << "- " << md_code(r->name) << " failed with: " << (r->error.empty() ? "(no error line recorded)" : md_code(r->error))
         << '\n';
    else
      os << "- " << md_code(r->name) << " status: " << md_code(state_name(r->state)) << '\n';
  }
  os << '\n';
}

// The figure file of `suffix` among the figures ("" when it was not drawn).
std::string figure_named(const std::vector<std::string>& figures, const std::string& suffix) {
  for (const auto& f : figures)
    if (f.find("_experts_") == std::string::npos && f.size() >= suffix.size() && f.compare(f.size() - suffix.size(), suffix.size(), suffix) == 0) return f;
  return "";
}

void moe_section(std::ostringstream& os, const std::vector<RunSummary>& rows, const ReportOptions& opt,
                 const std::vector<std::string>& figures) {
  bool any = false;
  for (const auto& r : rows) any = any || has_routing(r);
  if (!any) return;  // no run routes (dense runs record a drop rate of 0) or none recorded it
  // Every run of the sweep, so the rows line up with the Run Summary; a run that did not record
  // a statistic (an older run, a dense run) shows "-".
  std::vector<std::vector<std::string>> cells;
  size_t layers = 0;
  for (const auto& r : rows) {
    std::string heat = "-", file_name = r.name;
    std::replace(file_name.begin(), file_name.end(), '/', '_');
    for (const auto& f : figures)
      if (f.find("_experts_" + file_name + ".png") != std::string::npos) heat = "[png](" + f + ")";
    auto row = routing_cells(r);
    row.push_back(heat);
    cells.push_back(std::move(row));
    layers = std::max(layers, r.final_max_vio_layers.size());
  }
  os << "## MoE Routing\n\n";
  os << "Drop rate: share of (token, expert) assignments dropped by capacity dispatch (0 when dropless). "
        "Load imbalance: busiest expert's load over the mean, worst layer (1.00 = balanced). "
        "MaxVio: max load / mean load - 1 over the step's tokens (0 = balanced), worst MoE layer of each step. "
        "Router entropy: mean over tokens of -sum p ln p of the router's distribution, mean over MoE layers "
        "(ln(experts) = uniform routing, 0 = one expert per token). z-loss: mean logsumexp(router logits)^2. "
        "Bias range: max - min of the aux_free routing bias, widest layer. "
        "final: the last step that recorded it; mean: over every step that did; `-`: not recorded. "
        "See docs/ROUTING.md.\n\n";
  auto cols = routing_columns(opt.tail);
  cols.push_back("expert_load");
  std::vector<bool> numeric(cols.size(), true);
  numeric.front() = numeric.back() = false;
  table(os, cols, numeric, cells);
  os << '\n';
  if (layers > 0) {
    os << "MaxVio per MoE layer (final / mean; layers in model order, dense layers left out):\n\n";
    std::vector<std::string> lcols = {"run"};
    for (size_t l = 0; l < layers; ++l) lcols.push_back("moe layer " + std::to_string(l));
    std::vector<std::vector<std::string>> lcells;
    for (const auto& r : rows) {
      if (r.final_max_vio_layers.empty()) continue;
      std::vector<std::string> row = {r.name};
      for (size_t l = 0; l < layers; ++l) {
        bool have = l < r.final_max_vio_layers.size();
        row.push_back(have ? format_number(r.final_max_vio_layers[l], 3) + " / " + format_number(r.mean_max_vio_layers[l], 3)
                           : "-");
      }
      lcells.push_back(std::move(row));
    }
    std::vector<bool> lnum(lcols.size(), true);
    lnum[0] = false;
    table(os, lcols, lnum, lcells);
    os << '\n';
  }
  std::string fig = figure_named(figures, "_maxvio.png");
  if (!fig.empty())
    os << "![MaxVio over training steps, one line per run: the worst MoE layer at each step](" << fig << ")\n\n"
       << "*MaxVio over steps, one line per run; each point is the worst MoE layer of that step.*\n\n";
}

void config_section(std::ostringstream& os, const Experiment& ex) {
  std::vector<const RunRecord*> with;
  for (const auto& r : ex.runs)
    if (!r.config.empty() || !r.overrides.empty()) with.push_back(&r);
  if (with.size() < 2) return;
  std::vector<std::map<std::string, std::string>> maps;
  std::vector<std::string> keys;
  std::set<std::string> seen;
  for (const auto* r : with) {
    std::map<std::string, std::string> m(r->config.begin(), r->config.end());
    for (const auto& [k, v] : r->overrides) m[k] = v;  // a run without config.toml still shows its overrides
    for (const auto& [k, v] : m)
      if (seen.insert(k).second) keys.push_back(k);
    maps.push_back(std::move(m));
  }
  std::vector<std::string> differing;
  for (const auto& k : keys) {
    std::set<std::string> values;
    for (const auto& m : maps) {
      auto it = m.find(k);
      values.insert(it == m.end() ? "\x01" : it->second);
    }
    if (values.size() > 1) differing.push_back(k);
  }
  os << "## Config Differences\n\n";
  if (differing.empty()) {
    os << "All runs share the same config.\n\n";
    return;
  }
  std::sort(differing.begin(), differing.end());
  std::vector<std::string> cols = {"run"};
  cols.insert(cols.end(), differing.begin(), differing.end());
  std::vector<std::vector<std::string>> cells;
  for (size_t i = 0; i < with.size(); ++i) {
    std::vector<std::string> row = {with[i]->name};
    for (const auto& k : differing) {
      auto it = maps[i].find(k);
      row.push_back(it == maps[i].end() ? "-" : it->second);
    }
    cells.push_back(std::move(row));
  }
  table(os, cols, {}, cells);
  os << '\n';
}

// Configs run with several seeds: the spread tells whether a difference between configs is real.
void repeats_section(std::ostringstream& os, const std::vector<RunSummary>& rows, const ReportOptions& opt) {
  auto groups = repeat_groups(rows);
  if (groups.empty()) return;
  os << "## Repeats\n\n";
  os << "Runs of one config with other seeds (`train.seed` + repeat index): mean ± sample standard deviation over "
        "the repeats that have the number.\n\n";
  std::vector<std::vector<std::string>> cells;
  for (const auto& g : groups) {
    std::string runs;
    for (const auto& r : g.runs) runs += (runs.empty() ? "" : ", ") + r;
    cells.push_back({g.name, runs, format_stat(g.last_loss, 4), format_stat(g.last_val_loss, 4),
                     format_stat(g.best_val_loss, 4), format_stat(g.last_val_bpb, 4), format_stat(g.tail_tok_sec, 0)});
  }
  table(os, {"config", "runs", "last_loss", "last_val_loss", "best_val_loss", "last_val_bpb", "tail" + std::to_string(opt.tail) + "_tok/sec"},
        {false, false, true, true, true, true, true}, cells);
  os << '\n';
}

void problems_section(std::ostringstream& os, const Experiment& ex) {
  bool any = !ex.problems.empty();
  for (const auto& r : ex.runs) any = any || !r.problems.empty();
  if (!any) return;
  os << "## Unreadable Inputs\n\n";
  for (const auto& p : ex.problems) os << "- " << md_cell(p) << '\n';
  for (const auto& r : ex.runs)
    for (const auto& p : r.problems) os << "- " << md_code(r.name) << ": " << md_cell(p) << '\n';
  os << '\n';
}

}  // namespace

std::string render_markdown(const Experiment& ex, const std::vector<RunSummary>& rows, const ReportOptions& opt,
                            const std::vector<std::string>& artifacts, const std::vector<std::string>& figures,
                            const std::string& figures_note) {
  std::ostringstream os;
  std::string baseline = opt.baseline.empty() ? ex.baseline : opt.baseline;
  os << "# " << ex.title << "\n\n";
  os << "Generated at: " << local_time_text() << "\n\n";
  os << "Experiment dir: " << md_code(ex.dir.string()) << "\n\n";

  os << "## Run Summary\n\n";
  if (rows.empty()) os << "No runs found (no run folders and no *.log files).\n\n";
  auto cols = summary_columns(opt.tail, baseline);
  std::vector<bool> numeric(cols.size(), true);
  numeric[0] = numeric[1] = false;
  std::vector<std::vector<std::string>> cells;
  for (const auto& r : rows) cells.push_back(summary_cells(r, !baseline.empty()));
  if (!rows.empty()) {
    table(os, cols, numeric, cells);
    os << "\ntail" << opt.tail << ": mean over the last " << opt.tail << " observed steps; `-`: unknown.";
    os << " val: validation loss and bits per byte, last and lowest.";
    if (!baseline.empty())
      os << " *_vs_" << baseline << ": change of the last validation loss, bpb and the tail tokens/s against run "
         << md_code(baseline) << '.';
    os << "\n\n";
  }

  repeats_section(os, rows, opt);
  failures_section(os, ex);
  dynamic_section(os, ex);
  moe_section(os, rows, opt, figures);
  config_section(os, ex);
  problems_section(os, ex);

  if (!figures.empty()) {
    os << "## Figures\n\n";
    for (const auto& f : figures)
      // Heatmaps are linked from the MoE table and the MaxVio figure is shown there.
      if (f.find("_experts_") == std::string::npos && !f.ends_with("_maxvio.png")) os << "![" << f << "](" << f << ")\n\n";
  }
  os << "## Artifacts\n\n";
  for (const auto& a : artifacts) os << "- " << md_code(a) << '\n';
  if (!figures_note.empty()) os << "- figures skipped: " << figures_note << '\n';
  return os.str();
}

}  // namespace moelab::lab
