// Each subcommand of the `moelab` CLI registers itself from its own file (cmd_<name>.cpp), so
// the CLI's layout mirrors the areas of src/.
#pragma once
#include <CLI/CLI.hpp>

namespace moelab::cli {

void add_train_command(CLI::App& app);      // cmd_train.cpp
void add_tokenizer_command(CLI::App& app);  // cmd_tokenizer.cpp
void add_data_command(CLI::App& app);       // cmd_data.cpp
void add_sweep_command(CLI::App& app);      // cmd_sweep.cpp
void add_report_command(CLI::App& app);     // cmd_report.cpp

}  // namespace moelab::cli
