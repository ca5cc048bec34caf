// `moelab train --config FILE --out RUN_DIR [--set section.key=value ...]`
#include <unistd.h>

#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <iostream>
#include <thread>

#include "cli/commands.hpp"
#include "comm/communicator.hpp"
#include "comm/rank_launcher.hpp"
#include "core/error.hpp"
#include "config/config.hpp"
#include "train/run_files.hpp"
#include "train/trainer.hpp"

namespace moelab::cli {

namespace {

// --nproc N: this command again as N ranks on this host, under mpiexec (as torchrun
// --nproc_per_node does for PyTorch): the ranks read their place from mpiexec's environment, and
// mpiexec takes the job down when one of them fails. This process stays the job's parent, so a
// failed job's run is marked failed with the rank that failed first named (rank_launcher.hpp).
void train_as_ranks(int nproc, int argc, char** argv, const std::string& run_dir) {
  if (!built_with_mpi())
    throw Error("--nproc " + std::to_string(nproc) + " needs MPI: install libopenmpi-dev and openmpi-bin "
                "(scripts/install-deps.sh does) and build again");
  // This binary by its real path, and this command's arguments without --nproc.
  char self[4096];
  const ssize_t len = readlink("/proc/self/exe", self, sizeof(self) - 1);
  if (len <= 0) throw Error("--nproc: cannot find this program's path (/proc/self/exe)");
  self[len] = '\0';
  std::vector<std::string> rank_argv = {self};
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--nproc") {
      ++i;  // and its value
      continue;
    }
    if (a.rfind("--nproc=", 0) == 0) continue;
    rank_argv.push_back(a);
  }
  // More ranks than cores is allowed (mpiexec --oversubscribe) but each rank then runs far slower
  // than alone: say so before they start.
  if (const unsigned cores = std::thread::hardware_concurrency(); cores > 0 && unsigned(nproc) > cores)
    std::cerr << "moelab: warning: --nproc " << nproc << " starts " << nproc << " ranks on " << cores
              << " cores: oversubscribed, the ranks share the cores and each step takes longer; use --nproc " << cores
              << " or fewer for speed" << std::endl;
  const RankJobResult job = run_rank_job(nproc, rank_argv);
  if (job.exit_code == 0) return;
  if (job.interrupted) throw CLI::RuntimeError(130);  // stopped by the user: rank 0 recorded it
  const std::string cause = !job.failure.empty()
                                ? job.failure
                                : "the job of " + std::to_string(nproc) + " ranks failed (mpiexec exit status " +
                                      std::to_string(job.exit_code) + ")";
  mark_run_failed(run_dir, cause);
  throw Error(cause + " (run folder " + run_dir + ")");
}

}  // namespace

void add_train_command(CLI::App& app, int argc, char** argv) {
  struct Args {
    std::string config, out;
    std::vector<std::string> sets;
    bool help_config = false, force = false;
    int nproc = 1;
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
  cmd->add_option("--nproc", args->nproc,
                  "train data parallel on N CPU ranks of this host (started under mpiexec; rank 0 writes the run "
                  "folder; a rank that dies fails the run, named). parallel.expert = N also splits the experts over "
                  "them. A launcher's own ranks (mpirun, torchrun, Slurm) are honoured without it")
      ->check(CLI::Range(1, 4096));
  cmd->footer(
      "Examples:\n"
      "  moelab train --config configs/tiny-cpu.toml --out runs/tiny\n"
      "  moelab train --config configs/tiny-cpu.toml --out runs/cap --set moe.dispatch=capacity --set train.steps=20\n"
      "  moelab train --config configs/tiny-cpu.toml --out runs/tiny --set train.resume=auto   (continue a run)\n"
      "  moelab train --config configs/tiny-cpu.toml --out runs/dp --nproc 2   (two data-parallel CPU ranks)\n"
      "  moelab train --config configs/tiny-cpu.toml --out runs/ep --nproc 2 --set parallel.expert=2 --set train.save_final=false\n"
      "      (the experts split over the two ranks)");
  cmd->callback([args, argc, argv] {
    if (args->help_config) {
      std::cout << "Config keys (TOML sections [model], [moe], [train], [optim], [data], [fp8]; top-level device, precision, exec):\n"
                << config_reference();
      return;
    }
    if (args->config.empty()) throw UsageError("moelab train needs --config FILE (e.g. configs/tiny-cpu.toml)");
    if (args->out.empty()) throw UsageError("moelab train needs --out RUN_DIR, the folder the run writes into");
    Config cfg = load_config(args->config);
    for (auto& s : args->sets) apply_override(cfg, s);
    validate_config(cfg);  // before the run folder exists: a bad config leaves nothing behind
    if (args->nproc > 1 && launch_env().world == 1) return train_as_ranks(args->nproc, argc, argv, args->out);
    TrainOptions options;
    options.force = args->force;
    run_training(cfg, args->out, options);
  });
}

}  // namespace moelab::cli
