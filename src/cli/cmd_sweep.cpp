// `moelab sweep FILE [--out EXP_DIR]`: run a sweep file's training runs and keep its report
// current. Ctrl-C stops the children (their whole process groups), marks them failed as
// interrupted, writes the report and exits 130; running the same command again resumes.
#include <csignal>
#include <sstream>

#include "cli/commands.hpp"
#include "core/error.hpp"
#include "lab/sweep_runner.hpp"

namespace moelab::cli {
namespace {

std::atomic<bool> g_interrupt{false};
extern "C" void on_interrupt(int) { g_interrupt.store(true); }

// The newest runs/*_<name> folder, for --resume.
std::filesystem::path latest_experiment(const std::string& name) {
  std::filesystem::path best;
  std::error_code ec;
  for (std::filesystem::directory_iterator it("runs", ec), end; !ec && it != end; it.increment(ec)) {
    std::string f = it->path().filename().string();
    if (it->is_directory() && f.size() > name.size() + 1 && f.compare(f.size() - name.size() - 1, std::string::npos, "_" + name) == 0 &&
        (best.empty() || f > best.filename().string()))
      best = it->path();
  }
  return best;
}

}  // namespace

void add_sweep_command(CLI::App& app) {
  auto* cmd = app.add_subcommand("sweep", "Run a sweep file's training runs (queue, retries) and write its report");
  struct Args {
    std::string file, out, train_cmd;
    int workers = 0;
    int64_t tail = 50;
    double progress = 5, grace = 10;
    bool resume = false, no_report = false;
  };
  auto args = std::make_shared<Args>();
  cmd->add_option("file", args->file, "sweep file (TOML); see configs/sweep-cpu.toml")->required();
  cmd->add_option("--out", args->out, "experiment folder (default runs/YYYYMMDD_HHMMSS_<name>); reusing one skips completed runs");
  cmd->add_flag("--resume", args->resume, "continue the newest runs/*_<name> folder of this sweep");
  cmd->add_option("--workers", args->workers, "parallel CPU runs (replaces the sweep file's workers)")->check(CLI::PositiveNumber);
  cmd->add_option("--tail", args->tail, "report: tail length for means")->check(CLI::PositiveNumber);
  cmd->add_option("--progress", args->progress, "seconds between progress lines");
  cmd->add_option("--grace", args->grace, "seconds between SIGTERM and SIGKILL when stopping a run");
  cmd->add_flag("--no-report", args->no_report, "do not write the report");
  cmd->add_option("--train-cmd", args->train_cmd, "program run for each training run instead of `moelab train` (for tests)")
      ->group("");
  cmd->callback([args] {
    lab::SweepSpec spec = lab::load_sweep(args->file);
    lab::SweepOptions opt;
    opt.out_dir = args->out;
    if (args->resume && opt.out_dir.empty()) {
      opt.out_dir = latest_experiment(spec.name);
      if (opt.out_dir.empty()) throw Error("--resume: no runs/*_" + spec.name + " folder to continue; run without --resume");
    }
    if (!args->train_cmd.empty()) {
      std::istringstream words(args->train_cmd);
      for (std::string w; words >> w;) opt.train_command.push_back(w);
    }
    opt.workers = args->workers;
    opt.tail = args->tail;
    opt.progress_every_s = args->progress;
    opt.grace_s = args->grace;
    opt.report = !args->no_report;
    opt.interrupt = &g_interrupt;
    struct sigaction sa {}, old_int{}, old_term{};
    sa.sa_handler = on_interrupt;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGINT, &sa, &old_int);
    sigaction(SIGTERM, &sa, &old_term);
    lab::SweepOutcome result = lab::run_sweep(spec, opt);
    sigaction(SIGINT, &old_int, nullptr);
    sigaction(SIGTERM, &old_term, nullptr);
    if (result.interrupted) throw CLI::RuntimeError(130);
    if (result.failed > 0 && result.completed == 0 && result.skipped == 0) throw CLI::RuntimeError(1);
  });
}

}  // namespace moelab::cli
