// The report's CSV files: every observed step of every run, every validation, and the summary table.
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
}  // namespace

std::string steps_csv(const Experiment& ex) {
  std::ostringstream os;
  os << "run,step,loss,bal,dt_ms,tok_sec,mfu\n";
  for (const auto& run : ex.runs)
    for (const auto& s : run.steps)
      os << csv_field(run.name) << ',' << s.step << ',' << cell(s.loss, 6) << ',' << cell(s.bal, 6) << ','
         << cell(s.dt_ms, 2) << ',' << cell(s.tok_sec, 0) << ',' << cell(s.mfu, 2) << '\n';
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
  auto cols = summary_columns(tail, baseline);
  cols.push_back("error");
  for (size_t i = 0; i < cols.size(); ++i) os << (i ? "," : "") << csv_field(cols[i]);
  os << '\n';
  for (const auto& r : rows) {
    auto cells = summary_cells(r, !baseline.empty(), /*exact=*/true);
    cells.push_back(r.error);
    for (size_t i = 0; i < cells.size(); ++i) os << (i ? "," : "") << csv_field(cells[i] == "-" ? "" : cells[i]);
    os << '\n';
  }
  return os.str();
}

}  // namespace moelab::lab
