// The run folder as something to trust: one writer at a time (an OS lock that names its holder),
// no silent overwrite of a finished run (--force moves it aside), a refused resume that leaves
// the folder exactly as it was, resume=auto past a damaged newest checkpoint, checkpoint pruning,
// Ctrl-C keeping a checkpoint, and the CLI's exit codes for empty configs and usage errors.
#include <gtest/gtest.h>

#include <signal.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <functional>
#include <map>
#include <random>
#include <sstream>
#include <thread>

#include <nlohmann/json.hpp>

#include "config/config.hpp"
#include "core/atomic_file.hpp"
#include "core/error.hpp"
#include "core/folder_lock.hpp"
#include "core/rng.hpp"
#include "train/checkpoint.hpp"
#include "train/run_files.hpp"
#include "train/trainer.hpp"
#include "run_test_support.hpp"
#include "common/test_support.hpp"

namespace moelab {
namespace {
namespace fs = std::filesystem;
using test::fresh_dir;


std::string write_text(const fs::path& dir) {
  return test::write_words(dir, {"the", "expert", "router", "sends", "each", "token", "to", "two", "of", "eight"}, 4000,
                           Rng(std::random_device{}()).next_u64());
}

Config small_config(const std::string& text) {
  Config c = test::tiny_byte_config(text);
  c.train.steps = 6;
  c.train.batch_size = 2;
  c.train.threads = 1;
  return c;
}

// Every file under dir (but the lock) with its bytes, to show that nothing changed.
std::map<std::string, std::string> snapshot(const fs::path& dir) {
  std::map<std::string, std::string> out;
  for (const auto& e : fs::recursive_directory_iterator(dir)) {
    if (!e.is_regular_file() || e.path().filename() == FolderLock::kFileName) continue;
    std::ifstream in(e.path(), std::ios::binary);
    out[fs::relative(e.path(), dir).string()] = std::string(std::istreambuf_iterator<char>(in), {});
  }
  return out;
}

std::string error_of(const std::function<void()>& f) { return test::error_of<std::exception>(f); }

// A completed run of small_config in a fresh folder: the folder, the run and its config, and
// its files as the run left them (snapshot).
struct CompletedRun {
  fs::path dir, run;
  Config config;
  std::map<std::string, std::string> files;
};
CompletedRun completed_run(const std::string& name) {
  CompletedRun r;
  r.dir = fresh_dir(name);
  r.config = small_config(write_text(r.dir));
  r.run = r.dir / "run";
  run_training(r.config, r.run.string());
  r.files = snapshot(r.run);
  return r;
}

// `moelab train --config cfg --out run` in a child process (its output into log); its pid.
pid_t start_training(const fs::path& cfg, const fs::path& run, const fs::path& log) {
  pid_t child = fork();
  if (child == 0) {
    freopen(log.c_str(), "w", stdout);
    freopen(log.c_str(), "a", stderr);
    execl(MOELAB_BINARY, MOELAB_BINARY, "train", "--config", cfg.c_str(), "--out", run.c_str(), (char*)nullptr);
    _exit(127);
  }
  return child;
}

using test::CliResult;
CliResult moelab(const std::string& args) { return test::run_moelab(args); }

TEST(RunFolder, SecondWriterIsRefusedNamingFolderAndHolder) {
  auto [dir, run, c, before] = completed_run("lock");
  {
    // Another process's lock: a second open of the lock file conflicts like another process would.
    FolderLock held = FolderLock::acquire(run, "run folder");
    c.train.resume = "auto";  // even a legitimate resume must wait for the folder
    std::string e = error_of([&] { run_training(c, run.string()); });
    EXPECT_NE(e.find("run folder " + run.string() + " is in use"), std::string::npos) << e;
    EXPECT_NE(e.find("pid " + std::to_string(::getpid())), std::string::npos) << e;
    EXPECT_EQ(snapshot(run), before) << "a refused writer changed the folder";
  }
  // Released with its holder: the resume goes ahead now.
  EXPECT_NO_THROW(run_training(c, run.string()));
}

// Two real processes started together: exactly one trains, the other exits non-zero at once.
TEST(RunFolder, TwoTrainProcessesOneFolder) {
  fs::path dir = fresh_dir("two");
  fs::path cfg = dir / "c.toml";
  std::ofstream(cfg) << config_to_toml([&] {
    Config c = small_config(write_text(dir));
    c.train.steps = 300;  // long enough to still hold the folder when the second starts, even on a busy machine
    return c;
  }());
  std::string args = "train --config " + cfg.string() + " --out " + (dir / "run").string();
  pid_t first = start_training(cfg, dir / "run", dir / "first.log");
  // Wait until the first holds the folder (its status.json appears), then start the second.
  for (int i = 0; i < 600 && !fs::exists(dir / "run" / "status.json"); ++i) std::this_thread::sleep_for(std::chrono::milliseconds(50));
  CliResult second = moelab(args);
  int st = 0;
  waitpid(first, &st, 0);
  EXPECT_TRUE(WIFEXITED(st) && WEXITSTATUS(st) == 0);
  EXPECT_EQ(second.code, 1) << second.output;
  EXPECT_NE(second.output.find("is in use by another process (pid " + std::to_string(first) + ")"), std::string::npos)
      << second.output;
  std::ifstream in(dir / "run" / "metrics.jsonl");
  int steps = 0;
  for (std::string line; std::getline(in, line);) steps += line.find("\"event\":\"step\"") != std::string::npos;
  EXPECT_EQ(steps, 300) << "the folder holds the steps of one run, not a mix";
}

TEST(RunFolder, CompletedRunIsNotOverwrittenWithoutForce) {
  const auto [dir, run, c, before] = completed_run("overwrite");
  Config other = c;
  other.train.steps = 3;
  std::string e = error_of([&] { run_training(other, run.string()); });
  EXPECT_NE(e.find("already holds a run (status completed, step 5)"), std::string::npos) << e;
  EXPECT_NE(e.find("--force"), std::string::npos) << e;
  EXPECT_EQ(snapshot(run), before);

  TrainOptions force;
  force.force = true;
  run_training(other, run.string(), force);
  // The old run moved aside whole; the folder holds only the new one.
  EXPECT_EQ(snapshot(dir / "run.old1"), before);
  EXPECT_EQ(checkpoints_newest_first(run.string()).size(), 1u);
  EXPECT_NE(latest_checkpoint(run.string()).find("step_000003"), std::string::npos);
  EXPECT_EQ(load_config((run / "config.toml").string()).train.steps, 3);
}

TEST(RunFolder, RefusedResumeChangesNothing) {
  const auto [dir, run, c, before] = completed_run("refused");
  Config wider = c;
  wider.model.d_model = 64;
  wider.train.resume = "auto";
  std::string e = error_of([&] { run_training(wider, run.string()); });
  EXPECT_NE(e.find("model.d_model: checkpoint 32, this run 64"), std::string::npos) << e;
  EXPECT_EQ(snapshot(run), before) << "config.toml or status.json were rewritten by a refused resume";
}

TEST(RunFolder, ResumeAutoTakesTheNewestIntactCheckpoint) {
  fs::path dir = fresh_dir("intact");
  Config c = small_config(write_text(dir));
  c.train.checkpoint_every = 2;
  c.train.steps = 6;
  fs::path run = dir / "run";
  run_training(c, run.string());
  auto all = checkpoints_newest_first(run.string());
  ASSERT_EQ(all.size(), 3u);  // steps 6, 4, 2
  fs::resize_file(all[0], fs::file_size(all[0]) / 2);  // the newest is truncated
  c.train.steps = 8;
  c.train.resume = "auto";
  run_training(c, run.string());
  std::ifstream in(run / "metrics.jsonl");
  nlohmann::json resume;
  for (std::string line; std::getline(in, line);)
    if (line.find("\"resume\"") != std::string::npos) resume = nlohmann::json::parse(line);
  ASSERT_TRUE(resume.is_object());
  EXPECT_EQ(resume["step"], 4);
  EXPECT_EQ(resume["checkpoint"], all[1]);
  // A changed key is recorded with the resume (here train.steps).
  ASSERT_EQ(resume["config_changes"].size(), 1u);
  EXPECT_EQ(resume["config_changes"][0], "train.steps: 6 -> 8");
}

TEST(RunFolder, KeepCheckpointsPrunesOldOnes) {
  fs::path dir = fresh_dir("prune");
  Config c = small_config(write_text(dir));
  c.train.checkpoint_every = 1;
  c.train.keep_checkpoints = 2;
  run_training(c, (dir / "run").string());
  auto all = checkpoints_newest_first((dir / "run").string());
  ASSERT_EQ(all.size(), 2u);
  EXPECT_NE(all[0].find("step_000006"), std::string::npos);
  EXPECT_NE(all[1].find("step_000005"), std::string::npos);
}

TEST(RunFolder, StatusStepAgreesWithTheEndRecord) {
  fs::path dir = fresh_dir("status");
  Config c = small_config(write_text(dir));
  run_training(c, (dir / "run").string());
  std::ifstream st(dir / "run" / "status.json");
  auto status = nlohmann::json::parse(st);
  std::ifstream in(dir / "run" / "metrics.jsonl");
  nlohmann::json end;
  for (std::string line; std::getline(in, line);)
    if (line.find("\"end\"") != std::string::npos) end = nlohmann::json::parse(line);
  EXPECT_EQ(status["step"], end["step"]);
  EXPECT_EQ(status["step"], 5);
}

// SIGINT during a run: the trainer stops at the next step, keeps a checkpoint of where it got
// to, and resuming from it continues the run.
TEST(RunFolder, InterruptSavesACheckpoint) {
  fs::path dir = fresh_dir("sigint");
  fs::path cfg = dir / "c.toml";
  Config c = small_config(write_text(dir));
  c.train.steps = 100000;
  c.train.save_final = false;
  std::ofstream(cfg) << config_to_toml(c);
  pid_t child = start_training(cfg, dir / "run", dir / "log");
  auto steps_logged = [&] {
    std::ifstream in(dir / "run" / "metrics.jsonl");
    int n = 0;
    for (std::string line; std::getline(in, line);) ++n;
    return n;
  };
  for (int i = 0; i < 600 && steps_logged() < 3; ++i) std::this_thread::sleep_for(std::chrono::milliseconds(50));
  kill(child, SIGINT);
  int st = 0;
  waitpid(child, &st, 0);
  // Ctrl-C exits 130, as a --nproc job and a sweep do (the README's exit codes).
  EXPECT_TRUE(WIFEXITED(st)) << st;
  EXPECT_EQ(WEXITSTATUS(st), 130);
  std::string ckpt = latest_checkpoint((dir / "run").string());
  ASSERT_FALSE(ckpt.empty()) << "no checkpoint kept at the interrupt";
  std::ifstream sin(dir / "run" / "status.json");
  auto status = nlohmann::json::parse(sin);
  EXPECT_EQ(status["status"], "failed");
  EXPECT_NE(status["error"].get<std::string>().find("checkpoint saved at step"), std::string::npos) << status["error"];
}

// Start-up refusals (a precision the CPU has no kernels for, expert parallelism without the
// ranks, shards that are not there, a resume path that is no checkpoint) write nothing: a folder
// the command created is removed again, one that existed is left exactly as it was, and the
// corrected command then runs into the same --out without --force.
TEST(RunFolder, StartRefusalsLeaveNothingBehind) {
  fs::path dir = fresh_dir("refusals");
  const Config good = small_config(write_text(dir));
  std::vector<std::pair<std::string, std::function<void(Config&)>>> bad = {
      {"precision", [](Config& c) { c.precision = "bf16"; }},
      {"parallel.expert", [](Config& c) {
         c.parallel.expert = 2;
         c.train.save_final = false;
       }},
      {"shards", [&](Config& c) {
         c.data.source = "shards";
         c.data.dir = (dir / "no_such_shards").string();
       }},
      {"resume", [](Config& c) { c.train.resume = "yes"; }},
  };
  for (auto& [what, spoil] : bad) {
    Config c = good;
    spoil(c);
    const fs::path run = dir / ("run_" + what);
    EXPECT_FALSE(error_of([&] { run_training(c, run.string()); }).empty()) << what;
    EXPECT_FALSE(fs::exists(run)) << what << ": the refused start left its folder behind";

    fs::create_directories(run);  // a folder made beforehand (as a sweep does) is left as it was
    std::ofstream(run / "notes.txt") << "mine\n";
    EXPECT_FALSE(error_of([&] { run_training(c, run.string()); }).empty()) << what;
    EXPECT_EQ(snapshot(run), (std::map<std::string, std::string>{{"notes.txt", "mine\n"}})) << what;
    Config fixed = good;
    fixed.train.steps = 2;
    EXPECT_NO_THROW(run_training(fixed, run.string())) << what;
  }
}

// A folder whose only run stopped before its first step (an older moelab wrote config.toml and a
// failed status.json for a start-up error; a NaN at step 0 leaves no step either) is not "a run":
// the next start needs no --force.
TEST(RunFolder, AFolderWhoseRunNeverTookAStepIsNotARun) {
  fs::path dir = fresh_dir("no_step");
  Config c = small_config(write_text(dir));
  fs::path run = dir / "run";
  fs::create_directories(run);
  std::ofstream(run / "config.toml") << config_to_toml(c);
  std::ofstream(run / "status.json") << R"({"status": "failed", "step": 0, "error": "precision = bf16 ..."})" << "\n";
  std::ofstream(run / "metrics.jsonl") << "";
  EXPECT_FALSE(folder_holds_run(run.string()));
  EXPECT_NO_THROW(run_training(c, run.string()));
  std::ifstream in(run / "status.json");
  EXPECT_EQ(nlohmann::json::parse(in)["status"], "completed");
  EXPECT_TRUE(folder_holds_run(run.string()));
}

// A full disk (here the file size limit, which fails writes the same way) leaves no .tmp file and
// no partial file behind; the previous file stays whole.
TEST(RunFolder, FailedAtomicWriteLeavesNoTmpFile) {
  fs::path dir = fresh_dir("full_disk");
  const std::string path = (dir / "status.json").string();
  std::ofstream(path) << "old\n";
  pid_t child = fork();
  if (child == 0) {
    signal(SIGXFSZ, SIG_IGN);  // a write past the limit then fails with EFBIG instead of killing us
    rlimit lim{16, 16};
    setrlimit(RLIMIT_FSIZE, &lim);
    bool threw = false;
    try {
      write_file_atomic(path, std::string(4096, 'x'));
    } catch (const Error&) {
      threw = true;
    }
    _exit(threw ? 0 : 3);
  }
  int st = 0;
  waitpid(child, &st, 0);
  ASSERT_TRUE(WIFEXITED(st));
  EXPECT_EQ(WEXITSTATUS(st), 0) << "the write past the limit did not fail";
  EXPECT_FALSE(fs::exists(path + ".tmp"));
  std::ifstream in(path);
  EXPECT_EQ(std::string(std::istreambuf_iterator<char>(in), {}), "old\n");
}

// A rank of a --nproc job killed at step 24 of a run that checkpoints rarely: status.json was last
// written at step 0, and the launcher's mark must still say the run failed at step 24.
TEST(RunFolder, MarkFailedTakesTheStepFromTheMetrics) {
  fs::path dir = fresh_dir("mark_failed");
  RunStatus s;
  s.status = "running";
  s.step = 0;
  s.steps = 100;
  write_status(dir.string(), s);
  {
    MetricsLog log(dir.string(), 0);
    for (int64_t i = 0; i < 24; ++i) log.append({{"event", "step"}, {"step", i}, {"loss", 1.0}});
    log.append({{"event", "val"}, {"step", 23}, {"val_loss", 1.0}});
  }
  ASSERT_TRUE(mark_run_failed(dir.string(), "rank 1 died on signal 9 (Killed)"));
  std::ifstream in(dir / "status.json");
  auto status = nlohmann::json::parse(in);
  EXPECT_EQ(status["status"], "failed");
  EXPECT_EQ(status["step"], 24);
  EXPECT_NE(status["error"].get<std::string>().find("rank 1 died"), std::string::npos);
}

// status.json names what ran: an FP8 run on the CPU says fp8 (emulated), not only the backend's
// f32, and every run says how many ranks it had.
TEST(RunFolder, StatusNamesThePrecisionAndTheRanks) {
  fs::path dir = fresh_dir("fp8_status");
  Config c = small_config(write_text(dir));
  c.train.steps = 2;
  c.precision = "fp8";
  run_training(c, (dir / "run").string());
  std::ifstream in(dir / "run" / "status.json");
  auto status = nlohmann::json::parse(in);
  const std::string device = status["device"].get<std::string>();
  EXPECT_NE(device.find("fp8 tensorwise GEMMs (dense, head) emulated"), std::string::npos) << device;
  EXPECT_EQ(status["ranks"], 1);
}

TEST(TrainCli, EmptyConfigAndUsageErrorsExitClearly) {
  fs::path dir = fresh_dir("cli");
  std::ofstream(dir / "empty.toml") << "# nothing here\n";
  CliResult r = moelab("train --config " + (dir / "empty.toml").string() + " --out " + (dir / "run").string());
  EXPECT_EQ(r.code, 1);
  EXPECT_NE(r.output.find("empty config: start from configs/tiny-cpu.toml"), std::string::npos) << r.output;
  EXPECT_FALSE(fs::exists(dir / "run"));

  r = moelab("trian --config x");
  EXPECT_EQ(r.code, 2);
  EXPECT_NE(r.output.find("unknown command 'trian'; did you mean 'train'?"), std::string::npos) << r.output;
  r = moelab("train --no-such-flag");
  EXPECT_EQ(r.code, 2) << r.output;
  r = moelab("train --config " + (dir / "missing.toml").string());
  EXPECT_EQ(r.code, 2) << r.output;
  r = moelab("--help");
  EXPECT_EQ(r.code, 0);
  // A command line that lacks what train needs is a usage error (2), not a run error (1).
  r = moelab("train --out " + (dir / "run").string());
  EXPECT_EQ(r.code, 2) << r.output;
  EXPECT_NE(r.output.find("needs --config FILE"), std::string::npos) << r.output;
  r = moelab("train --config " + (dir / "empty.toml").string());
  EXPECT_EQ(r.code, 2) << r.output;
  EXPECT_NE(r.output.find("needs --out RUN_DIR"), std::string::npos) << r.output;
  EXPECT_FALSE(fs::exists(dir / "run"));

  std::ofstream(dir / "neg.toml") << "[optim]\nmatrix_lr = -0.02\n";
  r = moelab("train --config " + (dir / "neg.toml").string() + " --out " + (dir / "run").string());
  EXPECT_EQ(r.code, 1);
  EXPECT_NE(r.output.find("optim.matrix_lr"), std::string::npos) << r.output;
  r = moelab("train --help-config");
  EXPECT_EQ(r.output.find("0.20000000000000001"), std::string::npos);
  EXPECT_NE(r.output.find("optim.embedding_lr = 0.2\n"), std::string::npos) << r.output;
}

}  // namespace
}  // namespace moelab
