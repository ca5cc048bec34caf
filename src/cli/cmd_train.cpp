// `moelab train`: placeholder until the trainer lands.
#include "cli/commands.hpp"
#include "core/error.hpp"

namespace moelab::cli {
void add_train_command(CLI::App& app) {
  auto* cmd = app.add_subcommand("train", "(not available in this build)");
  cmd->callback([] { throw Error("moelab train is not available in this build"); });
}
}  // namespace moelab::cli
