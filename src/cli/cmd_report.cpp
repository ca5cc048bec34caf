// `moelab report EXP_DIR [DIR...]`: the progress report of an experiment folder (run folders
// and/or nanochat *.log files), or of several compared: markdown, CSVs and PNG figures. It exits
// 1 when it finds no run, and never writes into a run folder. --tensorboard DIR also writes the
// runs' scalars as TensorBoard event files. --watch rewrites it every N seconds
// until Ctrl-C, for following a sweep from another terminal.
#include <atomic>
#include <chrono>
#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <thread>

#include "cli/commands.hpp"
#include "core/error.hpp"
#include "lab/report.hpp"

namespace moelab::cli {
namespace {
std::atomic<bool> g_stop{false};
extern "C" void on_stop(int) { g_stop.store(true); }
}  // namespace

void add_report_command(CLI::App& app) {
  auto* cmd = app.add_subcommand("report", "Write the progress report (markdown, CSVs, figures) of an experiment folder");
  auto opt = std::make_shared<lab::ReportOptions>();
  auto watch = std::make_shared<double>(0);
  auto no_figures = std::make_shared<bool>(false);
  auto exp_dirs = std::make_shared<std::vector<std::string>>();
  auto out_md = std::make_shared<std::string>();
  cmd->add_option("exp_dir", *exp_dirs,
                  "experiment folder (run folders and/or *.log files), or a run folder; several folders are compared "
                  "in one report (needs --out-md)")
      ->required()
      ->check(CLI::ExistingDirectory);
  cmd->add_option("--out-md", *out_md,
                  "markdown file (default EXP_DIR/report.md; required for a run folder or several folders); metrics/ "
                  "and figures/ go beside it");
  // CLI::PositiveNumber would print its range's upper end, a 309-digit double.
  cmd->add_option("--tail", opt->tail, "steps averaged for the tail means (default 50)")
      ->check(CLI::Validator(
          [](std::string& v) {
            char* end = nullptr;
            const long long n = std::strtoll(v.c_str(), &end, 10);
            if (end == v.c_str() || *end != '\0') return std::string();  // not a number: the type check says so
            return n >= 1 ? std::string() : "--tail " + v + " must be at least 1 (steps averaged for the tail means)";
          },
          "STEPS >= 1"));
  cmd->add_option("--watch", *watch, "rewrite the report every SECONDS until Ctrl-C");
  cmd->add_option("--baseline", opt->baseline, "run to compare tokens/s against (default: the sweep's baseline)");
  cmd->add_option("--smooth", opt->smooth, "EMA weight for the loss figure, 0 (raw) to 0.99")->check(CLI::Range(0.0, 0.99));
  cmd->add_option("--name", opt->name, "name used in artifact file names (default: from the experiment)");
  cmd->add_option("--stale", opt->read.stale_s, "seconds without file changes after which a run is no longer running (default 300)");
  cmd->add_flag("--no-figures", *no_figures, "write markdown and CSVs only");
  cmd->add_option("--tensorboard", opt->tensorboard,
                  "also write each run's scalars (from metrics.jsonl or a nanochat log) as TensorBoard event files under "
                  "DIR/<run>/, for runs not trained with train.tensorboard (`tensorboard --logdir DIR`)");
  cmd->callback([=] {
    opt->exp_dir = exp_dirs->front();
    opt->more_dirs.assign(exp_dirs->begin() + 1, exp_dirs->end());
    opt->require_runs = true;  // exit 1, writing nothing, when no run is found
    opt->out_md = *out_md;
    opt->figures = !*no_figures;
    if (*watch > 0) {
      std::signal(SIGINT, on_stop);
      std::signal(SIGTERM, on_stop);
    }
    do {
      lab::ReportResult r = lab::write_report(*opt);
      std::printf("report: %s\n", r.markdown.string().c_str());
      if (!opt->tensorboard.empty()) std::printf("tensorboard: %s\n", opt->tensorboard.string().c_str());
      if (!r.figures_note.empty()) std::printf("figures skipped: %s\n", r.figures_note.c_str());
      std::fflush(stdout);
      for (double waited = 0; *watch > 0 && waited < *watch && !g_stop.load(); waited += 0.2)
        std::this_thread::sleep_for(std::chrono::milliseconds(200));
    } while (*watch > 0 && !g_stop.load());
  });
}

}  // namespace moelab::cli
