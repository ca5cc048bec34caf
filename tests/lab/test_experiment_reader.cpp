// Status rules and robustness of reading an experiment folder: run folders in every state,
// nanochat logs, stale files, folders with nothing in them, binary files among the logs.
#include <gtest/gtest.h>

#include "core/folder_lock.hpp"
#include "lab/experiment_reader.hpp"
#include "lab_test_util.hpp"

using namespace moelab::lab;
using namespace moelab::lab::labtest;

namespace {
const char* kStep =
    "{\"event\": \"step\", \"step\": 0, \"steps\": 2, \"loss\": 5.0, \"dt_ms\": 10, \"tok_sec\": 100, \"mfu\": 1.5}\n";
const char* kEnd = "{\"event\": \"end\", \"step\": 1, \"peak_mem_mib\": 3.5, \"total_time_min\": 0.5}\n";

const RunRecord& find(const Experiment& ex, const std::string& name) {
  for (const auto& r : ex.runs)
    if (r.name == name) return r;
  throw std::runtime_error("no run " + name);
}
}  // namespace

TEST(ExperimentReader, StatusRules) {
  auto dir = fresh_dir("status");
  write_text(dir / "done/status.json", R"({"status": "completed", "step": 1, "steps": 2, "total_time_min": 0.5})");
  write_text(dir / "done/metrics.jsonl", std::string(kStep) + kEnd);
  write_text(dir / "live/status.json", R"({"status": "running", "step": 0, "steps": 2})");
  write_text(dir / "live/metrics.jsonl", kStep);
  write_text(dir / "dead/status.json", R"({"status": "running", "step": 0, "steps": 2})");
  write_text(dir / "dead/metrics.jsonl", kStep);
  age_file(dir / "dead/status.json", 3600);
  age_file(dir / "dead/metrics.jsonl", 3600);
  write_text(dir / "crashed/status.json", R"({"status": "running", "step": 0})");
  write_text(dir / "crashed/stderr.log", "loading\nSegmentation fault (core dumped)\n");
  age_file(dir / "crashed/status.json", 3600);
  age_file(dir / "crashed/stderr.log", 3600);
  write_text(dir / "nostatus/metrics.jsonl", std::string(kStep) + kEnd);
  write_text(dir / "queued/status.json", R"({"status": "queued"})");
  write_text(dir / "empty/config.toml", "[model]\nd_model = 64\n");
  std::filesystem::create_directories(dir / "not_a_run");

  Experiment ex = read_experiment(dir);
  EXPECT_EQ(ex.runs.size(), 7u);
  EXPECT_EQ(find(ex, "done").state, RunState::completed);
  EXPECT_DOUBLE_EQ(find(ex, "done").total_time_min, 0.5);
  EXPECT_EQ(find(ex, "live").state, RunState::running);
  EXPECT_EQ(find(ex, "dead").state, RunState::failed);
  EXPECT_NE(find(ex, "dead").error.find("after step 0"), std::string::npos) << find(ex, "dead").error;
  EXPECT_EQ(find(ex, "crashed").state, RunState::failed);
  EXPECT_NE(find(ex, "crashed").error.find("stopped before its first step"), std::string::npos);
  EXPECT_EQ(find(ex, "nostatus").state, RunState::completed);
  EXPECT_EQ(find(ex, "queued").state, RunState::queued);
  const RunRecord& empty = find(ex, "empty");
  EXPECT_EQ(empty.state, RunState::unknown);
  ASSERT_FALSE(empty.problems.empty());
  EXPECT_NE(empty.problems[0].find("no metrics"), std::string::npos);
  std::filesystem::remove_all(dir);
}

// A run folder says "running" with fresh files, but its trainer is gone (a sweep killed with -9,
// its attempt moved aside as NAME.fail1): the folder's unheld lock says so at once, rather than
// after the 300 s staleness window. A held lock keeps it running.
TEST(ExperimentReader, AnUnlockedRunningFolderIsNotRunning) {
  auto dir = fresh_dir("lock_liveness");
  for (const char* name : {"r2.fail1", "r2"}) {
    write_text(dir / name / "status.json", R"({"status": "running", "step": 0, "steps": 2})");
    write_text(dir / name / "metrics.jsonl", kStep);
    write_text(dir / name / ".lock", "12345\n");
  }
  auto held = moelab::FolderLock::acquire(dir / "r2", "run folder");
  Experiment ex = read_experiment(dir);
  const RunRecord& dead = find(ex, "r2.fail1");
  EXPECT_EQ(dead.state, RunState::failed);
  EXPECT_NE(dead.error.find("its trainer is gone"), std::string::npos) << dead.error;
  EXPECT_EQ(find(ex, "r2").state, RunState::running);
  std::filesystem::remove_all(dir);
}

TEST(ExperimentReader, LogsRunningByAgeAndBinaryFiles) {
  auto dir = fresh_dir("logs");
  std::string steps = "step 00000/00100 (0.00%) | loss: 9.0 | dt: 100.00ms | tok/sec: 1,000 | mfu: 1.00\r\n";
  write_text(dir / "fresh.log", steps);
  write_text(dir / "old.log", steps);
  age_file(dir / "old.log", 3600);
  write_text(dir / "done.log", steps + "Peak memory usage: 10.00MiB\r\nTotal training time: 0.50m\r\n");
  write_text(dir / "blob.log", std::string("\x7f" "ELF\0\0\0\x01\x02", 9) + std::string(3000, '\0'));
  write_text(dir / "notes.txt", "not a log");
  Experiment ex = read_experiment(dir);
  ASSERT_EQ(ex.runs.size(), 4u);
  EXPECT_EQ(find(ex, "fresh").state, RunState::running);
  EXPECT_EQ(find(ex, "old").state, RunState::failed);
  EXPECT_EQ(find(ex, "done").state, RunState::completed);
  EXPECT_EQ(find(ex, "done").steps.size(), 1u);
  const RunRecord& blob = find(ex, "blob");
  EXPECT_TRUE(blob.steps.empty());
  ASSERT_FALSE(blob.problems.empty());
  EXPECT_NE(blob.problems[0].find("binary"), std::string::npos);
  // The order is oldest first for folders the sweep did not record.
  EXPECT_EQ(ex.runs.front().name, "old");
  std::filesystem::remove_all(dir);
}

TEST(ExperimentReader, ErrorLineAndNames) {
  EXPECT_EQ(last_error_line("info\nmoelab: error: bad key \"x\"\nwarning: later\n"), "bad key \"x\"");
  EXPECT_EQ(last_error_line("a\r\nRuntimeError: CUDA out of memory\r\nbye\r\n"), "RuntimeError: CUDA out of memory");
  EXPECT_EQ(last_error_line("all fine\n"), "");
  EXPECT_EQ(experiment_name_from_dir("/x/20260224_154946_moe-fp8 ablation"), "moe-fp8_ablation");
  EXPECT_EQ(experiment_name_from_dir("/x/plain/"), "plain");
}
