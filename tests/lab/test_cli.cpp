// The `moelab sweep` and `moelab report` commands as a user runs them: the built binary, a
// sweep file, exit codes and printed paths. One test uses the stand-in trainer (always runs);
// one uses the real `moelab train` on a tiny config with one invalid run.
#include <gtest/gtest.h>

#include <signal.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <thread>
#include <sys/wait.h>

#include "lab/experiment_reader.hpp"
#include "lab_test_util.hpp"
#include "common/test_support.hpp"

using namespace moelab::lab;
using namespace moelab::lab::labtest;

namespace {

using Result = moelab::test::CliResult;
Result run(const std::string& args) { return moelab::test::run_moelab(args); }

const std::string kData = std::string(MOELAB_SOURCE_DIR) + "/tests/lab/data";

}  // namespace

TEST(Cli, SweepAndReportWithStandInTrainer) {
  auto dir = fresh_dir("cli");
  write_text(dir / "base.toml", "");
  write_text(dir / "s.toml", "name = \"c\"\nbase = \"base.toml\"\n[[run]]\nname = \"a\"\n[[run]]\nname = \"b\"\nset = { \"fake.mode\" = \"fail\" }\n");
  Result r = run("sweep " + (dir / "s.toml").string() + " --out " + (dir / "exp").string() + " --progress 100 --train-cmd " +
                 kData + "/fake_train.sh");
  EXPECT_EQ(r.code, 1) << "a run failed for good, so the sweep must not exit 0\n" << r.output;
  EXPECT_NE(r.output.find("[sweep] failed for good: b"), std::string::npos) << r.output;
  EXPECT_NE(r.output.find("[sweep] report: " + (dir / "exp" / "report.md").string()), std::string::npos) << r.output;
  EXPECT_NE(r.output.find("run 2/2 b: failed: exit code 1: model.d_model (7)"), std::string::npos) << r.output;
  Result rep = run("report " + (dir / "exp").string() + " --out-md " + (dir / "r" / "x.md").string() + " --tail 2");
  EXPECT_EQ(rep.code, 0) << rep.output;
  std::string md = read_text(dir / "r" / "x.md");
  EXPECT_NE(md.find("tail2_tok/sec"), std::string::npos);
  EXPECT_TRUE(std::filesystem::exists(dir / "r" / "metrics" / "c_steps.csv"));
  Result bad = run("report " + (dir / "nope").string());
  EXPECT_NE(bad.code, 0);
  Result bad_sweep = run("sweep " + (dir / "base.toml").string());
  EXPECT_EQ(bad_sweep.code, 1);
  EXPECT_NE(bad_sweep.output.find("moelab: error: "), std::string::npos) << bad_sweep.output;
  std::filesystem::remove_all(dir);
}

TEST(Cli, RealTrainerSweepWithRepeats) {
  auto dir = fresh_dir("cli_real");
  Result r = run("sweep " + kData + "/sweep-e2e.toml --out " + (dir / "exp").string() + " --progress 100");
  SCOPED_TRACE(r.output);
  EXPECT_EQ(r.code, 0);
  std::map<std::string, double> last_loss;
  for (const char* ok : {"dropless", "capacity", "dropless_repeat", "capacity_repeat"}) {
    RunRecord rec = read_run_folder(dir / "exp" / ok);
    EXPECT_EQ(rec.state, RunState::completed) << ok << ": " << rec.error;
    ASSERT_EQ(rec.steps.size(), 3u) << ok;
    last_loss[ok] = rec.steps.back().loss;
  }
  // A repeat runs with the next seed, so it is not a copy of the first run.
  EXPECT_NE(read_text(dir / "exp" / "capacity_repeat" / "config.toml").find("seed = 43\n"), std::string::npos);
  EXPECT_NE(last_loss["capacity"], last_loss["capacity_repeat"]);
  std::string md = read_text(dir / "exp" / "report.md");
  EXPECT_NE(md.find("## Repeats"), std::string::npos) << md;
  std::filesystem::remove_all(dir);
}

// Pre-flight: every run's config is checked before the first starts; the errors name the run
// and the key; nothing is created.
TEST(Cli, SweepRefusesInvalidRunsBeforeStartingAny) {
  auto dir = fresh_dir("cli_pre");
  Result r = run("sweep " + kData + "/sweep-e2e-invalid.toml --out " + (dir / "exp").string() + " --progress 100");
  EXPECT_EQ(r.code, 1) << r.output;
  EXPECT_NE(r.output.find("2 run config(s) are invalid, so no run was started"), std::string::npos) << r.output;
  EXPECT_NE(r.output.find("run \"typo\": --set: unknown config key 'moe.dispatchh'"), std::string::npos) << r.output;
  EXPECT_NE(r.output.find("run \"topk\": invalid config: moe.top_k = 9 exceeds moe.experts = 4"), std::string::npos)
      << r.output;
  EXPECT_FALSE(std::filesystem::exists(dir / "exp"));

  Result dry = run("sweep " + kData + "/sweep-e2e.toml --dry-run");
  EXPECT_EQ(dry.code, 0) << dry.output;
  EXPECT_NE(dry.output.find("run 1/4 dropless: (the base config)"), std::string::npos) << dry.output;
  EXPECT_NE(dry.output.find("run 2/4 dropless_repeat: train.seed = 43"), std::string::npos) << dry.output;
  EXPECT_NE(dry.output.find("run 3/4 capacity: moe.dispatch = capacity, moe.capacity_factor = 1.0"), std::string::npos)
      << dry.output;
  Result dry_bad = run("sweep " + kData + "/sweep-e2e-invalid.toml --dry-run");
  EXPECT_EQ(dry_bad.code, 1) << dry_bad.output;
  std::filesystem::remove_all(dir);
}

bool process_gone(pid_t pid) {
  if (kill(pid, 0) != 0) return true;
  std::string stat = read_text("/proc/" + std::to_string(pid) + "/stat");  // a zombie is gone too
  auto close = stat.rfind(')');
  return close != std::string::npos && close + 2 < stat.size() && stat[close + 2] == 'Z';
}

// A sweep killed with SIGKILL takes its training child with it (no orphan trains on).
TEST(Cli, KilledSweepLeavesNoOrphan) {
  auto dir = fresh_dir("cli_orphan");
  write_text(dir / "base.toml", "");
  write_text(dir / "s.toml", "name = \"o\"\nbase = \"base.toml\"\n[[run]]\nname = \"hang\"\nset = { \"fake.mode\" = \"hang\", \"fake.steps\" = 1 }\n");
  pid_t sweep = fork();
  if (sweep == 0) {
    std::string log = (dir / "sweep.log").string();
    if (!freopen(log.c_str(), "w", stdout) || !freopen(log.c_str(), "a", stderr)) _exit(126);
    std::string train = kData + "/fake_train.sh";
    execl(MOELAB_BINARY, MOELAB_BINARY, "sweep", (dir / "s.toml").c_str(), "--out", (dir / "exp").c_str(), "--progress",
          "100", "--train-cmd", train.c_str(), (char*)nullptr);
    _exit(127);
  }
  pid_t child = 0;
  for (int i = 0; i < 400 && child == 0; ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(25));
    child = pid_t(std::atol(read_text(dir / "exp" / "hang" / "pid").c_str()));
  }
  ASSERT_GT(child, 0) << read_text(dir / "sweep.log");
  std::this_thread::sleep_for(std::chrono::milliseconds(100));  // the child is in its sleep now
  ASSERT_FALSE(process_gone(child));
  kill(sweep, SIGKILL);
  waitpid(sweep, nullptr, 0);
  bool gone = false;
  for (int i = 0; i < 200 && !gone; ++i) {
    gone = process_gone(child);
    if (!gone) std::this_thread::sleep_for(std::chrono::milliseconds(25));
  }
  EXPECT_TRUE(gone) << "training child " << child << " outlived its sweep";
  if (!gone) kill(child, SIGKILL);
  std::filesystem::remove_all(dir);
}

// `moelab report` over several experiments (runs named by their experiment), never into a run
// folder, and exit 1 (writing nothing) when there is no run at all.
TEST(Cli, ReportComparesFoldersAndNeverWritesIntoARunFolder) {
  auto dir = fresh_dir("cli_report");
  write_text(dir / "base.toml", "");
  for (const char* e : {"e1", "e2"}) {
    write_text(dir / (std::string(e) + ".toml"), "name = \"" + std::string(e) + "\"\nbase = \"base.toml\"\n[[run]]\nname = \"a\"\n");
    Result r = run("sweep " + (dir / (std::string(e) + ".toml")).string() + " --out " + (dir / e).string() +
                   " --progress 100 --no-report --train-cmd " + kData + "/fake_train.sh");
    ASSERT_EQ(r.code, 0) << r.output;
  }
  Result both = run("report " + (dir / "e1").string() + " " + (dir / "e2").string());
  EXPECT_EQ(both.code, 1) << both.output;
  EXPECT_NE(both.output.find("needs --out-md"), std::string::npos) << both.output;
  both = run("report " + (dir / "e1").string() + " " + (dir / "e2").string() + " --out-md " + (dir / "cmp" / "r.md").string());
  EXPECT_EQ(both.code, 0) << both.output;
  std::string md = read_text(dir / "cmp" / "r.md");
  EXPECT_NE(md.find("| e1/a | completed |"), std::string::npos) << md;
  EXPECT_NE(md.find("| e2/a | completed |"), std::string::npos) << md;

  Result one = run("report " + (dir / "e1" / "a").string());
  EXPECT_EQ(one.code, 1) << one.output;
  EXPECT_NE(one.output.find("is a run folder, which the report does not write into"), std::string::npos) << one.output;
  EXPECT_FALSE(std::filesystem::exists(dir / "e1" / "a" / "report.md"));
  EXPECT_FALSE(std::filesystem::exists(dir / "e1" / "a" / "metrics"));
  one = run("report " + (dir / "e1" / "a").string() + " --out-md " + (dir / "one" / "r.md").string());
  EXPECT_EQ(one.code, 0) << one.output;
  EXPECT_NE(read_text(dir / "one" / "r.md").find("| a | completed |"), std::string::npos);

  std::filesystem::create_directories(dir / "nothing");
  Result none = run("report " + (dir / "nothing").string());
  EXPECT_EQ(none.code, 1) << none.output;
  EXPECT_NE(none.output.find("no runs found"), std::string::npos) << none.output;
  EXPECT_FALSE(std::filesystem::exists(dir / "nothing" / "report.md"));
  std::filesystem::remove_all(dir);
}

// `report --baseline NAME` with no run of that name is refused (exit 2, naming the run and the
// runs there) before anything is written, rather than a report whose comparison columns are all
// unknown; `--tail 0` is refused with a plain range, not the double's 309-digit maximum.
TEST(Cli, ReportRefusesAnUnknownBaselineAndAZeroTail) {
  auto dir = fresh_dir("cli_report_args");
  write_text(dir / "base.toml", "");
  write_text(dir / "e.toml", "name = \"e\"\nbase = \"base.toml\"\n[[run]]\nname = \"a\"\n");
  Result r = run("sweep " + (dir / "e.toml").string() + " --out " + (dir / "e").string() +
                 " --progress 100 --no-report --train-cmd " + kData + "/fake_train.sh");
  ASSERT_EQ(r.code, 0) << r.output;

  Result bad = run("report " + (dir / "e").string() + " --no-figures --baseline nope");
  EXPECT_EQ(bad.code, 2) << bad.output;
  EXPECT_NE(bad.output.find("--baseline nope: no run of that name"), std::string::npos) << bad.output;
  EXPECT_NE(bad.output.find("(runs: a)"), std::string::npos) << bad.output;
  EXPECT_FALSE(std::filesystem::exists(dir / "e" / "report.md"));
  Result good = run("report " + (dir / "e").string() + " --no-figures --baseline a");
  EXPECT_EQ(good.code, 0) << good.output;

  Result tail = run("report " + (dir / "e").string() + " --no-figures --tail 0");
  EXPECT_EQ(tail.code, 2) << tail.output;
  EXPECT_NE(tail.output.find("--tail 0 must be at least 1"), std::string::npos) << tail.output;
  EXPECT_EQ(tail.output.find("179769"), std::string::npos) << tail.output;
  EXPECT_EQ(run("report " + (dir / "e").string() + " --no-figures --tail 1").code, 0);
  std::filesystem::remove_all(dir);
}
