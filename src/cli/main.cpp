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
  // A mistyped command, or subcommand of one that has them (`tokenizer trian`), gets its own
  // message with the nearest name (CLI11 would say only that one is required).
  const CLI::App* parent = &app;
  std::string path = "moelab";
  for (int i = 1; i < argc && argv[i][0] != '-'; ++i) {
    const auto subs = parent->get_subcommands(std::function<bool(const CLI::App*)>());
    if (subs.empty()) break;  // a positional argument of a command, not a command
    std::string word = argv[i], known, close;
    const CLI::App* found = nullptr;
    for (const CLI::App* sub : subs) {
      known += (known.empty() ? "" : ", ") + sub->get_name();
      if (sub->get_name() == word) found = sub;
      if (close.empty() && moelab::cli::edit_distance(word, sub->get_name()) <= 2) close = sub->get_name();
    }
    if (!found) {
      const std::string what = parent == &app ? "command '" + word + "'" : "subcommand '" + word + "' of '" + path + "'";
      std::fprintf(stderr, "moelab: error: unknown %s%s (%s: %s; see %s --help)\n", what.c_str(),
                   close.empty() ? "" : ("; did you mean '" + close + "'?").c_str(),
                   parent == &app ? "commands" : "subcommands", known.c_str(), path.c_str());
      return 2;
    }
    parent = found;
    path += " " + word;
  }
  // Exit codes: 0 success (and --help, --version), 1 a config or run error, 2 a usage error
  // (CLI11's own or a moelab::UsageError), 130 Ctrl-C (moelab::Interrupted, or a sweep's).
  try {
    app.parse(argc, argv);
  } catch (const CLI::RuntimeError& e) {  // a callback's chosen exit code
    return e.get_exit_code();
  } catch (const CLI::ParseError& e) {
    int code = app.exit(e);
    return code == 0 ? 0 : 2;
  } catch (const moelab::UsageError& e) {
    std::fprintf(stderr, "moelab: error: %s (see moelab %s --help)\n", e.what(),
                 app.get_subcommands().empty() ? "" : app.get_subcommands().front()->get_name().c_str());
    return 2;
  } catch (const moelab::Interrupted& e) {
    std::fprintf(stderr, "moelab: error: %s\n", e.what());
    return 130;
  } catch (const moelab::Error& e) {
    std::fprintf(stderr, "moelab: error: %s\n", e.what());
    return 1;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "moelab: error: %s\n", e.what());
    return 1;
  }
  return 0;
}
