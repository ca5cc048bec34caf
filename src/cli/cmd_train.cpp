// `moelab train --config FILE --out RUN_DIR [--set section.key=value ...]`
#include <iostream>

#include "cli/commands.hpp"
#include "core/error.hpp"
#include "config/config.hpp"
#include "train/trainer.hpp"

namespace moelab::cli {

void add_train_command(CLI::App& app) {
  struct Args {
    std::string config, out;
    std::vector<std::string> sets;
    bool help_config = false, force = false;
  };
  auto args = std::make_shared<Args>();
  auto* cmd = app.add_subcommand("train", "Train a model; everything lands in the run folder (--out)");
  cmd->add_option("--config", args->config, "TOML config file (see configs/)")->check(CLI::ExistingFile);
  cmd->add_option("--out", args->out, "run folder: config.toml, metrics.jsonl, status.json, checkpoints/");
  cmd->add_option("--set", args->sets, "override a config key, e.g. --set train.steps=20 (repeatable)")
      ->take_all()
      ->allow_extra_args(false);
  cmd->add_flag("--force", args->force,
                "start afresh in a folder that holds a run: its files are moved aside to RUN_DIR.oldK/ first");
  cmd->add_flag("--help-config", args->help_config, "list every config key with its default and meaning");
  cmd->footer(
      "Examples:\n"
      "  moelab train --config configs/tiny-cpu.toml --out runs/tiny\n"
      "  moelab train --config configs/tiny-cpu.toml --out runs/cap --set moe.dispatch=capacity --set train.steps=20\n"
      "  moelab train --config configs/tiny-cpu.toml --out runs/tiny --set train.resume=auto   (continue a run)");
  cmd->callback([args] {
    if (args->help_config) {
      std::cout << "Config keys (TOML sections [model], [moe], [train], [optim], [data], [fp8]; top-level device, precision, exec):\n"
                << config_reference();
      return;
    }
    if (args->config.empty()) throw Error("moelab train needs --config FILE (e.g. configs/tiny-cpu.toml)");
    if (args->out.empty()) throw Error("moelab train needs --out RUN_DIR, the folder the run writes into");
    Config cfg = load_config(args->config);
    for (auto& s : args->sets) apply_override(cfg, s);
    validate_config(cfg);  // before the run folder exists: a bad config leaves nothing behind
    TrainOptions options;
    options.force = args->force;
    run_training(cfg, args->out, options);
  });
}

}  // namespace moelab::cli
