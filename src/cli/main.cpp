// moelab: train MoE GPTs (CPU reference or CUDA, BF16/FP8) and run and report ablations of them.
#include <cstdio>
#include <exception>

#include "cli/commands.hpp"
#include "core/error.hpp"

int main(int argc, char** argv) {
  CLI::App app{
      "moelab: train Mixture-of-Experts GPTs in the nanochat style and compare variants.\n"
      "Quick start: moelab sweep configs/sweep-cpu.toml   (CPU ablation + report)\n"
      "             moelab train --config configs/tiny-cpu.toml --out runs/tiny",
      "moelab"};
  app.require_subcommand(1);
  app.set_version_flag("--version", "moelab 0.1.0");
  moelab::cli::add_train_command(app);
  moelab::cli::add_tokenizer_command(app);
  moelab::cli::add_data_command(app);
  moelab::cli::add_sweep_command(app);
  moelab::cli::add_report_command(app);
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return app.exit(e);
  } catch (const moelab::Error& e) {
    std::fprintf(stderr, "moelab: error: %s\n", e.what());
    return 1;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "moelab: error: %s\n", e.what());
    return 1;
  }
  return 0;
}
