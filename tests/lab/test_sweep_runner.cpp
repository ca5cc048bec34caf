// The sweep queue against a stand-in trainer (data/fake_train.sh): completed and failed runs,
// crash retries (NAME.failK), fallbacks (NAME_retryK), timeouts, repeats, re-running the same
// command, and Ctrl-C. The real trainer is not needed: the sweep only sees a child process and
// its run folder.
#include <gtest/gtest.h>

#include <algorithm>
#include <sstream>
#include <thread>

#include <nlohmann/json.hpp>

#include "core/folder_lock.hpp"
#include "lab/experiment_reader.hpp"
#include "lab/sweep_runner.hpp"
#include "lab_test_util.hpp"

using namespace moelab::lab;
using namespace moelab::lab::labtest;

namespace {

const std::string kFake = std::string(MOELAB_SOURCE_DIR) + "/tests/lab/data/fake_train.sh";

SweepOptions fast_options(const std::filesystem::path& out, std::ostream& log) {
  SweepOptions o;
  o.out_dir = out;
  o.train_command = {kFake};
  o.grace_s = 0.5;
  o.poll_s = 0.02;
  o.progress_every_s = 0.1;
  o.out = &log;
  return o;
}

SweepSpec spec_in(const std::filesystem::path& dir, const std::string& text) {
  write_text(dir / "base.toml", "[model]\nd_model = 64\n");
  write_text(dir / "s.toml", text);
  return load_sweep(dir / "s.toml");
}

RunState state_of(const std::filesystem::path& run) { return read_run_folder(run).state; }

}  // namespace

TEST(SweepRunner, StatusRetriesFallbacksTimeoutsAndRepeats) {
  auto dir = fresh_dir("sweep");
  SweepSpec spec = spec_in(dir, R"(
name = "t"
base = "base.toml"
baseline = "ok"
max_retries = 1
timeout = 2
workers = 3
[[run]]
name = "ok"
set = { "fake.steps" = 4 }
[[run]]
name = "bad"
set = { "fake.mode" = "fail" }
[[run]]
name = "flaky"
set = { "fake.mode" = "flaky" }
[[run]]
name = "graph"
set = { "fake.mode" = "fail_unless_eager" }
[[run]]
name = "hang"
set = { "fake.mode" = "hang" }
[[on_failure]]
match = "killed by signal"
[[on_failure]]
match = "graph capture"
set = { exec = "eager" }
)");
  std::ostringstream log;
  auto out = dir / "exp";
  SweepOutcome r = run_sweep(spec, fast_options(out, log));
  SCOPED_TRACE(log.str());
  EXPECT_EQ(r.completed, 3);  // ok, flaky (second attempt), graph_retry1
  EXPECT_EQ(r.failed, 4);     // bad, flaky's first, graph, hang
  EXPECT_EQ(state_of(out / "ok"), RunState::completed);
  EXPECT_EQ(state_of(out / "bad"), RunState::failed);
  EXPECT_EQ(read_run_folder(out / "bad").error, "model.d_model (7) must be a multiple of model.head_dim (64)");
  EXPECT_EQ(state_of(out / "flaky.fail1"), RunState::failed);
  EXPECT_EQ(read_run_folder(out / "flaky.fail1").error, "killed by signal 11 (segmentation fault)");
  EXPECT_EQ(state_of(out / "flaky"), RunState::completed);
  EXPECT_EQ(state_of(out / "graph"), RunState::failed);
  EXPECT_EQ(read_run_folder(out / "graph").error, "exit code 1: CUDA graph capture failed: dynamic shapes in dispatch");
  EXPECT_EQ(state_of(out / "graph_retry1"), RunState::completed);
  EXPECT_EQ(state_of(out / "hang"), RunState::failed);
  EXPECT_EQ(read_run_folder(out / "hang").error, "timed out after 2s");
  EXPECT_FALSE(std::filesystem::exists(out / "bad_retry1"));  // no rule matched a config error
  // What the exit code is made of: the runs whose last attempt failed.
  std::vector<std::string> for_good = r.failed_for_good;
  std::sort(for_good.begin(), for_good.end());
  EXPECT_EQ(for_good, (std::vector<std::string>{"bad", "hang"}));

  // Each attempt records how to reproduce it.
  auto sj = nlohmann::json::parse(read_text(out / "graph_retry1" / "sweep.json"));
  EXPECT_EQ(sj["overrides"]["exec"], "eager");
  EXPECT_EQ(sj["changes"]["exec"], "eager");
  EXPECT_EQ(sj["attempt_kind"], "fallback");
  EXPECT_NE(sj["command_line"].get<std::string>().find("--set exec=eager"), std::string::npos);
  EXPECT_NE(read_text(out / "ok" / "stdout.log").find("step 3/4"), std::string::npos);

  // The report was written and names the failures with their retries.
  std::string md = read_text(out / "report.md");
  EXPECT_NE(md.find("- `graph` failed with: `exit code 1: CUDA graph capture failed"), std::string::npos);
  EXPECT_NE(md.find("fallback (exec=eager) `graph_retry1` status: `completed`"), std::string::npos);
  EXPECT_NE(md.find("retry `flaky` status: `completed`"), std::string::npos);
  EXPECT_NE(log.str().find("[sweep] report: "), std::string::npos);
  EXPECT_NE(log.str().find("[sweep] run 5/5 hang: step "), std::string::npos);
  // A timestamped copy of the report is kept after the runs (reports/report_YYYYMMDD_HHMMSS.md),
  // the newest equal to report.md.
  std::vector<std::filesystem::path> copies;
  for (const auto& e : std::filesystem::directory_iterator(out / "reports")) copies.push_back(e.path());
  ASSERT_FALSE(copies.empty());
  std::sort(copies.begin(), copies.end());
  EXPECT_EQ(copies.back().filename().string().rfind("report_20", 0), 0u) << copies.back();
  EXPECT_EQ(read_text(copies.back()), md);

  // The same command again: completed runs are skipped, failed ones run again with the old
  // attempt kept aside.
  std::ostringstream log2;
  SweepOutcome again = run_sweep(spec, fast_options(out, log2));
  EXPECT_EQ(again.skipped, 3);
  EXPECT_EQ(state_of(out / "bad.fail1"), RunState::failed);
  EXPECT_EQ(state_of(out / "bad"), RunState::failed);
  EXPECT_TRUE(std::filesystem::exists(out / "hang.fail1"));
  std::filesystem::remove_all(dir);
}

// A run stopped by its timeout after the trainer kept a checkpoint is retried in its own folder,
// resuming (train.resume=auto), instead of starting again from scratch beside a NAME.fail1: a
// run that needs more than one attempt's time can finish.
TEST(SweepRunner, ARetryResumesFromTheCheckpointTheAttemptKept) {
  auto dir = fresh_dir("sweep_resume");
  SweepSpec spec = spec_in(dir, R"(
name = "t"
base = "base.toml"
max_retries = 1
timeout = 1
[[run]]
name = "slow"
set = { "fake.mode" = "slow" }
[[on_failure]]
match = "timed out"
)");
  std::ostringstream log;
  auto out = dir / "exp";
  SweepOutcome r = run_sweep(spec, fast_options(out, log));
  SCOPED_TRACE(log.str());
  EXPECT_EQ(r.completed, 1);
  EXPECT_EQ(r.failed, 1);  // the timed-out first attempt
  EXPECT_EQ(state_of(out / "slow"), RunState::completed);
  EXPECT_FALSE(std::filesystem::exists(out / "slow.fail1"));
  auto sj = nlohmann::json::parse(read_text(out / "slow" / "sweep.json"));
  EXPECT_EQ(sj["overrides"]["train.resume"], "auto");
  EXPECT_EQ(sj["attempt_kind"], "retry");
  EXPECT_NE(log.str().find("slow: retrying as slow"), std::string::npos);
  std::filesystem::remove_all(dir);
}

TEST(SweepRunner, RepeatsAndInterrupt) {
  auto dir = fresh_dir("sweep_int");
  SweepSpec spec = spec_in(dir, R"(
name = "i"
base = "base.toml"
repeat = 2
[[run]]
name = "slow"
set = { "fake.mode" = "hang", "fake.steps" = 1 }
)");
  ASSERT_EQ(spec.runs.size(), 2u);
  EXPECT_EQ(spec.runs[1].name, "slow_repeat");
  std::atomic<bool> stop{false};
  std::ostringstream log;
  auto opt = fast_options(dir / "exp", log);
  opt.interrupt = &stop;
  std::thread t([&] {
    std::this_thread::sleep_for(std::chrono::milliseconds(400));
    stop = true;
  });
  SweepOutcome r = run_sweep(spec, opt);
  t.join();
  EXPECT_TRUE(r.interrupted);
  RunRecord first = read_run_folder(dir / "exp" / "slow");
  EXPECT_EQ(first.state, RunState::failed);
  EXPECT_NE(first.error.find("interrupted"), std::string::npos);
  EXPECT_EQ(state_of(dir / "exp" / "slow_repeat"), RunState::queued);  // never started
  std::filesystem::remove_all(dir);
}

// One sweep per experiment folder: a second one is refused at once, naming the holder, and
// creates nothing.
TEST(SweepRunner, SecondSweepIntoTheSameFolderIsRefused) {
  auto dir = fresh_dir("sweep_lock");
  SweepSpec spec = spec_in(dir, "name = \"l\"\nbase = \"base.toml\"\n[[run]]\nname = \"a\"\n");
  std::filesystem::create_directories(dir / "exp");
  std::ostringstream log;
  {
    moelab::FolderLock held = moelab::FolderLock::acquire(dir / "exp", "experiment folder");
    try {
      run_sweep(spec, fast_options(dir / "exp", log));
      ADD_FAILURE() << "a second sweep was not refused";
    } catch (const std::exception& e) {
      std::string what = e.what();
      EXPECT_NE(what.find("experiment folder " + (dir / "exp").string() + " is in use"), std::string::npos) << what;
      EXPECT_NE(what.find("pid " + std::to_string(getpid())), std::string::npos) << what;
    }
    EXPECT_FALSE(std::filesystem::exists(dir / "exp" / "a"));
    EXPECT_FALSE(std::filesystem::exists(dir / "exp" / "experiment.json"));
  }
  SweepOutcome r = run_sweep(spec, fast_options(dir / "exp", log));
  EXPECT_EQ(r.completed, 1);
  std::filesystem::remove_all(dir);
}

// A rerun that finds a run folder still locked by a live trainer waits for it, then refuses;
// it never moves the live folder aside or starts a second copy.
TEST(SweepRunner, LiveWriterOfARunFolderIsNeverRaced) {
  auto dir = fresh_dir("sweep_live");
  SweepSpec spec = spec_in(dir, "name = \"l\"\nbase = \"base.toml\"\n[[run]]\nname = \"a\"\n");
  write_text(dir / "exp" / "a" / "status.json", "{\"status\": \"running\", \"step\": 3}\n");
  std::ostringstream log;
  auto opt = fast_options(dir / "exp", log);
  opt.holder_wait_s = 0.3;
  {
    moelab::FolderLock trainer = moelab::FolderLock::acquire(dir / "exp" / "a", "run folder");
    try {
      run_sweep(spec, opt);
      ADD_FAILURE() << "the sweep raced a live writer";
    } catch (const std::exception& e) {
      std::string what = e.what();
      EXPECT_NE(what.find("is still being written by process " + std::to_string(getpid())), std::string::npos) << what;
    }
    EXPECT_FALSE(std::filesystem::exists(dir / "exp" / "a.fail1"));
    EXPECT_NE(read_text(dir / "exp" / "a" / "status.json").find("running"), std::string::npos);
  }
  // The writer gone, the same command moves its unfinished folder aside and runs it again.
  SweepOutcome r = run_sweep(spec, opt);
  EXPECT_EQ(r.completed, 1);
  EXPECT_TRUE(std::filesystem::exists(dir / "exp" / "a.fail1"));
  std::filesystem::remove_all(dir);
}
