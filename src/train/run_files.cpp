// Run folder writers.
#include "train/run_files.hpp"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <ctime>
#include <filesystem>
#include <sstream>
#include <unistd.h>
#include <vector>

#include "core/atomic_file.hpp"
#include "core/error.hpp"
#include "core/folder_lock.hpp"

namespace moelab {
namespace fs = std::filesystem;

void write_status(const std::string& run_dir, const RunStatus& s) {
  nlohmann::json j;
  j["status"] = s.status;
  j["step"] = s.step;
  j["steps"] = s.steps;
  j["error"] = s.error;
  j["started_at"] = s.started_at;
  j["updated_at"] = utc_timestamp();
  j["device"] = s.device;
  j["ranks"] = s.ranks;
  j["pid"] = int64_t(getpid());
  j["peak_mem_mib"] = s.peak_mem_mib ? nlohmann::json(*s.peak_mem_mib) : nlohmann::json(nullptr);
  j["total_time_min"] = s.total_time_min ? nlohmann::json(*s.total_time_min) : nlohmann::json(nullptr);
  write_file_atomic(run_dir + "/status.json", j.dump(1) + "\n");
}

int64_t last_logged_step(const std::string& run_dir) {
  std::ifstream in(fs::path(run_dir) / "metrics.jsonl");
  int64_t last = -1;
  for (std::string line; std::getline(in, line);) {
    auto j = nlohmann::json::parse(line, nullptr, false);
    if (j.is_object() && j.value("event", "") == "step" && j.contains("step") && j["step"].is_number_integer())
      last = std::max(last, j["step"].get<int64_t>());
  }
  return last;
}

bool mark_run_failed(const std::string& run_dir, const std::string& cause) {
  const fs::path path = fs::path(run_dir) / "status.json";
  if (!fs::exists(path)) return false;
  // The job's last rank may still be going down when mpiexec returns (it is killed after its peer
  // died, and on a loaded machine that takes a moment): wait a while for it to let the folder go.
  std::optional<FolderLock> lock = FolderLock::try_acquire(run_dir);
  for (int i = 0; i < 200 && !lock; ++i) {
    usleep(50 * 1000);
    lock = FolderLock::try_acquire(run_dir);
  }
  if (!lock) return false;  // a writer still holds the folder after 10 s: it records its own end
  std::ifstream in(path);
  nlohmann::json j = nlohmann::json::parse(in, nullptr, false);
  if (j.is_discarded() || !j.is_object() || j.value("status", "") == "completed") return false;
  const std::string before = j.value("error", "");
  j["status"] = "failed";
  // status.json is rewritten only at checkpoints, so its step may be far behind: the step that
  // failed is the one after the last that metrics.jsonl logged (the step being run).
  if (const int64_t logged = last_logged_step(run_dir); logged >= 0) {
    int64_t failed_at = logged + 1;
    if (j.contains("steps") && j["steps"].is_number_integer()) failed_at = std::min(failed_at, j["steps"].get<int64_t>() - 1);
    if (!j.contains("step") || !j["step"].is_number_integer() || j["step"].get<int64_t>() < failed_at) j["step"] = failed_at;
  }
  j["error"] = before.empty() ? cause : cause + "; " + before;
  j["updated_at"] = utc_timestamp();
  write_file_atomic(path.string(), j.dump(1) + "\n");
  return true;
}

MetricsLog::MetricsLog(const std::string& run_dir, int64_t keep_before_step) {
  std::string path = run_dir + "/metrics.jsonl";
  std::vector<std::string> kept;
  if (keep_before_step >= 0) {
    std::ifstream in(path);
    std::string line;
    while (std::getline(in, line)) {
      auto j = nlohmann::json::parse(line, nullptr, false);
      if (j.is_discarded() || !j.contains("step") || !j["step"].is_number_integer()) continue;
      if (j["step"].get<int64_t>() < keep_before_step && j.value("event", "") != "end") kept.push_back(line);
    }
  }
  out_.open(path, std::ios::binary | std::ios::trunc);
  if (!out_) throw Error("cannot write '" + path + "': check that the run folder is writable");
  for (auto& l : kept) out_ << l << '\n';
  out_.flush();
}

void MetricsLog::append(const nlohmann::json& record) {
  out_ << record.dump() << '\n';
  out_.flush();
}

namespace {
std::string with_commas(double v) {
  long long n = std::llround(v);
  std::string digits = std::to_string(n < 0 ? -n : n), out;
  for (size_t i = 0; i < digits.size(); ++i) {
    if (i && (digits.size() - i) % 3 == 0) out += ',';
    out += digits[i];
  }
  return (n < 0 ? "-" : "") + out;
}
}  // namespace

std::string format_step_line(const StepLine& s) {
  char buf[512];
  double pct = s.steps ? 100.0 * double(s.step) / double(s.steps) : 0.0;
  std::string mfu = s.mfu ? ([&] {
    char m[32];
    std::snprintf(m, sizeof m, "%.2f", *s.mfu);
    return std::string(m);
  })()
                          : std::string("-");
  std::string maxvio;
  if (s.maxvio) {
    char m[48];
    std::snprintf(m, sizeof m, " | maxvio %.3f", *s.maxvio);
    maxvio = m;
  }
  std::snprintf(buf, sizeof buf,
                "step %05lld/%05lld (%.2f%%) | loss: %.6f | bal: %.4f%s | lrm: %.2f | dt: %.2fms | tok/sec: %s | "
                "mfu: %s | total time: %.2fm",
                (long long)s.step, (long long)s.steps, pct, s.loss, s.bal, maxvio.c_str(), s.lrm, s.dt_ms,
                with_commas(s.tok_sec).c_str(), mfu.c_str(), s.total_time_min);
  return buf;
}

}  // namespace moelab
