// moelab: train MoE GPTs (CPU reference or CUDA, BF16/FP8) and run and report ablations of them.
#include <cstdio>
#include <exception>
#include <functional>
#include <string>

#include "cli/commands.hpp"
#include "core/error.hpp"

int main(int argc, char** argv) {
  CLI::App app{
      "moelab: train Mixture-of-Experts GPTs in the nanochat style and compare variants.\n"
      "Quick start: moelab sweep configs/sweep-cpu.toml   (CPU ablation + report)\n"
      "             moelab train --config configs/tiny-cpu.toml --out runs/tiny\n"
      "             moelab sample --run runs/tiny --prompt \"The jury said\"",
      "moelab"};
  app.require_subcommand(1);
  app.set_version_flag("--version", "moelab 0.1.0");
  moelab::cli::add_train_command(app, argc, argv);
  moelab::cli::add_tokenizer_command(app);
  moelab::cli::add_data_command(app);
  moelab::cli::add_sweep_command(app);
  moelab::cli::add_report_command(app);
  moelab::cli::add_sample_command(app);
  // A mistyped command gets its own message (CLI11 would say only that one is required).
  if (argc > 1 && argv[1][0] != '-') {
    std::string word = argv[1], known, close;
    bool found = false;
    const CLI::App& capp = app;
    for (const CLI::App* sub : capp.get_subcommands(std::function<bool(const CLI::App*)>())) {
      known += (known.empty() ? "" : ", ") + sub->get_name();
      found = found || sub->get_name() == word;
      if (close.empty() && moelab::cli::edit_distance(word, sub->get_name()) <= 2) close = sub->get_name();
    }
    if (!found) {
      std::fprintf(stderr, "moelab: error: unknown command '%s'%s (commands: %s; see moelab --help)\n", word.c_str(),
                   close.empty() ? "" : ("; did you mean '" + close + "'?").c_str(), known.c_str());
      return 2;
    }
  }
  // Exit codes: 0 success (and --help, --version), 1 a config or run error, 2 a usage error;
  // `sweep` adds 130 for Ctrl-C.
  try {
    app.parse(argc, argv);
  } catch (const CLI::RuntimeError& e) {  // a callback's chosen exit code
    return e.get_exit_code();
  } catch (const CLI::ParseError& e) {
    int code = app.exit(e);
    return code == 0 ? 0 : 2;
  } catch (const moelab::Error& e) {
    std::fprintf(stderr, "moelab: error: %s\n", e.what());
    return 1;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "moelab: error: %s\n", e.what());
    return 1;
  }
  return 0;
}
