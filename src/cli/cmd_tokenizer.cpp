// `moelab tokenizer`: placeholder registration until its area lands.
#include "cli/commands.hpp"
#include "core/error.hpp"

namespace moelab::cli {
void add_tokenizer_command(CLI::App& app) {
  auto* cmd = app.add_subcommand("tokenizer", "(not available in this build)");
  cmd->callback([] { throw Error("moelab tokenizer is not available in this build"); });
}
}  // namespace moelab::cli
