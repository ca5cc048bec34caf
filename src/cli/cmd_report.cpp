// `moelab report`: placeholder registration until its area lands.
#include "cli/commands.hpp"
#include "core/error.hpp"

namespace moelab::cli {
void add_report_command(CLI::App& app) {
  auto* cmd = app.add_subcommand("report", "(not available in this build)");
  cmd->callback([] { throw Error("moelab report is not available in this build"); });
}
}  // namespace moelab::cli
