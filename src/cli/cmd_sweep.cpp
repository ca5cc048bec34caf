// `moelab sweep`: placeholder registration until its area lands.
#include "cli/commands.hpp"
#include "core/error.hpp"

namespace moelab::cli {
void add_sweep_command(CLI::App& app) {
  auto* cmd = app.add_subcommand("sweep", "(not available in this build)");
  cmd->callback([] { throw Error("moelab sweep is not available in this build"); });
}
}  // namespace moelab::cli
