// The report's CSV files: every observed step of every run, every validation, and the summary table.
#include <algorithm>
#include <sstream>

#include "lab/report.hpp"

namespace moelab::lab {

std::string csv_field(const std::string& s) {
  if (s.find_first_of(",\"\r\n") == std::string::npos) return s;
  std::string q = "\"";
  for (char c : s) {
    if (c == '"') q += '"';
    q += c;
  }
  return q + "\"";
}

namespace {
// CSV cells are empty for unknown values (spreadsheets read them as missing).
std::string cell(double v, int decimals) {
  std::string t = format_number(v, decimals);
  return t == "-" ? "" : t;
}

// Largest and mean of the known values of a per-layer list (unknown when none).
double list_max(const std::vector<double>& v) {
  double w = kUnknown;
  for (double x : v)
    if (known(x)) w = known(w) ? std::max(w, x) : x;
  return w;
}
double list_mean(const std::vector<double>& v) {
  double sum = 0;
  int n = 0;
  for (double x : v)
    if (known(x)) {
      sum += x;
      ++n;
    }
  return n ? sum / n : kUnknown;
}
// Exact text for the routing columns, empty for unknown.
std::string exact_cell(double v) { return known(v) ? format_exact(v) : ""; }
}  // namespace

std::string steps_csv(const Experiment& ex) {
  std::ostringstream os;
  // The routing columns come last, so readers of the older columns by position keep working:
  // max_vio is the worst MoE layer, router_entropy the mean over layers, bias_range the widest.
  os << "run,step,loss,bal,dt_ms,tok_sec,mfu,drop_rate,max_vio,router_entropy,z_loss,bias_range\n";
  for (const auto& run : ex.runs)
    for (const auto& s : run.steps)
      os << csv_field(run.name) << ',' << s.step << ',' << cell(s.loss, 6) << ',' << cell(s.bal, 6) << ','
         << cell(s.dt_ms, 2) << ',' << cell(s.tok_sec, 0) << ',' << cell(s.mfu, 2) << ',' << exact_cell(s.drop_rate) << ','
         << exact_cell(list_max(s.max_vio)) << ',' << exact_cell(list_mean(s.router_entropy)) << ','
         << exact_cell(s.z_loss) << ',' << exact_cell(list_max(s.bias_range)) << '\n';
  return os.str();
}

bool has_layer_routing(const Experiment& ex) {
  for (const auto& run : ex.runs)
    for (const auto& s : run.steps)
      if (!s.max_vio.empty() || !s.router_entropy.empty() || !s.bias_range.empty()) return true;
  return false;
}

std::string routing_csv(const Experiment& ex) {
  std::ostringstream os;
  os << "run,step,moe_layer,max_vio,router_entropy,bias_range\n";
  for (const auto& run : ex.runs)
    for (const auto& s : run.steps) {
      size_t layers = std::max({s.max_vio.size(), s.router_entropy.size(), s.bias_range.size()});
      auto at = [](const std::vector<double>& v, size_t l) { return l < v.size() ? exact_cell(v[l]) : std::string(); };
      for (size_t l = 0; l < layers; ++l)
        os << csv_field(run.name) << ',' << s.step << ',' << l << ',' << at(s.max_vio, l) << ','
           << at(s.router_entropy, l) << ',' << at(s.bias_range, l) << '\n';
    }
  return os.str();
}

std::string val_csv(const Experiment& ex) {
  std::ostringstream os;
  os << "run,step,val_loss,val_bpb\n";
  for (const auto& run : ex.runs)
    for (const auto& v : run.vals)
      os << csv_field(run.name) << ',' << (v.step >= 0 ? std::to_string(v.step) : "") << ',' << cell(v.loss, 6) << ','
         << cell(v.bpb, 6) << '\n';
  return os.str();
}

std::string summary_csv(const std::vector<RunSummary>& rows, int64_t tail, const std::string& baseline) {
  std::ostringstream os;
  // The table's columns with unrounded numbers, then the error line of a failed run.
  // Then the routing table's columns (its run column left out) and the per-layer MaxVio, one
  // space-separated value per MoE layer: after the error column, so older columns keep their place.
  auto cols = summary_columns(tail, baseline);
  cols.push_back("error");
  auto rcols = routing_columns(tail);
  cols.insert(cols.end(), rcols.begin() + 1, rcols.end());
  cols.insert(cols.end(), {"max_vio_final_per_layer", "max_vio_mean_per_layer"});
  for (size_t i = 0; i < cols.size(); ++i) os << (i ? "," : "") << csv_field(cols[i]);
  os << '\n';
  for (const auto& r : rows) {
    auto cells = summary_cells(r, !baseline.empty(), /*exact=*/true);
    cells.push_back(r.error);
    auto rcells = routing_cells(r, /*exact=*/true);
    cells.insert(cells.end(), rcells.begin() + 1, rcells.end());
    cells.push_back(format_layers(r.final_max_vio_layers, 0, /*exact=*/true));
    cells.push_back(format_layers(r.mean_max_vio_layers, 0, /*exact=*/true));
    for (size_t i = 0; i < cells.size(); ++i) os << (i ? "," : "") << csv_field(cells[i] == "-" ? "" : cells[i]);
    os << '\n';
  }
  return os.str();
}

}  // namespace moelab::lab
