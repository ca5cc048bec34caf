// The `moelab sweep` and `moelab report` commands as a user runs them: the built binary, a
// sweep file, exit codes and printed paths. One test uses the stand-in trainer (always runs);
// one uses the real `moelab train` on a tiny config with one invalid run.
#include <gtest/gtest.h>

#include <cstdio>
#include <sys/wait.h>

#include "lab/experiment_reader.hpp"
#include "lab_test_util.hpp"

using namespace moelab::lab;
using namespace moelab::lab::labtest;

namespace {

struct Result {
  int code;
  std::string output;
};

Result run(const std::string& args) {
  std::string cmd = std::string(MOELAB_BINARY) + " " + args + " 2>&1";
  Result r{-1, ""};
  FILE* p = popen(cmd.c_str(), "r");
  if (!p) return r;
  char buf[4096];
  while (size_t n = fread(buf, 1, sizeof buf, p)) r.output.append(buf, n);
  int status = pclose(p);
  r.code = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
  return r;
}

const std::string kData = std::string(MOELAB_SOURCE_DIR) + "/tests/lab/data";

}  // namespace

TEST(Cli, SweepAndReportWithStandInTrainer) {
  auto dir = fresh_dir("cli");
  write_text(dir / "base.toml", "");
  write_text(dir / "s.toml", "name = \"c\"\nbase = \"base.toml\"\n[[run]]\nname = \"a\"\n[[run]]\nname = \"b\"\nset = { \"fake.mode\" = \"fail\" }\n");
  Result r = run("sweep " + (dir / "s.toml").string() + " --out " + (dir / "exp").string() + " --progress 100 --train-cmd " +
                 kData + "/fake_train.sh");
  EXPECT_EQ(r.code, 0) << r.output;
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

TEST(Cli, RealTrainerSweepWithAnInvalidRun) {
  auto dir = fresh_dir("cli_real");
  Result r = run("sweep " + kData + "/sweep-e2e.toml --out " + (dir / "exp").string() + " --progress 100");
  SCOPED_TRACE(r.output);
  EXPECT_EQ(r.code, 0);
  RunRecord invalid = read_run_folder(dir / "exp" / "invalid");
  EXPECT_EQ(invalid.state, RunState::failed);
  EXPECT_NE(invalid.error.find("d_model"), std::string::npos) << invalid.error;
  for (const char* ok : {"dropless", "capacity"}) {
    RunRecord rec = read_run_folder(dir / "exp" / ok);
    EXPECT_EQ(rec.state, RunState::completed) << ok << ": " << rec.error;
    EXPECT_EQ(rec.steps.size(), 3u) << ok;
  }
  std::string md = read_text(dir / "exp" / "report.md");
  EXPECT_NE(md.find("- `invalid` failed with: `"), std::string::npos);
  std::filesystem::remove_all(dir);
}
