// The sweep queue (see sweep_runner.hpp). One thread polls all children: the work is waiting,
// and a single loop keeps every status decision (and every file write) in one place.
#include "lab/sweep_runner.hpp"

#include <algorithm>
#include <cstdio>
#include <ctime>
#include <filesystem>
#include <deque>
#include <iostream>
#include <memory>
#include <optional>
#include <sstream>
#include <thread>

#include <nlohmann/json.hpp>

#include "core/error.hpp"
#include "core/regex.hpp"
#include "core/folder_lock.hpp"
#include "lab/child_process.hpp"
#include "lab/experiment_reader.hpp"
#include "lab/file_io.hpp"
#include "lab/metrics_reader.hpp"
#include "lab/report.hpp"
#include "lab/run_naming.hpp"

namespace moelab::lab {
namespace {

using nlohmann::json;
using Clock = std::chrono::steady_clock;

struct Job {
  size_t index = 0;  // position among the planned runs, for "run i of n"
  PlannedRun planned;
  std::string folder;  // current attempt's folder name
  Overrides overrides;
  Overrides changes;  // what fallbacks changed against the planned run
  std::string kind = "first";  // first | retry | fallback
  int attempts = 0;            // attempts started so far
  std::unique_ptr<ChildProcess> child;
  std::string device;          // GPU index, or "" on CPU
  Clock::time_point started;
  int64_t last_printed_step = -2;
};

std::string minutes(double s) {
  char buf[32];
  if (s < 60) std::snprintf(buf, sizeof buf, "%.0fs", s);
  else std::snprintf(buf, sizeof buf, "%.1fm", s / 60);
  return buf;
}

class Sweep {
 public:
  Sweep(const SweepSpec& spec, const SweepOptions& opt) : spec_(spec), opt_(opt), out_(opt.out ? *opt.out : std::cout) {}

  SweepOutcome run() {
    prepare_folder();
    plan_jobs();
    size_t slots = spec_.gpus.empty() ? size_t(opt_.workers > 0 ? opt_.workers : spec_.workers) : spec_.gpus.size();
    std::vector<std::string> free_devices = spec_.gpus;
    std::vector<std::unique_ptr<Job>> running;
    auto last_progress = Clock::now();
    out_ << "[sweep] " << spec_.name << ": " << spec_.runs.size() << " run(s), " << outcome_.skipped
         << " already completed, " << slots << (spec_.gpus.empty() ? " worker(s)" : " GPU(s)") << "; folder "
         << outcome_.exp_dir.string() << std::endl;

    while (!queue_.empty() || !running.empty()) {
      if (interrupted()) {
        outcome_.interrupted = true;
        for (auto& job : running) {
          ChildExit e = job->child->stop(std::chrono::milliseconds(int64_t(opt_.grace_s * 1000)));
          finish_failed(*job, "interrupted by Ctrl-C (" + describe_exit(e) + ")", e);
          outcome_.failed_for_good.push_back(job->planned.name);
        }
        running.clear();
        break;
      }
      while (!queue_.empty() && running.size() < slots) {
        auto job = std::move(queue_.front());
        queue_.pop_front();
        if (!spec_.gpus.empty()) {
          job->device = free_devices.back();
          free_devices.pop_back();
        }
        if (start(*job)) running.push_back(std::move(job));
        else if (!job->device.empty()) free_devices.push_back(job->device);
      }
      for (size_t i = 0; i < running.size();) {
        Job& job = *running[i];
        std::optional<ChildExit> exit = job.child->poll();
        bool timed_out = false;
        if (!exit && spec_.timeout_s > 0 && job.child->seconds_running() > spec_.timeout_s) {
          exit = job.child->stop(std::chrono::milliseconds(int64_t(opt_.grace_s * 1000)));
          timed_out = true;
        }
        if (!exit) {
          ++i;
          continue;
        }
        if (!job.device.empty()) free_devices.push_back(job.device);
        std::unique_ptr<Job> done = std::move(running[i]);
        running.erase(running.begin() + long(i));
        finish(std::move(done), *exit, timed_out);
        write_report();
      }
      if (opt_.progress_every_s >= 0 && Clock::now() - last_progress > std::chrono::duration<double>(opt_.progress_every_s)) {
        for (auto& job : running) print_progress(*job);
        last_progress = Clock::now();
      }
      std::this_thread::sleep_for(std::chrono::duration<double>(opt_.poll_s));
    }
    write_report();
    out_ << "[sweep] " << (outcome_.interrupted ? "interrupted: " : "done: ") << outcome_.completed << " completed, "
         << outcome_.failed << " failed, " << outcome_.skipped << " skipped (already completed)" << std::endl;
    if (!outcome_.failed_for_good.empty()) {
      out_ << "[sweep] failed for good:";
      for (const auto& n : outcome_.failed_for_good) out_ << " " << n;
      out_ << std::endl;
    }
    if (!outcome_.report.empty()) out_ << "[sweep] report: " << outcome_.report.string() << std::endl;
    return outcome_;
  }

 private:
  bool interrupted() const { return opt_.interrupt && opt_.interrupt->load(); }
  fs::path dir(const std::string& name) const { return outcome_.exp_dir / name; }

  void prepare_folder() {
    outcome_.exp_dir = opt_.out_dir.empty() ? fs::path("runs") / (local_time_text(true) + "_" + spec_.name) : opt_.out_dir;
    std::error_code ec;
    fs::create_directories(outcome_.exp_dir, ec);
    if (ec) throw Error("cannot create experiment folder " + outcome_.exp_dir.string() + ": " + ec.message());
    lock_ = FolderLock::acquire(outcome_.exp_dir, "experiment folder");
    if (!fs::exists(spec_.base_config))
      throw Error(spec_.file.string() + ": base config " + spec_.base_config.string() +
                  " does not exist (base is relative to the sweep file's folder)");
    base_config_ = fs::absolute(spec_.base_config).lexically_normal();
    if (auto text = read_file(spec_.file, 1 << 20)) write_file_atomic(outcome_.exp_dir / "sweep.toml", *text);
    if (opt_.train_command.empty()) {
      command_ = {fs::read_symlink("/proc/self/exe", ec).string(), "train"};
      if (ec) throw Error("cannot find this program's path in /proc/self/exe: " + ec.message());
    } else {
      command_ = opt_.train_command;
    }
    // Keep the order of an earlier sweep into the same folder, then add this one's.
    if (auto meta = read_file(outcome_.exp_dir / "experiment.json", 1 << 20)) {
      json old = json::parse(*meta, nullptr, false);
      if (old.is_object() && old.contains("runs") && old["runs"].is_array())
        for (const auto& r : old["runs"])
          if (r.is_string()) order_.push_back(r);
    }
  }

  // Add a folder to the report's order; `before` places it ahead of another (a failed attempt
  // moved aside is listed just before the attempt that replaced it).
  void remember(const std::string& name, const std::string& before = "") {
    if (std::find(order_.begin(), order_.end(), name) == order_.end()) {
      auto at = std::find(order_.begin(), order_.end(), before);
      order_.insert(before.empty() ? order_.end() : at, name);
    }
    json meta = {{"name", spec_.name},
                 {"title", spec_.title.empty() ? spec_.name + " progress" : spec_.title},
                 {"baseline", spec_.baseline},
                 {"sweep_file", fs::absolute(spec_.file).lexically_normal().string()},
                 {"base_config", base_config_.string()},
                 {"runs", order_}};
    write_file_atomic(outcome_.exp_dir / "experiment.json", meta.dump(2) + "\n");
  }

  // Whether a run folder holds a checkpoint a retry can resume from.
  static bool holds_checkpoint(const fs::path& run) {
    std::error_code ec;
    for (const auto& e : fs::directory_iterator(run / "checkpoints", ec))
      if (e.path().extension() == ".safetensors") return true;
    return false;
  }

  // Next k for which NAME.failK (or NAME_retryK) is free.
  int next_free(const std::string& base, bool fail) const {
    for (int k = 1;; ++k)
      if (!fs::exists(dir(fail ? fail_name(base, k) : retry_name(base, k)))) return k;
  }

  void move_aside(const std::string& name) {
    std::string to = fail_name(name, next_free(name, true));
    std::error_code ec;
    fs::rename(dir(name), dir(to), ec);
    if (ec) throw Error("cannot move " + dir(name).string() + " aside to " + to + ": " + ec.message());
    remember(to, name);
  }

  void write_status(const std::string& name, const std::string& state, const std::string& error) {
    json st = json::object();
    if (auto old = read_file(dir(name) / "status.json", 1 << 20)) {
      json parsed = json::parse(*old, nullptr, false);
      if (parsed.is_object()) st = parsed;
    }
    st["status"] = state;
    st["error"] = error;
    st["updated_at"] = utc_timestamp();
    if (!st.contains("step")) st["step"] = nullptr;
    write_file_atomic(dir(name) / "status.json", st.dump() + "\n");
  }

  void write_sweep_json(const Job& job, const json& extra) {
    json ov = json::object(), ch = json::object();
    for (const auto& [k, v] : job.overrides) ov[k] = v;
    for (const auto& [k, v] : job.changes) ch[k] = v;
    json j = {{"name", job.folder},       {"origin", job.planned.name}, {"attempt_kind", job.kind},
              {"attempt", job.attempts},  {"overrides", ov}, {"changes", ch},            {"command", argv_of(job)},
              {"command_line", shell_join(argv_of(job))}, {"device", job.device.empty() ? "cpu" : "cuda:" + job.device}};
    for (auto it = extra.begin(); it != extra.end(); ++it) j[it.key()] = it.value();
    write_file_atomic(dir(job.folder) / "sweep.json", j.dump(2) + "\n");
  }

  std::vector<std::string> argv_of(const Job& job) const {
    std::vector<std::string> argv = command_;
    argv.insert(argv.end(), {"--config", base_config_.string(), "--out", fs::absolute(dir(job.folder)).string()});
    for (const auto& [k, v] : job.overrides) argv.insert(argv.end(), {"--set", k + "=" + v});
    return argv;
  }

  // Decide for every planned run: skip (completed before), or queue (moving an unfinished
  // earlier attempt aside). Queued runs get their folder now so the report lists them.
  void plan_jobs() {
    for (size_t i = 0; i < spec_.runs.size(); ++i) {
      const PlannedRun& p = spec_.runs[i];
      bool done = false;
      for (int k = 0; k < 1000 && !done; ++k) {
        std::string name = k == 0 ? p.name : retry_name(p.name, k);
        if (!fs::exists(dir(name))) {
          if (k > 0) break;
          continue;
        }
        done = read_run_folder(dir(name)).state == RunState::completed;
      }
      if (done) {
        ++outcome_.skipped;
        continue;
      }
      if (fs::exists(dir(p.name))) {
        wait_for_writer(p.name);
        RunRecord old = read_run_folder(dir(p.name));
        if (old.state != RunState::queued) move_aside(p.name);
      }
      auto job = std::make_unique<Job>();
      job->index = i;
      job->planned = p;
      job->folder = p.name;
      job->overrides = p.overrides;
      queue(*job);
      queue_.push_back(std::move(job));
    }
  }

  // A trainer left from an earlier sweep may still write this folder (one started by hand, or
  // one whose sweep died before it could stop it): wait for its lock, then refuse.
  void wait_for_writer(const std::string& name) {
    auto deadline = Clock::now() + std::chrono::duration<double>(opt_.holder_wait_s);
    bool said = false;
    for (;;) {
      pid_t holder = 0;
      if (FolderLock::try_acquire(dir(name), &holder)) return;  // free (released at once)
      if (Clock::now() >= deadline)
        throw Error("run folder " + dir(name).string() + " is still being written by process " +
                    (holder > 0 ? std::to_string(holder) : std::string("(pid unknown)")) +
                    "; wait for it to finish or stop it (kill " + (holder > 0 ? std::to_string(holder) : "PID") +
                    "), then run the sweep again");
      if (!said) {
        out_ << "[sweep] " << name << ": waiting up to " << minutes(opt_.holder_wait_s) << " for process " << holder
             << ", which still writes it" << std::endl;
        said = true;
      }
      std::this_thread::sleep_for(std::chrono::duration<double>(std::max(opt_.poll_s, 0.05)));
    }
  }

  void queue(Job& job) {
    std::error_code ec;
    fs::create_directories(dir(job.folder), ec);
    if (ec) throw Error("cannot create run folder " + dir(job.folder).string() + ": " + ec.message());
    write_file_atomic(dir(job.folder) / "status.json",
                      json({{"status", "queued"}, {"step", nullptr}, {"error", ""}, {"updated_at", utc_timestamp()}}).dump() + "\n");
    write_sweep_json(job, json::object());
    remember(job.folder);
  }

  bool start(Job& job) {
    ++job.attempts;
    write_sweep_json(job, {{"started_at", utc_timestamp()}});
    std::vector<std::string> env;
    if (!job.device.empty()) env.push_back("CUDA_VISIBLE_DEVICES=" + job.device);
    try {
      job.child = std::make_unique<ChildProcess>(argv_of(job), env, dir(job.folder) / "stdout.log", dir(job.folder) / "stderr.log");
    } catch (const std::exception& e) {
      write_status(job.folder, "failed", e.what());
      ++outcome_.failed;
      outcome_.failed_for_good.push_back(job.planned.name);
      out_ << "[sweep] " << job.folder << ": failed to start: " << e.what() << std::endl;
      return false;
    }
    job.started = Clock::now();
    write_status(job.folder, "running", "");
    out_ << "[sweep] run " << job.index + 1 << "/" << spec_.runs.size() << " " << job.folder << ": started"
         << (job.kind == "first" ? "" : " (" + job.kind + ")") << (job.device.empty() ? "" : " on cuda:" + job.device)
         << std::endl;
    return true;
  }

  void print_progress(Job& job) {
    RunRecord rec;
    if (auto st = read_file(dir(job.folder) / "status.json", 1 << 20)) parse_status_json(*st, rec);
    std::string tail = read_tail(dir(job.folder) / "metrics.jsonl", 256 << 10);
    size_t first_nl = tail.find('\n');
    if (first_nl != std::string::npos && tail.size() == (256u << 10)) tail.erase(0, first_nl + 1);
    parse_metrics_jsonl(tail, rec);
    int64_t step = rec.steps.empty() ? -1 : rec.steps.back().step;
    if (step == job.last_printed_step) return;
    job.last_printed_step = step;
    double elapsed = std::chrono::duration<double>(Clock::now() - job.started).count();
    std::ostringstream line;
    line << "[sweep] run " << job.index + 1 << "/" << spec_.runs.size() << " " << job.folder << ": ";
    if (step < 0) {
      line << "starting (" << minutes(elapsed) << ")";
    } else {
      line << "step " << step << "/" << (rec.planned_steps > 0 ? std::to_string(rec.planned_steps) : "?");
      if (known(rec.steps.back().loss)) line << " loss " << format_number(rec.steps.back().loss, 3);
      if (rec.planned_steps > 0 && step >= 0) {
        double left = elapsed / double(step + 1) * double(rec.planned_steps - step - 1);
        line << " | eta " << minutes(std::max(0.0, left));
      }
    }
    out_ << line.str() << std::endl;
  }

  void finish(std::unique_ptr<Job> job, const ChildExit& exit, bool timed_out) {
    RunRecord rec;
    if (auto st = read_file(dir(job->folder) / "status.json", 1 << 20)) parse_status_json(*st, rec);
    double took = std::chrono::duration<double>(Clock::now() - job->started).count();
    if (!timed_out && !exit.signaled && exit.code == 0 && rec.state != RunState::failed) {
      if (rec.state != RunState::completed) write_status(job->folder, "completed", "");
      write_sweep_json(*job, {{"finished_at", utc_timestamp()}, {"exit", describe_exit(exit)}});
      ++outcome_.completed;
      out_ << "[sweep] run " << job->index + 1 << "/" << spec_.runs.size() << " " << job->folder << ": completed in "
           << minutes(took) << std::endl;
      return;
    }
    std::string reason = timed_out ? "timed out after " + format_number(spec_.timeout_s, 0) + "s" : describe_exit(exit);
    finish_failed(*job, reason, exit);
    std::string name = job->planned.name;
    if (!maybe_retry(std::move(job))) outcome_.failed_for_good.push_back(name);
  }

  // Record a failed attempt: status.json (unless the trainer already wrote its own failure),
  // sweep.json with the exit, and a progress line with the error.
  void finish_failed(Job& job, const std::string& reason, const ChildExit& exit) {
    RunRecord rec;
    if (auto st = read_file(dir(job.folder) / "status.json", 1 << 20)) parse_status_json(*st, rec);
    std::string error_line = last_error_line(read_tail(dir(job.folder) / "stderr.log", 64 << 10));
    std::string error = rec.state == RunState::failed && !rec.error.empty() ? rec.error : error_line;
    std::string full = reason + (error.empty() ? "" : ": " + error);
    // A trainer that exited with a code after recording its own failure said it best; a crash,
    // a kill or a timeout left status.json stale, so the sweep writes why.
    bool trainer_said = rec.state == RunState::failed && !rec.error.empty() && reason.rfind("exit code", 0) == 0;
    if (!trainer_said) write_status(job.folder, "failed", full);
    write_sweep_json(job, {{"finished_at", utc_timestamp()}, {"exit", describe_exit(exit)}, {"reason", reason}, {"error_line", error_line}});
    last_failure_ = full;
    ++outcome_.failed;
    out_ << "[sweep] run " << job.index + 1 << "/" << spec_.runs.size() << " " << job.folder << ": failed: " << full
         << std::endl;
  }

  // Queues the next attempt if a rule allows one; false when the run has failed for good.
  bool maybe_retry(std::unique_ptr<Job> job) {
    if (interrupted() || job->attempts > spec_.max_retries) return false;
    const RetryRule* rule = nullptr;
    Overrides next;
    for (const auto& r : spec_.on_failure) {
      if (!Regex(r.match, true).found_in(last_failure_)) continue;
      Overrides merged = merge_overrides(job->overrides, r.set);
      if (!r.set.empty() && merged == job->overrides) continue;  // this fallback is already in place
      rule = &r;
      next = std::move(merged);
      break;
    }
    if (!rule) return false;
    if (rule->set.empty() && holds_checkpoint(dir(job->folder))) {
      // The trainer kept a checkpoint (every checkpoint_every steps, and at Ctrl-C, SIGTERM or a
      // timeout's stop): the retry continues from it in the same folder, so a run that needs
      // more than one attempt's time still finishes.
      job->overrides = merge_overrides(job->overrides, {{"train.resume", "auto"}});
      job->kind = "retry";
    } else if (rule->set.empty()) {
      move_aside(job->folder);
      job->kind = "retry";
    } else {
      job->folder = retry_name(job->planned.name, next_free(job->planned.name, false));
      job->overrides = std::move(next);
      job->changes = merge_overrides(job->changes, rule->set);
      job->kind = "fallback";
    }
    job->child.reset();
    job->last_printed_step = -2;
    out_ << "[sweep] " << job->planned.name << ": retrying as " << job->folder << " (rule \"" << rule->match << "\")" << std::endl;
    queue(*job);
    queue_.push_front(std::move(job));
    return true;
  }

  // A timestamped copy of each report the queue writes (reports/report_YYYYMMDD_HHMMSS.md), so
  // the experiment's history survives as the seed's queue kept it.
  void keep_report_copy() {
    const std::time_t now = std::time(nullptr);
    std::tm tm{};
    localtime_r(&now, &tm);
    char stamp[32];
    std::strftime(stamp, sizeof stamp, "%Y%m%d_%H%M%S", &tm);
    const std::filesystem::path dir = outcome_.exp_dir / "reports";
    std::filesystem::create_directories(dir);
    std::filesystem::copy_file(outcome_.report, dir / (std::string("report_") + stamp + ".md"),
                               std::filesystem::copy_options::overwrite_existing);
  }

  void write_report() {
    if (!opt_.report) return;
    try {
      ReportOptions ro;
      ro.exp_dir = outcome_.exp_dir;
      ro.tail = opt_.tail;
      outcome_.report = lab::write_report(ro).markdown;
      keep_report_copy();
    } catch (const std::exception& e) {
      out_ << "[sweep] warning: report not written: " << e.what() << std::endl;
    }
  }

  const SweepSpec& spec_;
  const SweepOptions& opt_;
  std::optional<FolderLock> lock_;  // the experiment folder's, held until the sweep ends
  std::ostream& out_;
  SweepOutcome outcome_;
  fs::path base_config_;
  std::vector<std::string> command_;
  std::vector<std::string> order_;
  std::deque<std::unique_ptr<Job>> queue_;
  std::string last_failure_;
};

}  // namespace

std::string shell_join(const std::vector<std::string>& argv) {
  std::string out;
  for (const auto& a : argv) {
    if (!out.empty()) out += ' ';
    bool plain = !a.empty() && a.find_first_not_of("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-./=:,+@%") ==
                                   std::string::npos;
    if (plain) {
      out += a;
      continue;
    }
    out += '\'';
    for (char c : a) out += c == '\'' ? std::string("'\\''") : std::string(1, c);
    out += '\'';
  }
  return out;
}

SweepOutcome run_sweep(const SweepSpec& spec, const SweepOptions& opt) { return Sweep(spec, opt).run(); }

}  // namespace moelab::lab
