// `moelab sweep FILE [--out EXP_DIR]`: run a sweep file's training runs and keep its report
// current. Ctrl-C stops the children (their whole process groups), marks them failed as
// interrupted, writes the report and exits 130; running the same command again resumes. Every
// run's config is checked before the first run starts; the exit code is 1 when any run failed for
// good, 0 only when all completed. --dry-run prints the plan and starts nothing; --only keeps the
// named runs of the file.
#include <csignal>
#include <cstdio>
#include <optional>
#include <sstream>

#include "cli/commands.hpp"
#include "config/config.hpp"
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

// Every run the sweep may start (each planned run, and each with each fallback rule's changes)
// resolved against the base config and validated, before anything is created or started.
// Returns per planned run the keys whose values differ from the base config.
std::vector<std::vector<std::string>> preflight(const lab::SweepSpec& spec) {
  const std::string base = spec.base_config.string();
  if (!std::filesystem::exists(spec.base_config))
    throw Error(spec.file.string() + ": base config " + base + " does not exist (base is relative to the sweep file's folder)");
  Config base_cfg = load_config(base);
  auto base_flat = config_flat(base_cfg);
  std::vector<std::vector<std::string>> diffs;
  std::string errors;
  int bad = 0;
  auto check = [&](const lab::PlannedRun& run, const lab::Overrides& ov, const std::string& what) -> std::optional<Config> {
    try {
      Config c = base_cfg;
      for (const auto& [k, v] : ov) apply_override(c, k + "=" + v);
      validate_config(c);
      return c;
    } catch (const std::exception& e) {
      errors += "\n  run \"" + run.name + "\"" + what + ": " + e.what();
      ++bad;
      return std::nullopt;
    }
  };
  for (const auto& run : spec.runs) {
    std::vector<std::string> diff;
    if (auto c = check(run, run.overrides, "")) {
      auto flat = config_flat(*c);
      for (size_t i = 0; i < flat.size(); ++i)
        if (flat[i].second != base_flat[i].second) diff.push_back(flat[i].first + " = " + flat[i].second);
    }
    for (const auto& rule : spec.on_failure)
      if (!rule.set.empty()) check(run, lab::merge_overrides(run.overrides, rule.set), " (fallback for \"" + rule.match + "\")");
    diffs.push_back(std::move(diff));
  }
  if (bad)
    throw Error(spec.file.string() + ": " + std::to_string(bad) + " run config(s) are invalid, so no run was started:" +
                errors);
  return diffs;
}

}  // namespace

void add_sweep_command(CLI::App& app) {
  auto* cmd = app.add_subcommand("sweep", "Run a sweep file's training runs (queue, retries) and write its report");
  struct Args {
    std::string file, out, train_cmd;
    std::vector<std::string> only;
    int workers = 0;
    int64_t tail = 50;
    double progress = 5, grace = 10;
    bool resume = false, no_report = false, dry_run = false;
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
  cmd->add_option("--only", args->only, "run only these runs of the file (names as --dry-run lists them; comma-separated or repeated)")
      ->delimiter(',');
  cmd->add_flag("--dry-run", args->dry_run, "check every run's config and print each run with what it changes; start nothing");
  cmd->add_option("--train-cmd", args->train_cmd, "program run for each training run instead of `moelab train` (for tests)")
      ->group("");
  cmd->callback([args] {
    lab::SweepSpec spec = lab::load_sweep(args->file);
    std::vector<std::vector<std::string>> diffs;
    if (args->train_cmd.empty())  // the real trainer: repeats get their seeds before any selection
      lab::vary_repeat_seeds(spec, load_config(spec.base_config.string()).train.seed);
    if (!args->only.empty()) lab::select_runs(spec, args->only);
    if (args->train_cmd.empty()) {  // its configs can be checked here
      diffs = preflight(spec);
    }
    if (args->dry_run) {
      std::printf("sweep %s: %zu run(s), base %s\n", spec.name.c_str(), spec.runs.size(), spec.base_config.string().c_str());
      for (size_t i = 0; i < spec.runs.size(); ++i) {
        std::string changes;
        if (i < diffs.size())
          for (const auto& d : diffs[i]) changes += (changes.empty() ? "" : ", ") + d;
        else
          for (const auto& [k, v] : spec.runs[i].overrides) changes += (changes.empty() ? "" : ", ") + k + " = " + v;
        std::printf("  run %zu/%zu %s: %s\n", i + 1, spec.runs.size(), spec.runs[i].name.c_str(),
                    changes.empty() ? "(the base config)" : changes.c_str());
      }
      return;
    }
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
    if (!result.failed_for_good.empty()) throw CLI::RuntimeError(1);  // 0 only when every run completed
  });
}

}  // namespace moelab::cli
