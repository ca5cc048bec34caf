// Each subcommand of the `moelab` CLI registers itself from its own file (cmd_<name>.cpp), so
// the CLI's layout mirrors the areas of src/.
#pragma once
#include <CLI/CLI.hpp>

#include <algorithm>
#include <string>
#include <vector>

namespace moelab::cli {

void add_train_command(CLI::App& app, int argc, char** argv);  // cmd_train.cpp (argv: --nproc relaunches it)
void add_tokenizer_command(CLI::App& app);  // cmd_tokenizer.cpp
void add_data_command(CLI::App& app);       // cmd_data.cpp
void add_sweep_command(CLI::App& app);      // cmd_sweep.cpp
void add_report_command(CLI::App& app);     // cmd_report.cpp
void add_sample_command(CLI::App& app);     // cmd_sample.cpp

// Levenshtein distance, for "did you mean" hints.
inline int edit_distance(const std::string& a, const std::string& b) {
  std::vector<int> row(b.size() + 1);
  for (size_t j = 0; j <= b.size(); ++j) row[j] = int(j);
  for (size_t i = 1; i <= a.size(); ++i) {
    int diag = row[0];
    row[0] = int(i);
    for (size_t j = 1; j <= b.size(); ++j) {
      int up = row[j];
      row[j] = std::min({row[j] + 1, row[j - 1] + 1, diag + (a[i - 1] == b[j - 1] ? 0 : 1)});
      diag = up;
    }
  }
  return row[b.size()];
}

}  // namespace moelab::cli
