// The bodies of the lab's fuzz targets, shared by the libFuzzer binaries (fuzz_*.cpp, built
// with MOELAB_FUZZ) and by the corpus replay test in test_fuzz_corpus.cpp, so every corpus file
// is also checked in plain CI builds. Each body feeds bytes to a reader, then through the
// summary and its formatting, and aborts when an invariant breaks: step numbers must increase,
// and no printed cell may hold "nan", "inf" or a line break.
#pragma once
#include <cstdint>
#include <cstdlib>
#include <string>
#include <string_view>

#include "lab/experiment_reader.hpp"
#include "lab/metrics_reader.hpp"
#include "lab/nanochat_log_reader.hpp"
#include "lab/report.hpp"
#include "lab/run_summary.hpp"

namespace moelab::lab::fuzz {

inline void require(bool ok) {
  if (!ok) std::abort();
}

inline void check_record(const RunRecord& rec) {
  for (size_t i = 1; i < rec.steps.size(); ++i) require(rec.steps[i].step > rec.steps[i - 1].step);
  require(rec.problems.size() <= 13);
  RunSummary s = summarize_run(rec, 50);
  std::vector<RunSummary> rows{s};
  compare_with_baseline(rows, rec.name);
  const auto cells = summary_cells(rows[0], true);
  for (size_t i = 0; i < cells.size(); ++i) {
    const std::string& cell = cells[i];
    // Unknown values never print as nan or inf; only a diverged run's last loss says "nan".
    const bool diverged_loss = s.diverged && i == 4;
    require(diverged_loss ? cell == "nan" : cell.find("nan") == std::string::npos && cell.find("inf") == std::string::npos);
    require(cell.find('\n') == std::string::npos);
  }
  std::string csv = summary_csv(rows, 50, rec.name);
  require(!csv.empty() && csv.back() == '\n');
  require(rec.error.find('\n') == std::string::npos);
}

// A record named "fuzz" that parse(text, record) fills, held to check_record's invariants.
template <class Parse>
void check_parsed(std::string_view text, Parse parse) {
  RunRecord rec;
  rec.name = "fuzz";
  parse(text, rec);
  check_record(rec);
}

inline int metrics_input(const uint8_t* data, size_t size) {
  std::string_view text(reinterpret_cast<const char*>(data), size);
  check_parsed(text, [](std::string_view t, RunRecord& r) { parse_metrics_jsonl(t, r); });
  check_parsed(text, [](std::string_view t, RunRecord& r) { parse_status_json(t, r); });
  return 0;
}

inline int nanochat_input(const uint8_t* data, size_t size) {
  std::string_view text(reinterpret_cast<const char*>(data), size);
  check_parsed(text, [](std::string_view t, RunRecord& r) { parse_nanochat_log(t, r); });
  require(last_error_line(text).find('\n') == std::string::npos);
  return 0;
}

}  // namespace moelab::lab::fuzz
