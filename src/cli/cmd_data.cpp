// `moelab data`: placeholder registration until its area lands.
#include "cli/commands.hpp"
#include "core/error.hpp"

namespace moelab::cli {
void add_data_command(CLI::App& app) {
  auto* cmd = app.add_subcommand("data", "(not available in this build)");
  cmd->callback([] { throw Error("moelab data is not available in this build"); });
}
}  // namespace moelab::cli
